#!/usr/bin/env bash
# Multi-GPU checks in one device call (kind nvidia-h100-x2 or larger), under 10 minutes:
#   1. tests/test_gpu_multi.py: TPP over NCCL = one GPU, a killed rank is reported, group bench (tiny)
#   2. the worker-group benchmark at 704*384, fp8 + compile, TPP over every GPU (end to end)
#   3. tests/test_gpu.py on GPU 0 while GPU 1 times the single-GPU fp8 + compile DiT (same call)
# A step still running 20 s before its time limit gets its worker processes' stacks dumped
# (SIGUSR1 -> faulthandler) and the group logs packed into $OUT/<step>-logs.tgz.
# Run on the device with carry [".whl"]:  bash bench/run_multi_gpu.sh   (writes $OUT/*.log, *.jsonl)
#   MULTI_STEPS="tests group gpu_tests" picks steps; MULTI_TEST_ARGS / GPU_TEST_ARGS add pytest args
#   (e.g. -k tpp) to tests/test_gpu_multi.py / tests/test_gpu.py; GPU1_LIST: the rows timed on GPU 1
set -u
OUT=${OUT:-/tmp/multi_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
export PYTHONUNBUFFERED=1
N=$(nvidia-smi -L | wc -l); nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
STEPS=${MULTI_STEPS:-tests group gpu_tests}
IFS=";" read -r -a GPU1_ROWS <<< "${GPU1_LIST:-fp8c_1gpu|170|--fp8 --compile}"  # run_list rows, ";"-separated

# watched NAME LIMIT CMD...: CMD capped at LIMIT s; stacks + group logs saved if it runs long
watched() {
  local name=$1 limit=$2; shift 2
  echo "[$SECONDS s] $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" &
  local pid=$! t=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2; t=$((t + 2))
    if [ "$t" -eq $((limit - 20)) ]; then
      echo "[$SECONDS s] $name still running: dumping worker stacks"
      pkill -USR1 -f "parallel.worker" ; sleep 3
      nvidia-smi --query-compute-apps=pid,used_memory --format=csv > /tmp/gpu_apps_$name.csv
      tar czf "$OUT/$name-logs.tgz" /tmp/liveavatar-group-* /tmp/gpu_apps_$name.csv 2>/dev/null
    fi
  done
  wait "$pid"; echo "[$SECONDS s] $name rc=$?"
}

case " $STEPS " in *" tests "*)
  watched tests 170 python3 -m pytest -q -s -x -o faulthandler_timeout=140 ${MULTI_TEST_ARGS:-} \
    tests/test_gpu_multi.py > "$OUT/gpu_multi_tests.log" 2>&1
  tail -6 "$OUT/gpu_multi_tests.log";; esac
case " $STEPS " in *" group "*)
  watched group 200 env OUT="$OUT" LIST_BUDGET_S=190 bash bench/run_list.sh \
    "tpp${N}_fp8c|190|--gpus $N --fp8 --compile" | tail -2
  mv "$OUT/list.jsonl" "$OUT/group.jsonl" 2>/dev/null;; esac
case " $STEPS " in *" gpu_tests "*)
  echo "[$SECONDS s] test_gpu.py on GPU 0 | fp8c on GPU 1"
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 180 python3 -m pytest -q -s ${GPU_TEST_ARGS:-} tests/test_gpu.py \
    > "$OUT/gpu_tests.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 OUT=$OUT LIST_BUDGET_S=170 bash bench/run_list.sh "${GPU1_ROWS[@]}" | tail -4
  wait
  tail -4 "$OUT/gpu_tests.log";; esac
echo "[$SECONDS s] done"
