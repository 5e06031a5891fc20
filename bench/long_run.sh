#!/usr/bin/env bash
# The one-hour run of issue 18 (bench/long_run.py) on the GPU machine.
#
# Here, once (wheels into the ignored .whl/; the device image has neither PyAV nor diffusers):
#   bash bench/long_run.sh prepare
# Device call (carry [".whl"], timeout 600):
#   bash bench/long_run.sh
# Results come back under $OUT (one JSON line + the PNG plot); copy them into bench/results/.
# Environment: LONG_RUN_MINUTES (60), LONG_RUN_BUDGET_S (generation cap, 480 s: the whole call must
# end inside 10 minutes; when the cap stops it early the JSON says complete=false and gives
# projected_full_s; with CUDA graphs, on by default, the hour should take well under it), LONG_RUN_DEVICE (cuda), LONG_RUN_MMAP_THRESHOLD (131072: glibc maps every buffer over
# 128 KiB on its own, so RSS follows live allocations instead of swinging +-50 MB with the allocator's
# retention, as in tests/test_long_memory.py; set it empty for glibc's default).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "prepare" ]; then
  mkdir -p .git/info .whl
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  for pkg in av==18.1.0 diffusers==0.42.1; do
    ls ".whl/${pkg%%==*}-${pkg##*==}-"*.whl >/dev/null 2>&1 || "$PY" -m pip download -q --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      -d .whl "$pkg" || exit 1
  done
  du -sh .whl && ls .whl
  exit 0
fi
export PYTHONUNBUFFERED=1
[ -n "${LONG_RUN_MMAP_THRESHOLD-131072}" ] && export MALLOC_MMAP_THRESHOLD_=${LONG_RUN_MMAP_THRESHOLD-131072}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import av" 2>/dev/null || { echo "error: PyAV is missing: run 'bash bench/long_run.sh prepare' here and carry .whl" >&2; exit 2; }
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee "$RESULTS/long_run_nvidia_smi.txt"
timeout 575 "$PY" -m bench.long_run --minutes "${LONG_RUN_MINUTES:-60}" --device "${LONG_RUN_DEVICE:-cuda}" \
  --budget-s "${LONG_RUN_BUDGET_S:-480}" --results "$RESULTS" "$@" 2>&1 | tee "$RESULTS/long_run.log"
exit "${PIPESTATUS[0]}"
