#!/usr/bin/env bash
# Prepare (here, not on the GPU machine) what bench/run_device.sh needs beside the repository:
#   third_party/LiveAvatar/  the reference's Python package, copied from a local checkout
#                            (git-ignored; never commit it)
#   .whl/                    wheels the device image lacks (diffusers; excluded via .git/info/exclude)
# Usage: bash bench/prepare_ref.sh [/path/to/LiveAvatar]   (default /work/ref/LiveAvatar)
set -euo pipefail
SRC=${1:-/work/ref/LiveAvatar}
cd "$(dirname "$0")/.."
if [ ! -f "$SRC/liveavatar/models/wan/causal_model_s2v.py" ]; then
  echo "error: $SRC is not a LiveAvatar checkout (liveavatar/models/wan/causal_model_s2v.py missing)" >&2
  exit 2
fi
git check-ignore -q third_party/LiveAvatar || { echo "error: third_party/ is not git-ignored" >&2; exit 2; }
rm -rf third_party/LiveAvatar
mkdir -p third_party/LiveAvatar
cp -r "$SRC/liveavatar" third_party/LiveAvatar/
[ -f "$SRC/LICENSE" ] && cp "$SRC/LICENSE" third_party/LiveAvatar/
find third_party/LiveAvatar -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .git/info
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
# diffusers: imported by the reference model (ModelMixin/ConfigMixin, AdaLayerNorm) and by our
# scheduler/VAE; pure Python; its other needs are in the device image (PyTorch 2.11, hub 1.33).
ls .whl/diffusers-0.42.1-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl diffusers==0.42.1
du -sh third_party/LiveAvatar .whl
