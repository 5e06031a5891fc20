#!/usr/bin/env bash
# One entry point for a fresh clone: `./dev.sh demo` (setup + tiny avatar video) and
# `./dev.sh test` (setup + the whole test suite). Both are idempotent.
# `./dev.sh comfyui DEST` (what .ci/run calls) sets up the ComfyUI snapshot of ../shared at DEST,
# sharing this environment, for the ComfyUI and browser tests: `COMFYUI_DIR=DEST ./dev.sh test`.
#
# Environment:
#   PYTHON=python3.11        interpreter used to create .venv (default python3)
#   LIVEAVATAR_VENV=/path    use this existing virtual environment instead of ./.venv; dev.sh
#                            neither creates it nor installs into it (`comfyui` excepted), it
#                            only checks that the packages of requirements-dev.txt import (used
#                            by the clone test)
#   COMFYUI_DIR=/path        ComfyUI checkout for the ComfyUI tests; default: the ComfyUI that
#                            holds this pack (../../main.py, as in ComfyUI/custom_nodes/<pack>)
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
  comfyui)
    dest=${2:?usage: ./dev.sh comfyui DEST}
    setup
    snapshot=$(ls ../shared/comfyui/ComfyUI-*.tar.gz 2>/dev/null | head -n 1)
    if [ -z "$snapshot" ]; then
      echo "error: no ComfyUI snapshot at ../shared/comfyui/ComfyUI-*.tar.gz" >&2
      exit 2
    fi
    # ComfyUI's requirements go into this environment; its torch stays ours (checked below)
    COMFY_VENV=$VENV bash ../shared/tools/comfyui-headless.sh "$snapshot" "$dest"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-ci.txt
    "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md, re
pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("requirements-dev.txt").read(), re.M)
moved = [f"{n} {md.version(n)} (pinned {v})" for n, v in pins if md.version(n).split("+")[0] != v]
if moved:
    raise SystemExit("error: ComfyUI's requirements moved pinned packages: " + ", ".join(moved))
EOF
    ;;
  test)
    setup
    shift
    # `cd` walks `..` through the logical path: right also when custom_nodes/<pack> is a symlink
    around=$(cd "$PWD/../.." && pwd)
    if [ -z "${COMFYUI_DIR:-}" ] && [ -f "$around/main.py" ] && [ -d "$around/comfy" ]; then
      export COMFYUI_DIR=$around
      echo "ComfyUI tests use the ComfyUI around this pack: COMFYUI_DIR=$COMFYUI_DIR"
    fi
    set +e
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=25 "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
    exit "$rc"
    ;;
  *)
    echo "usage: ./dev.sh demo|test [pytest args] | ./dev.sh comfyui DEST" >&2
    exit 2
    ;;
esac
