#!/usr/bin/env bash
# Here (a machine with pip and the internet), in the repo root: fetch flash-attn-4 and its needs for the
# device (python 3.12, x86_64, torch 2.11.0+cu130 already there) and lay them out for two device calls,
# each under the 64 MiB a call may carry:
#   .whl1/  part 1 of nvidia_cutlass_dsl_libs_cu13 (a 92 MB wheel), the first 50 MiB
#   .whl2/  part 2 of it + its sha256 + the 7 small wheels (~10 MB)
# Both folders are added to .git/info/exclude (shared by all worktrees). Then, on the device:
#   call 1: bash bench/attn_routes_device.sh stage   carry [".whl1"]
#   call 2: bash bench/attn_routes_device.sh run     carry [".whl2"]   (at once: the machine stays warm 30 s)
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
for d in /.whl1/ /.whl2/; do grep -qxF "$d" "$exclude" || echo "$d" >> "$exclude"; done
rm -rf .whl1 .whl2 && mkdir -p .whl1 .whl2
split -b 50M -a 2 "$DL/$BIG" "$DL/$BIG.part-"  # -> .part-aa (50 MiB), .part-ab (the rest)
mv "$DL/$BIG.part-aa" .whl1/ && mv "$DL/$BIG.part-ab" .whl2/
(cd "$DL" && sha256sum "$BIG") > ".whl2/$BIG.sha256"
for w in "${SMALL[@]}"; do
  name=${w%%==*}; ver=${w#*==}
  cp "$DL"/"${name//-/_}"-"$ver"-*.whl .whl2/
done
du -sh .whl1 .whl2
git status --short --ignored .whl1 .whl2
