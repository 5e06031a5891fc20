#!/usr/bin/env bash
# Time to first frame on one GPU (issue 16), cold and warm, end to end (DiT + streaming VAE decode),
# fp8 + compile at 704*384, each run a fresh process:
#   cold      empty caches
#   warm      a new process with inductor's / AOTAutograd's caches kept (PyTorch's default reuse)
#   pre_fill  LIVEAVATAR_PRECOMPILE=1, dynamo's precompile cache still empty (it is written after block 2)
#   pre_warm  LIVEAVATAR_PRECOMPILE=1 again: tracing skipped too
# Device call (one H200): bash bench/ttff_device.sh   [TTFF_EXTRA="--attn fa4"] [TTFF_RUNS="pre_fill pre_warm"]
#   -> $OUT/ttff.jsonl + table
set -u
# shellcheck source=bench/capped_run.sh
source "$(dirname "$0")/capped_run.sh"
export TORCHINDUCTOR_CACHE_DIR=${TTFF_CACHE:-/tmp/ttff_cache}
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
start_runs ttff "${TTFF_BUDGET_S:-540}"
read -r -a EXTRA <<< "${TTFF_EXTRA:-}"
CMD=("$PY" -m bench --random-weights --size "${TTFF_SIZE:-704*384}" --steps 4 --blocks 2 --warmup 3 --seed 0
     --peak-tflops 738 --scope end_to_end --fp8 --compile "${EXTRA[@]}")
for run in ${TTFF_RUNS:-cold warm pre_fill pre_warm}; do  # pre_fill alone starts cold when it runs first
  case $run in
    cold) capped_run cold 240 "${CMD[@]}" ;;
    warm) capped_run warm 150 "${CMD[@]}" ;;
    pre_fill) LIVEAVATAR_PRECOMPILE=1 capped_run pre_fill 240 "${CMD[@]}" ;;
    pre_warm) LIVEAVATAR_PRECOMPILE=1 capped_run pre_warm 150 "${CMD[@]}" ;;
  esac
done
"$PY" - "$J" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    ph = d.get("compile_phases_s") or {}
    top = ", ".join(f"{k} {v}" for k, v in list(ph.items())[:5])
    print(f"{d.get('run'):9s} ttff_s {d.get('ttff_s')} compile_s {d.get('compile_s')} fps {d.get('fps')} "
          f"graphs {d.get('graphs')} precompile {d.get('precompile')} err {str(d.get('error'))[:200]}\n          {top}")
PYEOF
