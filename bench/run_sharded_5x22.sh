#!/usr/bin/env bash
# Five layer-sharded ranks, each capped at 22 GiB, on ONE GPU vs one rank (issue #15), < 10 min:
# 704*384, fp8, 4 steps, 8 blocks (2 clips), full-size random weights, end to end; frames hash
# compared with a single-rank run on the same GPU; per-rank estimate and peak in the JSON line.
# Run on the device with carry [".whl"]:  bash bench/run_sharded_5x22.sh
#   writes $OUT/sharded_5x22.jsonl (+ .log, and the group logs on failure); append that line to
#   bench/results/<date>_h200_sharded_5x22.jsonl here. SHARDED_ARGS adds/overrides arguments.
set -u
OUT=${OUT:-/tmp/sharded_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
timeout -k 10 540 python3 -m bench.sharded --ranks 5 --cap-gib 22 --size 704*384 --fp8 --steps 4 --blocks 8 \
  --json-out "$OUT/sharded_5x22.jsonl" ${SHARDED_ARGS:-} > "$OUT/sharded_5x22.log" 2>&1
rc=$?
echo "rc=$rc"; tail -c 3000 "$OUT/sharded_5x22.log"
[ "$rc" -ne 0 ] && tar czf "$OUT/group-logs.tgz" /tmp/liveavatar-group-* 2>/dev/null
exit $rc
