# Fresh-machine entry points: `make test` (set-up + the whole suite).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup test clean

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install -q -U pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf .venv *.egg-info
