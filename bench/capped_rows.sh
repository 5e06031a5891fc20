#!/usr/bin/env bash
# Issue 15's one-rank rows on an emulated smaller card (one H200), full-size random weights built
# the product's way, fp8, compiled, 4 steps, end to end (bench/placement.py, bench/cli.py):
#   cap22_704x384   --memory-cap-gb 22 --size 704*384   (target >= 6 FPS; bytes per block, PCIe 4 projection)
#   cap22_384x256   --memory-cap-gb 22 --size 384*256   (target >= 12 FPS)
#   cap46_704x384   --memory-cap-gb 46 --size 704*384   (target >= 13 FPS)
# (The five-rank sharded row is bench/ of the sharded layout, not here.) Optional rows, not run
# unless named in CAPPED_ROWS: stream_all_704x384 / diag_all_704x384 (every DiT block streamed,
# step caches resident, uncapped, DiT scope; without / with the batched TPP diagonal).
#
#   device run (nvidia-h200), timeout 600:   bash bench/capped_rows.sh
#
# Resumable: a row is done when a JSON line of the bench with its "run" name (fps, or the bench's
# own error: preflight refusal, out of memory; not a timeout without JSON) is in
# bench/results/<date>_h200_capped_rows.jsonl of the tree, or in $CAPPED_STATE
# (default /tmp/capped_rows_state.jsonl, kept while the machine stays warm). Each call runs the
# rows not done yet, each in its own process capped at CAPPED_ROW_CAP_S (default 330 s), while
# CAPPED_BUDGET_S (default 560 s) lasts, and prints a table; call it again until it says
# "all rows done". The results file comes back under $OUT: copy it to bench/results/ (and commit)
# so that a fresh machine resumes too. CAPPED_ROWS="cap46_704x384 ..." picks rows; CAPPED_FORCE=1
# reruns done ones; CAPPED_EXTRA adds bench flags (e.g. "--tiny --device cpu" for a dry run);
# CAPPED_BLOCKS / CAPPED_WARMUP: timed / warm-up blocks (default 6 / 4). The 22 GiB 704*384 row of
# issue 15 (placement, re-fit after load, estimate vs peak), alone:
#   CAPPED_ROWS=cap22_704x384 CAPPED_FORCE=1 CAPPED_BLOCKS=4 CAPPED_WARMUP=2 bash bench/capped_rows.sh
# Columns: W = resident DiT blocks (placed>after the re-fit), plan = the placement's job estimate
# (GiB), free / cache = driver-free GiB and the allocator's cache at the caches' preflight.
set -u
# shellcheck source=bench/capped_run.sh
source "$(dirname "$0")/capped_run.sh"
start_runs capped_rows "${CAPPED_BUDGET_S:-560}"
# fewer fragmentation losses under the allocator cap (the caps leave little slack by design);
# CAPPED_ALLOC=default runs with PyTorch's default segments (what the CLI and ComfyUI get unless set)
if [ "${CAPPED_ALLOC:-}" = default ]; then unset PYTORCH_CUDA_ALLOC_CONF; else
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}; fi
DATE=$(date -u +%F)
RESULTS=bench/results/${DATE}_h200_capped_rows.jsonl
STATE=${CAPPED_STATE:-/tmp/capped_rows_state.jsonl}
touch "$STATE"
read -r -a EXTRA <<< "${CAPPED_EXTRA:-}"
BENCH=("$PY" -m bench --random-weights --fp8 --compile --scope end_to_end --steps 4 --seed 0
       --blocks "${CAPPED_BLOCKS:-6}" --warmup "${CAPPED_WARMUP:-4}" --peak-tflops "${CAPPED_PEAK:-738}" "${EXTRA[@]}")
declare -A ROW_ARGS=(
  [cap22_704x384]="--memory-cap-gb 22 --size 704*384"
  [cap22_384x256]="--memory-cap-gb 22 --size 384*256"
  [cap46_704x384]="--memory-cap-gb 46 --size 704*384"
  # optional (CAPPED_ROWS=...): the diagonal lever, every block streamed, caches resident, uncapped
  [stream_all_704x384]="--scope dit --weights stream --resident-layers 0,40 --size 704*384"
  [diag_all_704x384]="--scope dit --diagonal --weights stream --resident-layers 0,40 --size 704*384"
)
read -r -a ROWS <<< "${CAPPED_ROWS:-cap22_704x384 cap22_384x256 cap46_704x384}"

is_done() {  # is_done NAME: a finished line for NAME in the results or the state file
  [ "${CAPPED_FORCE:-0}" = 1 ] && return 1
  cat "$RESULTS" "$STATE" 2>/dev/null | "$PY" -c "
import json, sys
for line in sys.stdin:
    try:
        d = json.loads(line)
    except ValueError:
        continue
    if d.get('run') == sys.argv[1] and d.get('impl') == 'ours':  # the bench's own line (fps, or its error)
        sys.exit(0)
sys.exit(1)" "$1"
}

nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>&1 | head -3
mkdir -p bench/results
for name in "${ROWS[@]}"; do
  if [ -z "${ROW_ARGS[$name]:-}" ]; then echo "unknown row $name (rows: ${!ROW_ARGS[*]})"; continue; fi
  if is_done "$name"; then echo "done already: $name"; continue; fi
  read -r -a ARGS <<< "${ROW_ARGS[$name]}"
  capped_run "$name" "${CAPPED_ROW_CAP_S:-330}" "${BENCH[@]}" "${ARGS[@]}" || break
  tail -1 "$J" | "$PY" -c "
import json, sys
d = json.loads(sys.stdin.read())
d['command'] = ' '.join(sys.argv[2:])
d['date'] = sys.argv[1]
print(json.dumps(d))" "$(date -u +%FT%TZ)" python -m bench "${BENCH[@]:3}" "${ARGS[@]}" | tee -a "$STATE" >> "$RESULTS"
done

left=0
for name in "${ROWS[@]}"; do is_done "$name" || left=$((left + 1)); done
cp "$RESULTS" "$OUT/" 2>/dev/null
"$PY" - "$RESULTS" <<'PYEOF'
import json, sys
r = lambda x, n=2: round(x, n) if isinstance(x, (int, float)) and x is not None else x
print(f"{'run':15s} {'fps':>6s} {'ttff':>6s} {'est':>6s} {'peak':>6s} {'e/p':>5s} {'W':>5s} {'KV':>3s} "
      f"{'GB/blk':>7s} {'GB/s':>6s} {'pcie4':>6s} {'plan':>5s} {'free':>5s} {'cache':>5s}  error")
for line in open(sys.argv[1]):
    d = json.loads(line)
    gb = (d.get("h2d_bytes_per_block") or 0) / 1e9
    placed, final = d.get("resident_layers_placed"), d.get("resident_layers")
    w = f"{placed}>{final}" if placed is not None and final is not None and placed != final else str(final or placed)
    # the placement's job estimate; at the caches' preflight (after loading): driver-free GiB and
    # the allocator's cache (reserved - allocated) that the preflight releases first
    at = {m.get("at"): m for m in d.get("memory_trace") or []}.get("vae_loaded", {})
    cache = at["reserved_gib"] - at["allocated_gib"] if at else None
    print(f"{d.get('run', '?'):15s} {r(d.get('fps'))!s:>6s} {r(d.get('ttff_s'), 0)!s:>6s} {r(d.get('estimate_gib'), 1)!s:>6s} "
          f"{r(d.get('peak_gib'), 1)!s:>6s} {r(d.get('estimate_vs_peak'))!s:>5s} {w:>5s} "
          f"{d.get('resident_kv_layers')!s:>3s} {gb:7.1f} {r(d.get('copy_gbps'), 1)!s:>6s} "
          f"{r(d.get('projected_fps_pcie4'))!s:>6s} {r(d.get('placement_estimate_gib'), 1)!s:>5s} "
          f"{r(at.get('free_gib'), 1)!s:>5s} {r(cache, 2)!s:>5s}  {str(d.get('error') or '')[:160]}")
PYEOF
if [ "$left" -eq 0 ]; then echo "all rows done: $RESULTS (also in \$OUT)"; else echo "$left row(s) left: call again"; fi
