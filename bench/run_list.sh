#!/usr/bin/env bash
# Run a list of `python -m bench` variants in one device call, each in its own capped process.
#   bash bench/run_list.sh "name|cap_s|bench args" ...
# Common args (size, steps, blocks, warmup, seed, peak) come first; "REF" as bench args runs the
# reference harness (bf16 eager) instead. JSON lines -> $OUT/list.jsonl, then a short table.
#   LIST_BUDGET_S (default 540), LIST_BLOCKS (6), LIST_WARMUP (6), LIST_PEAK (738)
set -u
# shellcheck source=bench/capped_run.sh
source "$(dirname "$0")/capped_run.sh"
start_runs list "${LIST_BUDGET_S:-540}"
COMMON=(--size "${LIST_SIZE:-704*384}" --steps 4 --blocks "${LIST_BLOCKS:-6}" --warmup "${LIST_WARMUP:-6}" --seed 0
        --peak-tflops "${LIST_PEAK:-738}")
for spec in "$@"; do
  IFS='|' read -r name cap args <<< "$spec"
  read -r -a A <<< "$args"
  if [ "$args" = REF ]; then
    CMD=("$PY" bench/ref_harness.py --ref-dir third_party/LiveAvatar "${COMMON[@]}")
  else
    CMD=("$PY" -m bench --random-weights "${COMMON[@]}" "${A[@]}")
  fi
  BENCH_ARGS_NOTE=$args capped_run "$name" "$cap" "${CMD[@]}"
done
print_runs "$J"
