#!/usr/bin/env bash
# One device call measures everything (issue 6). Run from the repository root on the GPU machine:
#
#   device run, carry [".whl", "third_party/LiveAvatar"], timeout 600:
#     bash bench/run_device.sh
#
# Prepare here first (once): bash bench/prepare_ref.sh  (reference copy + wheels, both ignored).
# Runs, in order, each in its own process with its own time cap, while the overall budget lasts
# (BENCH_BUDGET_S, default 530 s, so the call ends inside its 10-minute limit):
#   1. reference bf16 eager                 (the baseline every ratio uses)
#   2. ours bf16 eager (+ saves latents of the first 2 blocks for the fp8 PSNR)
#   3. ours fp8 eager (+ PSNR vs 2.)
#   3b. PSNR pair at 384*256 if 2. failed (e.g. out of memory on an 80 GB card)
#   4. ours fp8 eager with cuDNN attention  (the reference's self-attention kernel)
#   5. ours fp8 end to end (DiT + streaming VAE decode + uint8 frames on the CPU)
#   6. ours fp8 eager with float32 RoPE     (the float64 rotation's cost; + PSNR)
#   7. ours fp8 + torch.compile             (capped at BENCH_COMPILE_CAP_S, default 240 s, and the budget)
#   8. reference fp8 eager                  (only if time is left)
# Output: $OUT/bench.jsonl (one JSON line per run), $OUT/bench.log (everything), table at the end,
# $OUT/profile_*.txt + trace_*.json.gz (torch.profiler of one extra block of runs 3 and 7).
set -u
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
LOG="$OUT/bench.log"
JSONL="$OUT/bench.jsonl"
: > "$JSONL"
BUDGET=${BENCH_BUDGET_S:-530}
COMPILE_CAP=${BENCH_COMPILE_CAP_S:-240}
SIZE=${BENCH_SIZE:-704*384}
BLOCKS=${BENCH_BLOCKS:-6}
WARMUP=${BENCH_WARMUP:-4}
REF_DIR=${BENCH_REF_DIR:-third_party/LiveAvatar}
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
PY=${PYTHON:-python3}
START=$SECONDS

log() { echo "[$((SECONDS - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - START))); }

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  log "wheels installed: $(ls .whl | tr '\n' ' ')"
else
  log "no .whl folder carried: the reference needs diffusers (bash bench/prepare_ref.sh, carry .whl)"
fi
nvidia-smi 2>&1 | tee -a "$LOG" | head -20
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, importlib
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for m in ("diffusers", "einops", "transformers", "huggingface_hub", "safetensors"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "MISSING", e)
EOF

# run NAME CAP_S COMMAND...  (appends the command's JSON line to $JSONL; keeps going on failure)
run() {
  local name=$1 cap=$2; shift 2
  local rem; rem=$(left)
  if [ "$rem" -lt 45 ]; then log "SKIP $name: only ${rem}s of budget left"; return 1; fi
  [ "$cap" -gt "$rem" ] && cap=$rem
  log "RUN $name (cap ${cap}s): $*"
  local tmp="/tmp/run_$name.out"
  # the runs stop themselves (and still report) once their time is nearly up; timeout is the backstop
  LIVEAVATAR_BENCH_TIME_LIMIT=$((cap > 60 ? cap - 30 : cap / 2)) timeout -k 15 "$cap" "$@" >"$tmp" 2>>"$LOG"
  local rc=$?
  grep '^{' "$tmp" | tail -1 > "/tmp/$name.json"
  if [ -s "/tmp/$name.json" ]; then
    "$PY" - "$name" "/tmp/$name.json" >>"$JSONL" <<'EOF'
import json, sys
d = json.loads(open(sys.argv[2]).read()); d["run"] = sys.argv[1]; print(json.dumps(d))
EOF
  else
    echo "{\"run\": \"$name\", \"impl\": \"?\", \"error\": \"exit $rc, no JSON (timeout or crash; see bench.log)\"}" >>"$JSONL"
  fi
  cat "$tmp" >>"$LOG"
  log "END $name rc=$rc $(cut -c1-300 "/tmp/$name.json" 2>/dev/null)"
  return $rc
}

# BENCH_EXTRA: extra flags for every run, e.g. "--tiny --device cpu" for a dry run on a CPU machine
read -r -a EXTRA <<< "${BENCH_EXTRA:-}"
COMMON=(--size "$SIZE" --steps 4 --blocks "$BLOCKS" --warmup "$WARMUP" --seed 0 "${EXTRA[@]}")
read -r -a OURS_EXTRA <<< "${BENCH_OURS_EXTRA:-}"  # dry run: "--allow-cpu-fp8"
OURS=("$PY" -m bench --random-weights "${COMMON[@]}" "${OURS_EXTRA[@]}")
HARNESS=("$PY" bench/ref_harness.py --ref-dir "$REF_DIR" "${COMMON[@]}")

PEAK=$("$PY" -c "
import torch; from bench import benchlib; print(round(benchlib.matmul_peak_tflops(torch.device('cuda')), 1))" 2>>"$LOG" || echo "")
log "bf16 matmul peak: ${PEAK:-?} TFLOP/s"
PK=(); [ -n "$PEAK" ] && PK=(--peak-tflops "$PEAK")

run ref_bf16 150 "${HARNESS[@]}" "${PK[@]}"
REFJ=(); [ -s /tmp/ref_bf16.json ] && grep -q '"fps": [0-9]' /tmp/ref_bf16.json && REFJ=(--ref-json /tmp/ref_bf16.json)
rm -f /tmp/lat_bf16.pt
run ours_bf16 120 "${OURS[@]}" "${PK[@]}" "${REFJ[@]}" --save-latents /tmp/lat_bf16.pt
CMP=(); [ -s /tmp/lat_bf16.pt ] && CMP=(--compare-latents /tmp/lat_bf16.pt)
run ours_fp8 150 "${OURS[@]}" "${PK[@]}" "${REFJ[@]}" --fp8 "${CMP[@]}" --profile "$OUT"
if [ ! -s /tmp/lat_bf16.pt ]; then  # bf16 at full size failed (e.g. OOM on 80 GB): PSNR at 384*256
  SMALL=("$PY" -m bench --random-weights --size 384*256 --steps 4 --blocks 1 --warmup 2 --seed 0
         "${EXTRA[@]}" "${PK[@]}")
  run psnr_bf16_small 60 "${SMALL[@]}" --save-latents /tmp/lat_small.pt &&
    run psnr_fp8_small 60 "${SMALL[@]}" --fp8 --compare-latents /tmp/lat_small.pt
fi
run ours_fp8_cudnn 120 "${OURS[@]}" "${PK[@]}" "${REFJ[@]}" --fp8 --attn cudnn
run ours_fp8_e2e 120 "${OURS[@]}" "${PK[@]}" "${REFJ[@]}" --fp8 --scope end_to_end
run ours_fp8_rope32 120 "${OURS[@]}" "${PK[@]}" "${REFJ[@]}" --fp8 --rope-dtype float32 "${CMP[@]}"
run ours_fp8_compile "$COMPILE_CAP" "${OURS[@]}" "${PK[@]}" "${REFJ[@]}" --fp8 --compile "${CMP[@]}" --profile "$OUT"
run ref_fp8 150 "${HARNESS[@]}" "${PK[@]}" --fp8

log "done in $((SECONDS - START))s"
"$PY" bench/table.py "$JSONL" | tee -a "$LOG"
