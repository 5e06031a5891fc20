"""The newcomer path: the README's Quick start commands work on a fresh clone, and CI runs the
README's test command.

- `test_readme_demo_command_on_a_fresh_clone` (slow, runs in CI): `git clone --no-local` of this
  repository's committed HEAD into a temp dir, then the FIRST command of the first code block
  under `## Quick start` of the CLONED README, run exactly as written with bash. To keep CI time
  sane the clone reuses this test run's Python environment through `LIVEAVATAR_VENV` (dev.sh then
  skips creating `.venv`; everything else - tiny checkpoint, assets, output - is the clone's own).
  It checks the exit status, the printed summary (`wrote <path>`, `effective size WxH, F fps,
  N frames`) and the mp4 itself through PyAV (`probe_video`): size, fps, frame count, audio track.
- `test_ci_runs_the_readme_test_command`: `.ci/run` executes the README's second command.
- `test_readme_documents_every_cli_flag`: every option of the CLI appears in the README.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUMMARY_PATH = re.compile(r"^wrote (?P<path>.+\.mp4)\s*$", re.M)
SUMMARY_SIZE = re.compile(r"^effective size (?P<w>\d+)x(?P<h>\d+), (?P<fps>\d+(?:\.\d+)?) fps, "
                          r"(?P<frames>\d+) frames", re.M)


def quick_start_commands(readme: str) -> list[str]:
    """Commands of the first fenced code block under the `## Quick start` heading.

    Blank lines and `#` comment lines are skipped; a trailing backslash joins lines.
    """
    m = re.search(r"^## Quick start[^\n]*\n(?P<body>.*?)(?=^## |\Z)", readme, re.M | re.S)
    if m is None:
        raise AssertionError("README.md has no '## Quick start' section")
    block = re.search(r"^```[^\n]*\n(?P<code>.*?)^```", m.group("body"), re.M | re.S)
    if block is None:
        raise AssertionError("README.md: no code block under '## Quick start'")
    commands, pending = [], ""
    for line in block.group("code").splitlines():
        text = line.strip()
        if not pending and (not text or text.startswith("#")):
            continue
        if text.endswith("\\"):
            pending += text[:-1].rstrip() + " "
            continue
        commands.append((pending + text).strip())
        pending = ""
    return commands


def ci_command(script: str) -> str:
    """The command `.ci/run` ends with (its last non-comment line, without `exec`)."""
    lines = [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    last = lines[-1]
    return last[len("exec "):].strip() if last.startswith("exec ") else last


def test_quick_start_parser() -> None:
    text = ("# X\n\nintro\n\n## Quick start\n\nsome words\n\n```bash\n# comment\n./a one \\\n  two\n\n"
            "./b\n```\n\n```bash\n./c\n```\n## Next\n```\n./d\n```\n")
    assert quick_start_commands(text) == ["./a one two", "./b"]
    with pytest.raises(AssertionError):
        quick_start_commands("# X\n## Install\n```\n./a\n```\n")
    assert ci_command("#!/bin/bash\nset -e\ncd x\nexec ./dev.sh test\n") == "./dev.sh test"


def test_readme_quick_start_has_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    cmds = quick_start_commands(readme)
    assert len(cmds) == 2, f"the Quick start's first code block must hold exactly two commands, got {cmds}"
    # the README must open with what the pack does, before the Quick start
    intro = readme.split("## Quick start", 1)[0]
    assert len(re.sub(r"[#!\[\]()`*_\s]", "", intro)) > 200, "README must start with what the pack does"


def test_ci_runs_the_readme_test_command() -> None:
    readme_test = quick_start_commands((REPO / "README.md").read_text(encoding="utf-8"))[1]
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert ci_command(script) == readme_test, (
        f".ci/run runs {ci_command(script)!r} but the README's test command is {readme_test!r}")
    assert "cd \"$(dirname \"$0\")/..\"" in script, ".ci/run must run from the repository root"
    assert os.access(REPO / ".ci" / "run", os.X_OK) and os.access(REPO / "dev.sh", os.X_OK)


def test_readme_documents_every_cli_flag() -> None:
    """Each option of `python -m liveavatar generate|demo|make-tiny-checkpoint` is named in the README."""
    from liveavatar.cli import build_parser

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = []
    for name in ("generate", "demo", "make-tiny-checkpoint"):
        for action in sub.choices[name]._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help" and f"`{opt}" not in readme:
                    missing.append(f"{name} {opt}")
    assert not missing, f"README.md does not document: {', '.join(missing)}"


@pytest.mark.slow
def test_readme_demo_command_on_a_fresh_clone(tmp_path: Path) -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    git = shutil.which("git")
    assert git, "git is needed to clone the repository"
    clone = tmp_path / "clone"
    subprocess.run([git, "clone", "--quiet", "--no-local", str(REPO), str(clone)], check=True,
                   capture_output=True, timeout=120)
    assert not (clone / ".venv").exists() and not (clone / "output").exists()

    command = quick_start_commands((clone / "README.md").read_text(encoding="utf-8"))[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LIVEAVATAR_"))}
    env["LIVEAVATAR_VENV"] = sys.prefix  # reuse this environment instead of installing a new one
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    log = f"command: {command}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log

    m_path, m_size = SUMMARY_PATH.search(proc.stdout), SUMMARY_SIZE.search(proc.stdout)
    assert m_path and m_size, f"the demo must print the mp4 path, size, fps and frames\n{log}"
    out = Path(m_path.group("path"))
    assert out.is_absolute() and out.is_file(), log
    assert out.resolve().is_relative_to(clone.resolve()), f"the clone's demo wrote outside the clone: {out}"
    assert not (clone / ".venv").exists(), "LIVEAVATAR_VENV was ignored: a .venv was created"

    from liveavatar.media.video_writer import probe_video

    info = probe_video(out)
    w, h = int(m_size.group("w")), int(m_size.group("h"))
    assert (info["width"], info["height"]) == (w, h), (info, log)
    assert info["frames"] == int(m_size.group("frames")) > 0, (info, log)
    assert abs(float(info["fps"]) - float(m_size.group("fps"))) < 1e-6, info
    assert info["audio_rate"] and info["audio_duration_s"] > 0, f"no audio track: {info}"
    assert abs(info["audio_duration_s"] - info["duration_s"]) <= 1.0 / float(info["fps"]) + 1e-3, info
    assert not info["truncated"], info

    # idempotent: a second run reuses the tiny checkpoint and rewrites the same file
    ckpt = clone / ".cache" / "tiny-ckpt" / "config.json"
    assert ckpt.is_file(), "the demo should keep its tiny checkpoint in .cache/tiny-ckpt"
