#!/usr/bin/env bash
# One lent GPU session in one call (at most 10 minutes), everything written under $OUT:
#   1. the GPU kit: ceilings, the llama-1b grid, the PyTorch peer eager and compiled, the kernels
#      (python -m jaxlayouts.gpu_check; $OUT/kit/<device>-<date>.md/.json/.jsonl/.raw.jsonl)
#   2. kernel tiles tuned at the kit's shapes (kernels.tune --write; $OUT/tuned.json)
#   3. a profile of the default step with its top-ops table (bench --profile_dir; in session.log)
#   4. the deviceless XLA:GPU compile of every kit row beside the device's peak
#      (target_check, with JAX on the CPU; $OUT/deviceless.md)
# The device tool sends the checkout; run it from the repository root:
#   run(command="bash launch/gpu_session.sh", timeout_s=600)
# On CPU, --dry-run runs the same steps on tiny shapes: it checks the path, and measures nothing.
# SESSION_STEPS="tune profile" runs some of the steps (tests/test_gpu_session.py runs the last).
set -uo pipefail
dry=()
case "$#:${1:-}" in
  0:) ;;
  1:--dry-run) dry=(--dry-run) ;;
  *) echo "error: the one option is --dry-run, got: $*" >&2; exit 2 ;;
esac
[ -n "${OUT:-}" ] || { echo "error: set OUT to the folder for the results, e.g. OUT=/tmp/session bash $0 --dry-run" >&2; exit 2; }
mkdir -p "$OUT/kit" || { echo "error: OUT=$OUT: cannot make the folder $OUT/kit" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$OUT/session.log"
steps=" ${SESSION_STEPS:-kit tune profile deviceless} "  # a subset, e.g. for the CPU test
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output and exit status
  local name=$1 limit=$2; shift 2
  [[ $steps == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local status=$?
  echo "=== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
}
python -c 'import jax; print("devices:", jax.devices(), jax.__version__)' >>"$log" 2>&1

kit_budget=${KIT_BUDGET_S:-320}
step kit $((kit_budget + 20)) python -m jaxlayouts.gpu_check --budget_s "$kit_budget" --out_dir "$OUT/kit" "${dry[@]}"
if [ ${#dry[@]} -eq 0 ]; then
  step tune 60 python -m jaxlayouts.kernels.tune --write --table "$OUT/tuned.json" --seq_lens 2048,8192 --widths 2048
  step profile 70 python -m jaxlayouts.bench --model llama-1b --seq_len 2048 --global_batch 8 --micro_batch 1 \
    --attention cudnn --steps 4 --warmup 2 --profile_dir /tmp/gpu_session_profile
else
  step tune 60 python -m jaxlayouts.kernels.tune --write --table "$OUT/tuned.json" --dry-run
  step profile 70 python -m jaxlayouts.bench --model tiny --seq_len 32 --global_batch 4 --steps 2 --warmup 1 \
    --profile_dir /tmp/gpu_session_profile
fi
rows=$(ls -t "$OUT"/kit/*.raw.jsonl 2>/dev/null | head -n 1)  # target_check reads one file: the kit's newest
step deviceless 90 env JAX_PLATFORMS=cpu python -m jaxlayouts.target_check "${rows:-$OUT/kit/none.raw.jsonl}" \
  --markdown "$OUT/deviceless.md"
echo "=== done; files under $OUT:" | tee -a "$log"
find "$OUT" -type f | sort | tee -a "$log"
