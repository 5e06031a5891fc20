# Shared by bench/run_speed.sh, bench/run_list.sh and bench/run_before_after.sh (source it).
# start_runs NAME BUDGET_S: OUT (default /tmp/NAME_out), J = $OUT/NAME.jsonl (emptied), the time
# budget from now, unbuffered Python with a shared inductor cache, PY (default python3).
# print_runs FILE: one summary line per JSON line of FILE (what the device call prints).
# capped_run NAME CAP CMD...: run CMD in its own process, capped at CAP seconds and at the budget
# left (skipped below 40 s); its last JSON line, tagged with "run": NAME (and "bench_args":
# $BENCH_ARGS_NOTE when set), is appended to $J. Returns 1 when skipped.
start_runs() {
  OUT=${OUT:-/tmp/$1_out}; mkdir -p "$OUT"
  J="$OUT/$1.jsonl"; : > "$J"
  BUDGET=$2; START=$SECONDS
  export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
  PY=${PYTHON:-python3}
}

capped_run() {
  local name=$1 cap=$2; shift 2
  local rem=$((BUDGET - (SECONDS - START)))
  if [ "$rem" -lt 40 ]; then echo "SKIP $name (${rem}s left)"; return 1; fi
  [ "$cap" -gt "$rem" ] && cap=$rem
  echo "[$((SECONDS - START))s] RUN $name cap ${cap}s${BENCH_ARGS_NOTE:+: $BENCH_ARGS_NOTE}"
  LIVEAVATAR_BENCH_TIME_LIMIT=$((cap - 25)) timeout -k 10 "$cap" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$? line
  line=$(grep '^{' "$OUT/$name.out" | tail -1)
  [ -z "$line" ] && line="{\"impl\": \"?\", \"error\": \"exit $rc, no JSON\"}"
  echo "$line" | "$PY" -c "
import json, sys
d = json.loads(sys.stdin.read())
d['run'] = sys.argv[1]
if sys.argv[2]:
    d['bench_args'] = sys.argv[2]
print(json.dumps(d))" "$name" "${BENCH_ARGS_NOTE:-}" >> "$J"
  echo "[$((SECONDS - START))s] END $name rc=$rc"; [ "$rc" -ne 0 ] && tail -5 "$OUT/$name.err"
  return 0
}

print_runs() {
  "$PY" - "$1" <<'PYEOF'
import json, sys
r = lambda x, n=2: round(x, n) if isinstance(x, float) else x
for l in open(sys.argv[1]):
    d = json.loads(l)
    v = d.get("vs_saved_latents") or {}
    print(f"{d.get('run'):20s} fps {r(d.get('fps'))} block_ms {r(d.get('block_ms'), 1)} peak {d.get('peak_mem_gb')} "
          f"cache {d.get('cache_gib')} compile_s {r(d.get('compile_s'), 1)} recomp {d.get('recompiles')}/{d.get('recompiles_timed')} "
          f"graphs {d.get('graphs')} cuda_graphs {d.get('graph_captures')}/{d.get('graph_replays')} psnr {v.get('psnr_db')} "
          f"rope {d.get('rope_dtype')} all {[round(x) for x in d.get('block_ms_all') or []]} err {str(d.get('error'))[:300]}")
PYEOF
}
