#!/usr/bin/env bash
# Every GPU check this pack still owes, in one device call (about 9 minutes on one H100/H200):
#   1. tests/test_gpu.py (bf16 vs fp32, worker groups, CUDA graphs, KV offload paging, fp8 load peak)
#      and, with 2+ GPUs, tests/test_gpu_multi.py (TPP over NCCL = one GPU, killed rank, group bench)
#   2. the DiT / end-to-end speed rows with the reference in the same call, and KV offload's price
# Run on the device with carry [".whl", "third_party/LiveAvatar"] (bash bench/prepare_ref.sh first):
#   bash bench/run_pending_gpu.sh        # writes $OUT/gpu_tests.log, $OUT/list.jsonl
set -u
OUT=${OUT:-/tmp/pending_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python3 -m pytest -q -s tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # multi-GPU kinds: NCCL groups, kill a rank, group bench
  timeout 300 python3 -m pytest -q -s tests/test_gpu_multi.py > "$OUT/gpu_multi_tests.log" 2>&1
  tail -3 "$OUT/gpu_multi_tests.log"
fi
OUT=$OUT LIST_BUDGET_S=${LIST_BUDGET_S:-330} bash bench/run_list.sh \
  "ref_bf16|90|REF" \
  "fp8c|100|--fp8 --compile" \
  "e2e_fp8c|190|--fp8 --compile --scope end_to_end" \
  "fp8c_kv_offload|100|--fp8 --compile --kv-offload on" \
  "fp8c_kv_prefetch|100|--fp8 --compile --kv-offload on --kv-prefetch" \
  "bf16c|100|--compile"
