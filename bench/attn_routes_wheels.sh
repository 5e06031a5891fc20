#!/usr/bin/env bash
# Here (a machine with pip and the internet), in the repo root: fetch flash-attn-4 and its needs for the
# device (python 3.12, x86_64, torch 2.11.0+cu130 already there) and lay them out for device calls,
# each under the 64 MiB a call may carry together with the tracked tree (38 MB since the reference
# fixtures moved into tests/):
#   .whl1/ .. .whl<N-1>/  parts of nvidia_cutlass_dsl_libs_cu13 (a 92 MB wheel), PART_MB (20) MiB each
#   .whl<N>/              its last part + its sha256 + the 7 small wheels (~10 MB)
# The folders are added to .git/info/exclude (shared by all worktrees). Then, on the device, back to back
# (each call within 30 s of the last one's return: the machine stays warm and keeps /tmp):
#   calls 1..N-1: bash bench/attn_routes_device.sh stage   carry [".whl<k>"]
#   call N:       bash bench/attn_routes_device.sh run     carry [".whl<N>"]
# Everything else the wheels require (einops, typing-extensions, protobuf, cuda-bindings, torch) is in
# the device image (.library/device/KINDS.md). Not fetched: nvidia-cutlass-dsl-libs-cu12 (the cu12
# flavour; the cu13 one is chosen for a CUDA 13 driver) and the "sass" extra (nvdisasm).
set -euo pipefail
PY=${PYTHON:-python3}
DL=${ATTN_WHEELS_DL:-/tmp/attn_routes_wheels}
BIG=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
SMALL=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
       nvidia-cutlass-dsl-libs-core==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5)
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do PLAT+=(--platform "$p"); done
mkdir -p "$DL"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d "$DL" "${SMALL[@]}" nvidia-cutlass-dsl-libs-cu13==4.8.1
exclude="$(git rev-parse --git-common-dir)/info/exclude"
rm -rf .whl[0-9]* "$DL/$BIG.part-"*
split -b "${PART_MB:-20}M" -a 2 "$DL/$BIG" "$DL/$BIG.part-"  # -> .part-aa, .part-ab, ... (in order)
parts=("$DL/$BIG.part-"*)
n=${#parts[@]}
for k in $(seq 1 "$n"); do
  grep -qxF "/.whl$k/" "$exclude" || echo "/.whl$k/" >> "$exclude"
  mkdir -p ".whl$k" && mv "${parts[$((k - 1))]}" ".whl$k/"
done
(cd "$DL" && sha256sum "$BIG") > ".whl$n/$BIG.sha256"
for w in "${SMALL[@]}"; do
  name=${w%%==*}; ver=${w#*==}
  cp "$DL"/"${name//-/_}"-"$ver"-*.whl ".whl$n/"
done
du -sh .whl[0-9]*
git status --short --ignored .whl[0-9]*
echo "device: calls 1..$((n - 1)) 'stage' with carry .whl<k>, call $n 'run' with carry .whl$n"
