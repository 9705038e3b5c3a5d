#!/usr/bin/env bash
# The Python packages bench/accelerator.sh needs on a GPU machine that has JAX with CUDA but not
# the rest of ldm_jax's dependencies, as wheels carried with the working tree.
#
# The device machine (/work/.library/device/KINDS.md, kind nvidia-h200) cannot reach a package
# registry; its image has Python 3.12 with jax/jaxlib 0.11.2 and the jax-cuda13 plugin, flax,
# optax, orbax-checkpoint, tensorstore, transformers, tokenizers, safetensors, numpy, scipy,
# pillow, PyYAML, etils, absl-py, ... but not ml_collections, grain, array_record or
# tensorflow-datasets (and their small dependencies). JAX itself is NOT carried: jaxlib and the
# CUDA plugin wheels are hundreds of MB, over the 64 MiB a call may carry, and the machine's own
# CUDA build is the one that matches its driver.
#
#   bash bench/accelerator_wheels.sh download [DEST]   # here: ~34 MB into DEST (default .whl/,
#                                                      # which it adds to .git/info/exclude)
#   bash bench/accelerator_wheels.sh install [DEST] [SITE]   # there: prints SITE to export as
#                                                            # PYTHONPATH (accelerator.sh does it)
#
# download: the packages below at the versions of this checkout's .venv (the ones the suite ran
# with), for CPython 3.12 on manylinux x86-64, without their dependencies (each is named):
#   DEST/*.whl        missing on the device: always installed there;
#   DEST/floor/*.whl  there in some version: installed only where the machine's is older (or
#                     absent), so that ldm_jax runs on at least the versions it was tested with.
# 'promise' has no wheel on PyPI: it is built here from its sdist (pure Python).
# install: `pip install --no-index --no-deps --target SITE` of those wheels, with the python3 of
# the machine (PYTHON overrides); ACCELERATOR_PIP_ARGS adds pip arguments (to test it here:
# "--python-version 3.12 --implementation cp --only-binary=:all: --platform ...").
set -euo pipefail
cd "$(dirname "$0")/.."

MISSING=(ml_collections grain array_record portpicker tensorflow_datasets dm_tree immutabledict
         simple_parsing docstring_parser tensorflow_metadata googleapis_common_protos termcolor
         toml importlib_resources)
SDIST_ONLY=(promise)
FLOORS=(flax optax orbax_checkpoint tensorstore protobuf etils)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
LIMIT_MB=60  # of the 64 MiB a device call carries; the repository itself is ~1 MB

pinned() {  # NAME==VERSION of each name, as installed in $PY
  local version='import importlib.metadata as m, sys; print(m.version(sys.argv[1]))'
  for name in "$@"; do
    echo "$name==$("$PY" -c "$version" "$name")"
  done
}

download() {
  local dest=$1
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p "$dest/floor"
  local pip=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
             --implementation cp "${PLATFORMS[@]}")
  "${pip[@]}" -d "$dest" $(pinned "${MISSING[@]}")
  "${pip[@]}" -d "$dest/floor" $(pinned "${FLOORS[@]}")
  "$PY" -m pip wheel -q --no-deps -w "$dest" $(pinned "${SDIST_ONLY[@]}")
  local exclude
  if [ "$dest" = .whl ] && exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
    mkdir -p "$(dirname "$exclude")"  # git status stays clean; carry=['.whl'] takes it along
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
  fi
  local mb=$(( $(du -sb "$dest" | cut -f1) / 1000000 ))
  ls -1 "$dest"/*.whl "$dest"/floor/*.whl | sed 's|.*/||'
  echo "$mb MB in $dest (limit $LIMIT_MB MB: a device call carries 64 MiB in all)"
  [ "$mb" -le "$LIMIT_MB" ] || { echo "too large to carry" >&2; return 1; }
}

install() {
  local dest=$1 site=$2
  PY=${PYTHON:-python3}
  if [ ! -d "$dest" ]; then
    echo "no $dest/: using the machine's packages as they are" >&2
    return 0
  fi
  # The floor wheels whose package is missing here or older than the wheel.
  local floors
  floors=$("$PY" - "$dest/floor" <<'EOF'
import importlib.metadata, pathlib, sys
try:
  from packaging.version import Version
except ImportError:  # compare the leading numbers
  Version = lambda v: tuple(int(p) for p in v.split('+')[0].split('.') if p.isdigit())
for wheel in sorted(pathlib.Path(sys.argv[1]).glob('*.whl')):
  name, version = wheel.name.split('-')[:2]
  try:
    have = importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    have = None
  newer = have is None or Version(have) < Version(version)
  what = 'installing the carried one' if newer else "keeping the machine's"
  print(f'{name}: machine has {have}, carried {version}: {what}', file=sys.stderr)
  if newer:
    print(wheel)
EOF
)
  # shellcheck disable=SC2086  (one wheel path per word)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" ${ACCELERATOR_PIP_ARGS:-} "$dest"/*.whl $floors >&2
  echo "installed $(ls "$dest"/*.whl | wc -l) wheels and $(echo $floors | wc -w) floor wheels \
into $site" >&2
  echo "$site"
}

case "${1:-download}" in
  download) download "${2:-.whl}" ;;
  install) install "${2:-.whl}" "${3:-/tmp/ldm_jax_site}" ;;
  *) echo "usage: $0 download [DEST] | install [DEST] [SITE]" >&2; exit 2 ;;
esac
