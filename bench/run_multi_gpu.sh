#!/usr/bin/env bash
# Multi-GPU checks in one device call (kind nvidia-h100-x2 or larger), under 10 minutes:
#   1. tests/test_gpu_multi.py: TPP over NCCL = one GPU, a killed rank is reported, group bench (tiny)
#   2. the worker-group benchmark at 704*384, fp8 + compile, TPP over every GPU (end to end)
#   3. tests/test_gpu.py on GPU 0 while GPU 1 times the single-GPU fp8 + compile DiT (same call)
# Run on the device with carry [".whl"]:  bash bench/run_multi_gpu.sh   (writes $OUT/*.log, list.jsonl)
set -u
OUT=${OUT:-/tmp/multi_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
N=$(nvidia-smi -L | wc -l); nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "[$SECONDS s] test_gpu_multi"
timeout -k 10 200 python3 -m pytest -q -s tests/test_gpu_multi.py > "$OUT/gpu_multi_tests.log" 2>&1
tail -4 "$OUT/gpu_multi_tests.log"
echo "[$SECONDS s] group bench on $N GPUs"
OUT=$OUT LIST_BUDGET_S=200 bash bench/run_list.sh "tpp${N}_fp8c|200|--gpus $N --fp8 --compile" | tail -2
mv "$OUT/list.jsonl" "$OUT/group.jsonl"
echo "[$SECONDS s] test_gpu.py on GPU 0 | fp8c on GPU 1"
CUDA_VISIBLE_DEVICES=0 timeout -k 10 180 python3 -m pytest -q -s tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 OUT=$OUT LIST_BUDGET_S=170 bash bench/run_list.sh "fp8c_1gpu|170|--fp8 --compile" | tail -2
wait
tail -4 "$OUT/gpu_tests.log"
echo "[$SECONDS s] done"
