"""The newcomer path: the README's Quick start commands work on a fresh clone, and CI runs the
README's test command.

- `test_readme_demo_command_on_a_fresh_clone` and `test_readme_test_command_on_a_fresh_clone`
  (slow, run in CI): `git clone --no-local` of this repository's committed HEAD into
  `<tmp>/ComfyUI/custom_nodes/ComfyUI-LiveAvatar` with nothing beside it, then the two commands of
  the first code block under `## Quick start` of the CLONED README, run exactly as written with
  bash. To keep CI time sane the clone reuses this test run's Python environment through
  `LIVEAVATAR_VENV` (dev.sh then skips creating `.venv`; everything else - tiny checkpoint,
  fixtures, assets, output - is the clone's own). The demo: exit status, the printed summary
  (`wrote <path>`, `effective size WxH, F fps, N frames`) and the mp4 itself through PyAV
  (`probe_video`): size, fps, frame count, audio track. The test command: pytest's summary shows
  passes and no failure or error. That nested run has `LIVEAVATAR_NEWCOMER_RUN=sample`: these
  clone tests skip there instead of recursing; it imports every test module and runs the quick
  tests that read the reference fixtures and the first quick test of each module (conftest.py; the
  outer run has run them all), so that CI stays within its 30 minutes. The other clone tests'
  nested runs (`LIVEAVATAR_NEWCOMER_RUN=1`) leave out only the `slow` tests.
- `test_other_folder_names_collect_and_pass`: clones named `comfyui-liveavatar` and `comfyui_liveavatar`
  run a few test files (the pack's own import included) without errors.
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

from conftest import NEWCOMER_RUN, NEWCOMER_SAMPLE
from test_nodes_support import COMFYUI_DIR, needs_comfy

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


# Set in the environment of the suite that `test_readme_test_command_on_a_fresh_clone` runs inside
# the clone: that nested run does not clone and run itself again, and leaves out the slow tests.
NESTED = NEWCOMER_RUN
outer_run_only = pytest.mark.skipif(bool(os.environ.get(NESTED)),
                                    reason="inside the newcomer test's own run of the suite (no recursion)")
SUMMARY = re.compile(r"^=*\s*(?P<counts>\d+ \w+(?:, \d+ \w+)*) in [\d.]+s", re.M)


def clone_as_newcomer(tmp_path: Path, folder: str = "ComfyUI-LiveAvatar") -> Path:
    """`git clone --no-local` of the committed HEAD to <tmp>/ComfyUI/custom_nodes/<folder>, where
    the README's install section puts it; nothing else is beside it (no ../shared, no ComfyUI)."""
    if not (REPO / ".git").exists():
        pytest.fail("not a git checkout: the newcomer tests clone the repository")
    git = shutil.which("git")
    assert git, "git is needed to clone the repository"
    clone = tmp_path / "ComfyUI" / "custom_nodes" / folder
    clone.parent.mkdir(parents=True)
    subprocess.run([git, "clone", "--quiet", "--no-local", str(REPO), str(clone)], check=True,
                   capture_output=True, timeout=120)
    assert [p.name for p in clone.parent.iterdir()] == [folder]
    assert not (clone / ".venv").exists() and not (clone / "output").exists()
    return clone


def newcomer_env() -> dict[str, str]:
    """This environment as a newcomer's shell would have it: no pytest, LIVEAVATAR_*, COMFYUI_*,
    PYTHONPATH or CI variables; this run's Python environment reused through LIVEAVATAR_VENV (dev.sh
    then skips creating .venv; everything else is the clone's own)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "LIVEAVATAR_", "COMFYUI_")) and k not in ("CI", "PYTHONPATH")}
    env["LIVEAVATAR_VENV"] = sys.prefix
    env[NESTED] = "1"
    return env


def run_in_clone(clone: Path, command: str, timeout: float,
                 **extra_env: str) -> tuple[subprocess.CompletedProcess, str]:
    proc = subprocess.run(["bash", "-c", command], cwd=clone, env={**newcomer_env(), **extra_env},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    log = f"command: {command}\nstdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc, log


def pytest_counts(output: str) -> dict[str, int]:
    """{"passed": N, "skipped": N, ...} from pytest's last summary line (-q or not)."""
    found = SUMMARY.findall(output)
    assert found, f"no pytest summary line in:\n{output[-3000:]}"
    counts = {}
    for part in found[-1].split(", "):
        n, word = part.split(" ", 1)
        counts[word] = int(n)
    return counts


def test_pytest_counts_parser() -> None:
    assert pytest_counts("....\n371 passed, 12 skipped, 14 warnings in 500.25s (0:08:20)\n") == \
        {"passed": 371, "skipped": 12, "warnings": 14}
    assert pytest_counts("x\n===== 2 failed, 3 passed in 1.00s =====\n") == {"failed": 2, "passed": 3}
    assert pytest_counts("40 errors in 11.45s\n") == {"errors": 40}


@pytest.fixture(scope="module")
def newcomer_clone(tmp_path_factory) -> Path:
    return clone_as_newcomer(tmp_path_factory.mktemp("newcomer"))


@outer_run_only
@pytest.mark.slow
def test_readme_demo_command_on_a_fresh_clone(newcomer_clone: Path) -> None:
    clone = newcomer_clone
    command = quick_start_commands((clone / "README.md").read_text(encoding="utf-8"))[0]
    proc, log = run_in_clone(clone, command, timeout=600)
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


@outer_run_only
@pytest.mark.slow
def test_readme_test_command_on_a_fresh_clone(newcomer_clone: Path) -> None:
    """The README's second command, as written, in the clone: the suite passes there (a folder name
    with a hyphen, fixtures from the repository, nothing beside it). The nested run is not CI, has
    no ComfyUI around it (its ComfyUI and browser tests skip); it imports every test module and
    runs the quick tests that read the reference fixtures and the first quick test of each module
    (conftest.py, NEWCOMER_RUN): this outer run has all the others."""
    command = quick_start_commands((newcomer_clone / "README.md").read_text(encoding="utf-8"))[1]
    proc, log = run_in_clone(newcomer_clone, command, timeout=2400, **{NESTED: NEWCOMER_SAMPLE})
    counts = pytest_counts(proc.stdout)
    assert counts.get("passed", 0) > 100 and counts.get("deselected", 0) > 300, f"{counts}\n{log}"
    assert not counts.get("failed") and not counts.get("errors") and not counts.get("error"), f"{counts}\n{log}"
    assert proc.returncode == 0, log


@outer_run_only
@pytest.mark.parametrize("folder", ["comfyui-liveavatar", "comfyui_liveavatar"])
def test_other_folder_names_collect_and_pass(tmp_path: Path, folder: str) -> None:
    """Any folder name works: lower-case with a hyphen, and a plain identifier (which pytest would
    otherwise import as a package). A few quick files, the pack's own import included."""
    clone = clone_as_newcomer(tmp_path, folder)
    proc, log = run_in_clone(clone, "./dev.sh test tests/test_fixtures.py tests/test_config.py "
                                    "tests/test_nodes_pure.py", timeout=600)
    counts = pytest_counts(proc.stdout)
    assert proc.returncode == 0 and counts.get("passed", 0) >= 10 and set(counts) <= {"passed", "warnings"}, \
        f"{counts}\n{log}"


@outer_run_only
@pytest.mark.comfyui
@needs_comfy()
def test_test_command_uses_the_comfyui_around_the_pack(tmp_path: Path) -> None:
    """A clone in ComfyUI/custom_nodes of a real ComfyUI tree (COMFYUI_DIR's entries linked into
    <tmp>/ComfyUI) runs a ComfyUI test with no COMFYUI_DIR set: dev.sh finds ../../main.py. CI=true
    in the nested run, so a skip there would fail."""
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    for entry in Path(COMFYUI_DIR).iterdir():
        if entry.name != "custom_nodes":
            (comfy / entry.name).symlink_to(entry)
    clone = clone_as_newcomer(tmp_path)
    proc, log = run_in_clone(clone, "./dev.sh test tests/test_workflows.py -k live_schemas", timeout=600,
                             CI="true")
    assert f"COMFYUI_DIR={comfy}" in proc.stdout, log
    counts = pytest_counts(proc.stdout)
    assert proc.returncode == 0 and counts.get("passed") == 1 and set(counts) <= {"passed", "deselected"}, log
