#!/usr/bin/env bash
# FlashAttention 4 and the other attention routes on the device, in several calls. The flash-attn-4
# wheels (97 MiB; nvidia-cutlass-dsl-libs-cu13 alone 88 MiB) exceed what one call carries (64 MiB with
# the tracked tree), so the big wheel travels in parts (bench/attn_routes_wheels.sh makes .whl1/ ..
# .whl<N>/ in the repo root; the last one holds the last part, the checksum and the small wheels):
#   calls 1..N-1, carry [".whl<k>"]:  bash bench/attn_routes_device.sh stage
#       copies the carried part to /tmp/whl on the machine, prints the GPU and versions (seconds)
#   call N, carry [".whl<N>"], each call within 30 s of the last one's return (the same warm machine):
#                             bash bench/attn_routes_device.sh run
#       reassembles and checks the wheel, installs all into /tmp/site, runs bench/attn_routes_micro.py;
#       then, if FA4 passed the self-attention shape and ATTN_DIT=1 (default), the DiT bench fp8 + compile
#       with --attn fa4 and with the default attention, back to back (bench/run_list.sh, 4 + 6 blocks);
#       then, as time allows, tests/test_gpu.py -k fa4 (the small DiT's rollout, fa4 vs sdpa) and FA4's
#       first call in a fresh process with its on-disk kernel cache cold and warm.
# $OUT: attn_routes.jsonl, attn_routes.log, list.jsonl, fp8c_{fa4,sdpa}.{out,err} (7 files).
# Knobs: ATTN_MICRO (1; 0 skips the micro-benchmark and trusts FA4), ATTN_MICRO_ARGS (extra micro-bench
# args), ATTN_MICRO_S (its cap, 300), ATTN_DIT (1), ATTN_BUDGET_S (570), ATTN_LIST (the run_list.sh specs of
# the DiT runs, '||'-separated; default the fa4 and default-attention pair), ATTN_EXTRAS (1: the fa4 GPU test and the kernel-cache
# first calls after the DiT runs), ATTN_AFTER (a command run last). Wheels in .whl_d/ are installed too.
set -u
OUT=${OUT:-/tmp/attn_routes_out}; mkdir -p "$OUT"
W=/tmp/whl; SITE=/tmp/site; REPO=$PWD
BIG=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
export PYTHONUNBUFFERED=1
case "${1:-run}" in
stage)
  mkdir -p "$W" && cp .whl[0-9]*/* "$W"/ || exit 1
  ls -l "$W"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|nvidia-cudnn-cu13|cuda-bindings|cuda-python|protobuf|typing.extensions|einops|numpy|triton) '
  ;;
run)
  START=$SECONDS
  mkdir -p "$W" && cp .whl[0-9]*/* "$W"/ || exit 3
  cat "$W/$BIG.part-"* > "$W/$BIG" && (cd "$W" && sha256sum -c "$BIG.sha256") || {
    echo "$BIG does not reassemble: a part is missing (not the stage calls' warm machine?). Parts here:"
    ls -l "$W"; exit 4; }
  rm -f "$W/$BIG.part-"*
  cp .whl_d/*.whl "$W"/ 2>/dev/null  # other wheels the runs need (diffusers for the reference harness)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$W"/*.whl || exit 5
  # --target does not run the .pth of nvidia-cutlass-dsl (it puts dsl_packages/ on sys.path): do it here
  export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
  echo "[$((SECONDS - START))s] installed into $SITE"
  python3 -c "import time; t = time.perf_counter(); import cutlass, flash_attn.cute
print(f'import cutlass {cutlass.__version__} + flash_attn.cute: {time.perf_counter() - t:.1f} s')" 2>&1 | tail -4
  rm -f /tmp/fa4_ok
  set -o pipefail
  if [ "${ATTN_MICRO:-1}" = 1 ]; then
    # shellcheck disable=SC2086
    timeout -k 10 "${ATTN_MICRO_S:-300}" python3 bench/attn_routes_micro.py --out "$OUT/attn_routes.jsonl" \
        --ok-file /tmp/fa4_ok ${ATTN_MICRO_ARGS:-} 2>&1 | tee "$OUT/attn_routes.log" | grep -v '^{"route"'
    echo "[$((SECONDS - START))s] micro-benchmark rc=$?"
  else
    touch /tmp/fa4_ok
  fi
  if [ "${ATTN_DIT:-1}" = 1 ] && [ -f /tmp/fa4_ok ]; then
    specs=()
    IFS=$'\n' read -r -d '' -a specs < <(printf '%s' "${ATTN_LIST:-fp8c_fa4|270|--fp8 --compile --attn fa4||fp8c_sdpa|270|--fp8 --compile}" \
      | sed 's/||/\n/g'; printf '\0')
    LIST_BUDGET_S=$(( ${ATTN_BUDGET_S:-570} - (SECONDS - START) )) LIST_WARMUP=${LIST_WARMUP:-4} \
      bash bench/run_list.sh "${specs[@]}"
  else
    echo "DiT runs skipped (ATTN_DIT=${ATTN_DIT:-1}; fa4 passed the self shape: $([ -f /tmp/fa4_ok ] && echo yes || echo no))"
  fi
  left=$(( ${ATTN_BUDGET_S:-570} - (SECONDS - START) ))
  if [ "${ATTN_EXTRAS:-1}" = 1 ] && [ -f /tmp/fa4_ok ] && [ "$left" -gt 50 ]; then  # the small DiT's rollout, fa4 vs sdpa (tests/test_gpu.py)
    timeout $((left - 10)) python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py -k fa4 2>&1 \
      | grep -E "fa4 vs|passed|failed|skipped|Error" | head -8
  fi
  left=$(( ${ATTN_BUDGET_S:-570} - (SECONDS - START) ))
  if [ "${ATTN_EXTRAS:-1}" = 1 ] && [ -f /tmp/fa4_ok ] && [ "$left" -gt 100 ]; then  # FA4's on-disk kernel cache (warm TTFF): a cold, then a warm process
    for pass in cold warm; do
      FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_kernel_cache timeout 45 \
        python3 bench/attn_routes_micro.py --routes fa4 --shapes self --iters 5 --graph-shapes "" --out "$OUT/attn_routes.jsonl" \
        | grep '"route": "fa4"' | python3 -c "import json, sys; d = json.loads(sys.stdin.read()); print('fa4 kernel cache $pass: first call', round(d['first_call_s'], 2), 's', d['error'] or '')"
    done
  fi
  if [ -n "${ATTN_AFTER:-}" ]; then
    echo "[$((SECONDS - START))s] $ATTN_AFTER"
    bash -c "$ATTN_AFTER"
  fi
  echo "[$((SECONDS - START))s] done"
  ;;
*) echo "usage: bash bench/attn_routes_device.sh stage|run"; exit 2 ;;
esac
