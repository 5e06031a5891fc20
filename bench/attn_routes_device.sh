#!/usr/bin/env bash
# FlashAttention 4 and the other attention routes on the device, in two calls. The flash-attn-4 wheels
# (97 MiB; nvidia-cutlass-dsl-libs-cu13 alone 88 MiB) exceed what one call carries (64 MiB), so the big
# wheel travels in two parts (bench/attn_routes_wheels.sh makes .whl1/ and .whl2/ in the repo root):
#   call 1, carry [".whl1"]:  bash bench/attn_routes_device.sh stage
#       copies part 1 to /tmp/whl on the machine, prints the GPU and the image's versions (seconds)
#   call 2, carry [".whl2"], within 30 s of call 1's return (the same warm machine):
#                             bash bench/attn_routes_device.sh run
#       reassembles and checks the wheel, installs all into /tmp/site, runs bench/attn_routes_micro.py;
#       then, if FA4 passed the self-attention shape and ATTN_DIT=1 (default), the DiT bench fp8 + compile
#       with --attn fa4 and with the default attention, back to back (bench/run_list.sh, 4 + 6 blocks);
#       then, as time allows, tests/test_gpu.py -k fa4 (the small DiT's rollout, fa4 vs sdpa) and FA4's
#       first call in a fresh process with its on-disk kernel cache cold and warm.
# $OUT: attn_routes.jsonl, attn_routes.log, list.jsonl, fp8c_{fa4,sdpa}.{out,err} (7 files).
# Knobs: ATTN_MICRO_ARGS (extra micro-bench args), ATTN_MICRO_S (its cap, 300), ATTN_DIT (1), ATTN_BUDGET_S (570).
set -u
OUT=${OUT:-/tmp/attn_routes_out}; mkdir -p "$OUT"
W=/tmp/whl; SITE=/tmp/site; REPO=$PWD
BIG=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
export PYTHONUNBUFFERED=1
case "${1:-run}" in
stage)
  mkdir -p "$W" && cp .whl1/* "$W"/ || exit 1
  ls -l "$W"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|nvidia-cudnn-cu13|cuda-bindings|cuda-python|protobuf|typing.extensions|einops|numpy|triton) '
  ;;
run)
  START=$SECONDS
  p1=$(ls "$W/$BIG.part-aa" ".whl1/$BIG.part-aa" 2>/dev/null | head -1)
  if [ -z "$p1" ]; then
    echo "part 1 of $BIG is missing: this is not call 1's warm machine. Redo call 1 (stage), then this call at once."
    exit 3
  fi
  cat "$p1" ".whl2/$BIG.part-ab" > "$W/$BIG" && (cd "$W" && sha256sum -c "$REPO/.whl2/$BIG.sha256") || exit 4
  cp .whl2/*.whl "$W"/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$W"/*.whl || exit 5
  # --target does not run the .pth of nvidia-cutlass-dsl (it puts dsl_packages/ on sys.path): do it here
  export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
  echo "[$((SECONDS - START))s] installed into $SITE"
  python3 -c "import time; t = time.perf_counter(); import cutlass, flash_attn.cute
print(f'import cutlass {cutlass.__version__} + flash_attn.cute: {time.perf_counter() - t:.1f} s')" 2>&1 | tail -4
  rm -f /tmp/fa4_ok
  set -o pipefail
  # shellcheck disable=SC2086
  timeout -k 10 "${ATTN_MICRO_S:-300}" python3 bench/attn_routes_micro.py --out "$OUT/attn_routes.jsonl" \
      --ok-file /tmp/fa4_ok ${ATTN_MICRO_ARGS:-} 2>&1 | tee "$OUT/attn_routes.log" | grep -v '^{"route"'
  echo "[$((SECONDS - START))s] micro-benchmark rc=$?"
  if [ "${ATTN_DIT:-1}" = 1 ] && [ -f /tmp/fa4_ok ]; then
    LIST_BUDGET_S=$(( ${ATTN_BUDGET_S:-570} - (SECONDS - START) )) LIST_WARMUP=${LIST_WARMUP:-4} \
      bash bench/run_list.sh "fp8c_fa4|270|--fp8 --compile --attn fa4" "fp8c_sdpa|270|--fp8 --compile"
  else
    echo "DiT runs skipped (ATTN_DIT=${ATTN_DIT:-1}; fa4 passed the self shape: $([ -f /tmp/fa4_ok ] && echo yes || echo no))"
  fi
  left=$(( ${ATTN_BUDGET_S:-570} - (SECONDS - START) ))
  if [ -f /tmp/fa4_ok ] && [ "$left" -gt 50 ]; then  # the small DiT's rollout, fa4 vs sdpa (tests/test_gpu.py)
    timeout $((left - 10)) python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py -k fa4 2>&1 \
      | grep -E "fa4 vs|passed|failed|skipped|Error" | head -8
  fi
  left=$(( ${ATTN_BUDGET_S:-570} - (SECONDS - START) ))
  if [ -f /tmp/fa4_ok ] && [ "$left" -gt 100 ]; then  # FA4's on-disk kernel cache (warm TTFF): a cold, then a warm process
    for pass in cold warm; do
      FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_kernel_cache timeout 45 \
        python3 bench/attn_routes_micro.py --routes fa4 --shapes self --iters 5 --graph-shapes "" --out "$OUT/attn_routes.jsonl" \
        | grep '"route": "fa4"' | python3 -c "import json, sys; d = json.loads(sys.stdin.read()); print('fa4 kernel cache $pass: first call', round(d['first_call_s'], 2), 's', d['error'] or '')"
    done
  fi
  echo "[$((SECONDS - START))s] done"
  ;;
*) echo "usage: bash bench/attn_routes_device.sh stage|run"; exit 2 ;;
esac
