#!/usr/bin/env bash
# Speed of this tree vs an earlier one, measured back to back on the same GPU (issue 14: a refactor
# must keep the DiT and end-to-end FPS within 2 %). Per variant: the earlier tree's run, then this
# tree's, each its own capped process (bench/capped_run.sh); JSON lines -> $OUT/before_after.jsonl,
# then one line per variant with both FPS and after/before.
#   Prepare here:  rm -rf .before && mkdir .before && git archive REV | tar -x -C .before
#   Device call:   bash bench/run_before_after.sh        (carry [".before"])
#   BA_VARIANTS    default "fp8_compile bf16_compile e2e_fp8_compile" (a subset when the 600 s of
#                  one call do not hold them all: each pair takes about 2-4 min with cold compiles)
#   BA_BEFORE_DIR  (.before), BA_BUDGET_S (560), BA_BLOCKS (6), BA_WARMUP (4), BA_EXTRA ("--tiny
#                  --device cpu" for a dry run), BA_OURS_EXTRA ("--allow-cpu-fp8" for a dry run)
set -u
# shellcheck source=bench/capped_run.sh
source "$(dirname "$0")/capped_run.sh"
start_runs before_after "${BA_BUDGET_S:-560}"
BEFORE=${BA_BEFORE_DIR:-.before}
if [ ! -d "$BEFORE/liveavatar" ]; then
  echo "error: $BEFORE has no liveavatar/; make it with: git archive REV | tar -x -C $BEFORE" >&2; exit 2
fi
# the earlier tree's bench entry point: the bench/ package, or liveavatar.bench before it moved
BEFORE_MOD=bench; [ -f "$BEFORE/bench/cli.py" ] || BEFORE_MOD=liveavatar.bench
read -r -a EXTRA <<< "${BA_EXTRA:-}"
read -r -a OEXTRA <<< "${BA_OURS_EXTRA:-}"
COMMON=(--random-weights --size "${BA_SIZE:-704*384}" --steps 4 --blocks "${BA_BLOCKS:-6}"
        --warmup "${BA_WARMUP:-4}" --seed 0 "${EXTRA[@]}" "${OEXTRA[@]}")
for v in ${BA_VARIANTS:-fp8_compile bf16_compile e2e_fp8_compile}; do
  case $v in
    fp8_compile) A=(--fp8 --compile); cap=200 ;;
    bf16_compile) A=(--compile); cap=200 ;;
    e2e_fp8_compile) A=(--fp8 --compile --scope end_to_end); cap=260 ;;
    *) echo "error: unknown variant $v" >&2; exit 2 ;;
  esac
  capped_run "before_$v" "$cap" env -C "$BEFORE" "$PY" -m "$BEFORE_MOD" "${COMMON[@]}" "${A[@]}"
  capped_run "after_$v" "$cap" "$PY" -m bench "${COMMON[@]}" "${A[@]}"
done
print_runs "$J"
"$PY" - "$J" <<'PYEOF'
import json, sys
runs = {d["run"]: d for d in map(json.loads, open(sys.argv[1]))}
for name in [n[len("after_"):] for n in runs if n.startswith("after_")]:
    b, a = runs.get("before_" + name, {}).get("fps"), runs["after_" + name].get("fps")
    ratio = f"{a / b:.4f}" if a and b else "n/a"
    print(f"{name:18s} fps before {b} after {a} after/before {ratio}")
PYEOF
