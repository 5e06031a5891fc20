# Shared by bench/run_speed.sh and bench/run_list.sh (source it; needs OUT, J, BUDGET, START, PY).
# capped_run NAME CAP CMD...: run CMD in its own process, capped at CAP seconds and at the budget
# left (skipped below 40 s); its last JSON line, tagged with "run": NAME (and "bench_args":
# $BENCH_ARGS_NOTE when set), is appended to $J. Returns 1 when skipped.
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
