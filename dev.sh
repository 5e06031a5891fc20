#!/usr/bin/env bash
# One entry point for a fresh clone: `./dev.sh demo` (setup + tiny avatar video) and
# `./dev.sh test` (setup + the whole test suite). Both are idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
setup() {
  if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
  stamp="$VENV/.deps-$(cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt
    touch "$stamp"
  fi
}
case "${1:-}" in
  demo)
    setup
    shift
    exec "$VENV/bin/python" -m liveavatar demo "$@"
    ;;
  test)
    setup
    shift
    set +e
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
    exit "$rc"
    ;;
  *)
    echo "usage: ./dev.sh demo|test [args]" >&2
    exit 2
    ;;
esac
