# Fresh-machine entry points: `make demo` (set-up + the shapes demo) and `make test` (set-up + suite).
PY := .venv/bin/python
RUNTIME := .venv/.installed-runtime
TESTING := .venv/.installed-test
DEMO := runs/demo

.PHONY: setup test demo clean

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install -q -U pip

$(RUNTIME): $(PY) pyproject.toml
	$(PY) -m pip install -q -e .
	touch $(RUNTIME)

# torch-fidelity (the FID/KID test oracle) declares torchvision, whose wheels here are CUDA builds
# that replace the CPU torch: so it is not in the test extra but installed --no-deps (it needs only
# numpy, pillow, torch and tqdm, all there by then).
$(TESTING): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps torch-fidelity==0.4.0
	touch $(RUNTIME) $(TESTING)

setup: $(TESTING)

test: $(TESTING)
	$(PY) -m pytest -q tests

# The embedded default: build the shapes dataset, train the VAE then the text-conditioned LDM
# (with a jointly trained text encoder) on CPU, sample every colour/shape combination (held-out
# ones included) into $(DEMO)/samples and print the prompt fidelity read back from the pixels.
# Two simulated CPU devices, one per core, data parallel: 1.3-1.5x the steps/s of one device.
demo: export JAX_NUM_CPU_DEVICES = 2
demo: $(RUNTIME)
	$(PY) -m ldm_jax.data build shapes --data_dir data --image_size 32 --num_train 4000 --layout centered
	$(PY) train.py --config configs/shapes.py:vae --workdir $(DEMO)/vae
	$(PY) train.py --config configs/shapes.py:ldm --workdir $(DEMO)/ldm --config.vae_workdir=$(DEMO)/vae
	$(PY) -m ldm_jax.evaluation.shapes --write_prompts $(DEMO)/prompts.txt --per_combination 4
	$(PY) sample.py --workdir $(DEMO)/ldm --prompts_file $(DEMO)/prompts.txt --batch_size 96 \
	    --steps 25 --sampler dpmpp_2m --guidance 4 --out $(DEMO)/samples
	$(PY) -m ldm_jax.evaluation.shapes --samples $(DEMO)/samples

clean:
	rm -rf .venv *.egg-info
