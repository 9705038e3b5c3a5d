#!/usr/bin/env bash
# The accelerator benchmark as one command (bench/accelerator.py says what it measures): the SD
# 1.5 train step at batch 8/16/32 per device, the training loop at SD scale, 50-step txt2img;
# one JSON, one markdown table and the log, in $OUT when it is set (else runs/accelerator/).
#
# On a GPU machine of this workplace's device tool (kind nvidia-h200; <= 8 minutes):
#   here, once:  bash bench/accelerator_wheels.sh download      # ~35 MB of wheels into .whl/
#   there:       run(command='bash bench/accelerator.sh', carry=['.whl'], timeout_s=570)
# The machine's image has JAX with CUDA (jax 0.11.2, jax-cuda13 plugin), flax, optax, orbax,
# transformers; .whl brings ml_collections, grain, array_record, tensorflow-datasets and their
# small dependencies, and newer flax/optax/orbax/tensorstore/protobuf/etils where the machine's
# are older than this checkout's (accelerator_wheels.sh). Nothing is downloaded there: the
# networks are random, built from the presets, and the tokenizer is built on the spot.
#
# Here, on CPU, the same code at tiny sizes (a few minutes on 2 cores):
#   bash bench/accelerator.sh --dry-run
#
# Other arguments go to accelerator.py (--peak_tflops, --attention_impl, --remat,
# --no_parallel_compile). Environment: ACCELERATOR_BUDGET_S (default 480; 900 for --dry-run):
# the whole command's seconds; each part is stopped at the end of its share (train 50%, sample
# to 72%, loop to 100%), keeping what it had recorded. ACCELERATOR_PARTS (default "train sample
# loop"): a subset reruns those parts into the same JSON (equal shares). PYTHON: the interpreter
# (default: .venv/bin/python if there, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
for arg in "$@"; do
  [ "$arg" = --dry-run ] && dry=1
done
budget=${ACCELERATOR_BUDGET_S:-$([ $dry = 1 ] && echo 900 || echo 480)}
start=$(date +%s)
out=${OUT:-runs/accelerator$([ $dry = 1 ] && echo _dry_run)}
mkdir -p "$out"
log=$out/accelerator.log
parts=(${ACCELERATOR_PARTS:-train sample loop})
shares=(50 72 100)  # cumulative % of the budget at which each part is stopped
if [ "${parts[*]}" != "train sample loop" ]; then
  shares=()
  for i in "${!parts[@]}"; do shares+=($(( (i + 1) * 100 / ${#parts[@]} ))); done
else  # a whole run: no old numbers of a part that is skipped this time
  rm -f "$out/accelerator.json" "$out/accelerator.md" "$log"
fi
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
scratch=$(mktemp -d /tmp/ldm_jax_accelerator.XXXXXX)

# Wheels carried with the tree (none in a dry run: the venv has everything).
if [ $dry = 0 ] && [ -d .whl ]; then
  site=$(PYTHON=$PY bash bench/accelerator_wheels.sh install .whl 2>"$scratch/wheels.log")
  rc=$?
  tee -a "$log" <"$scratch/wheels.log"
  [ $rc = 0 ] || { echo "installing the wheels failed (exit status $rc)" | tee -a "$log"; exit 1; }
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
elif [ $dry = 0 ]; then  # the machine then needs grain, tensorflow-datasets, ml_collections
  echo "no .whl/: using the machine's packages (bench/accelerator_wheels.sh download makes it)" |
    tee -a "$log"
fi
{
  echo "== $(date -Is) $(hostname): bash bench/accelerator.sh $*; python $PY; budget ${budget}s"
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  uptime
  "$PY" -c 'import jax, jaxlib; print("jax", jax.__version__, jaxlib.__version__, jax.devices())'
} 2>&1 | tee -a "$log"

export PYTHONUNBUFFERED=1
# The BFC pool may take 92% of the GPU (JAX's default is 75%): room for batch 32 per device.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# One persistent compilation cache for the three processes: the loop part then loads the train
# part's compiled step (the same function at the same batch) instead of compiling it again.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$scratch/jax_cache}

part() {  # part NAME UNTIL_EPOCH_S: accelerator.py --only NAME, stopped at UNTIL
  local name=$1 until=$2 left
  shift 2
  left=$((until - $(date +%s)))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left}s left" | tee -a "$log"
    return
  fi
  echo "== $name: up to ${left}s" | tee -a "$log"
  timeout --kill-after=10 "$left" "$PY" bench/accelerator.py --only "$name" \
      --json "$out/accelerator.json" --markdown "$out/accelerator.md" --scratch "$scratch" \
      --deadline "$until" --command "bash bench/accelerator.sh${*:+ $*}" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "== $name: exit status $rc (124: stopped at its time share)" | tee -a "$log"
  [ "$rc" = 0 ] || status=1
}
status=0

for i in "${!parts[@]}"; do
  part "${parts[$i]}" $((start + budget * ${shares[$i]} / 100)) "$@"
done
rm -rf "$scratch"
echo "== done in $(($(date +%s) - start))s: $out/accelerator.{json,md,log}" | tee -a "$log"
cat "$out/accelerator.md" 2>/dev/null
exit $status
