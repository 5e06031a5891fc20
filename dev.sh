#!/usr/bin/env bash
# One entry point for a fresh clone: `./dev.sh demo` (setup + tiny avatar video) and
# `./dev.sh test` (setup + the whole test suite). Both are idempotent.
#
# Environment:
#   PYTHON=python3.11        interpreter used to create .venv (default python3)
#   LIVEAVATAR_VENV=/path    use this existing virtual environment instead of ./.venv; dev.sh
#                            neither creates it nor installs into it, it only checks that the
#                            packages of requirements-dev.txt import (used by the clone test)
set -euo pipefail
if [ -n "${LIVEAVATAR_VENV:-}" ]; then
  # resolve before the cd below, so a relative path means "relative to where you are"
  if ! VENV=$(cd "$LIVEAVATAR_VENV" 2>/dev/null && pwd); then
    echo "error: LIVEAVATAR_VENV=$LIVEAVATAR_VENV is not a directory; unset it to use ./.venv" >&2
    exit 2
  fi
fi
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
setup() {
  if [ -n "${LIVEAVATAR_VENV:-}" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
      echo "error: LIVEAVATAR_VENV=$VENV has no bin/python; unset it to use ./.venv" >&2
      exit 2
    fi
    # find_spec only: no heavy import here
    "$VENV/bin/python" - <<'EOF' || exit 2
import importlib.util, sys
mods = ("torch", "torchaudio", "av", "safetensors", "numpy", "PIL", "transformers", "diffusers",
        "tokenizers", "sentencepiece", "psutil", "ftfy", "soxr", "pytest")
missing = [m for m in mods if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: LIVEAVATAR_VENV={sys.prefix} lacks {', '.join(missing)}; install "
             "requirements-dev.txt into it, or unset LIVEAVATAR_VENV to use ./.venv")
EOF
    return
  fi
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
