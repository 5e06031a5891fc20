#!/usr/bin/env bash
# DiT speed variants in one device call (issue 6): ours bf16 / fp8, eager / compile_blocks, plus the
# reference bf16 eager when time is left. Each run is its own process with a cap; JSON lines go to
# $OUT/speed.jsonl, a table is printed at the end. PSNR: fp8 runs and bf16+compile vs bf16 eager.
#   SPEED_BUDGET_S (default 540), SPEED_EXTRA (e.g. "--tiny --device cpu" dry run),
#   SPEED_OURS_EXTRA ("--allow-cpu-fp8" dry run), SPEED_PROFILE=1 (profile the fp8+compile run),
#   SPEED_REF=1 (reference bf16 eager last, needs third_party/LiveAvatar + diffusers wheels)
set -u
# shellcheck source=bench/capped_run.sh
source "$(dirname "$0")/capped_run.sh"
start_runs speed "${SPEED_BUDGET_S:-540}"
read -r -a EXTRA <<< "${SPEED_EXTRA:-}"
read -r -a OEXTRA <<< "${SPEED_OURS_EXTRA:-}"
COMMON=(--size "${SPEED_SIZE:-704*384}" --steps 4 --blocks "${SPEED_BLOCKS:-6}" --warmup "${SPEED_WARMUP:-4}" --seed 0
        --peak-tflops "${SPEED_PEAK:-738}" "${EXTRA[@]}")
OURS=("$PY" -m bench --random-weights "${COMMON[@]}" "${OEXTRA[@]}")
run() { capped_run "$@"; }  # run NAME CAP CMD...
PROF=(); [ "${SPEED_PROFILE:-0}" = 1 ] && PROF=(--profile "$OUT")
rm -f /tmp/lat_bf16.pt
run ours_bf16 80 "${OURS[@]}" --save-latents /tmp/lat_bf16.pt
CMP=(); [ -s /tmp/lat_bf16.pt ] && CMP=(--compare-latents /tmp/lat_bf16.pt)
run ours_fp8 80 "${OURS[@]}" --fp8 "${CMP[@]}"
run ours_fp8_compile 170 "${OURS[@]}" --fp8 --compile "${CMP[@]}" "${PROF[@]}"
run ours_bf16_compile 150 "${OURS[@]}" --compile "${CMP[@]}"
if [ "${SPEED_REF:-0}" = 1 ]; then
  run ref_bf16 100 "$PY" bench/ref_harness.py --ref-dir third_party/LiveAvatar "${COMMON[@]}"
fi
echo "[$((SECONDS - START))s] done"
print_runs "$J"
