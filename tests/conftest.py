"""Shared test fixtures and CI rules: reference tensors, one ComfyUI server, no silent skips in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENDORED_FIXTURES = REPO / "tests" / "fixtures" / "reference"
FIXTURES = Path(os.environ.get("LIVEAVATAR_FIXTURES") or VENDORED_FIXTURES)
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Tests with these marks skip on a machine without ComfyUI or Chromium; in CI they must run.
MUST_RUN_IN_CI = ("comfyui", "browser")
# Set in the environment of the suite that tests/test_newcomer.py runs inside a fresh clone. That
# nested run proves the clone's folder name, fixtures and imports: every test module is collected
# (imported) there, and it runs every test that reads the vendored reference fixtures plus the
# first test of each module; it leaves out the `slow` tests (over ~4 s each on 2 cores) and the
# rest, all of which the outer run has just run, and the newcomer tests themselves (no recursion).
NEWCOMER_RUN = "LIVEAVATAR_NEWCOMER_RUN"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures/reference (the vendored reference tensors; override with LIVEAVATAR_FIXTURES)."""
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES}; unset LIVEAVATAR_FIXTURES to use {VENDORED_FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def comfyui_server(tmp_path_factory):
    """One real ComfyUI server for the session (tests/comfy_server.py), stopped at the end."""
    from comfy_server import running_server

    with running_server(tmp_path_factory.mktemp("comfy_base")) as srv:
        yield srv


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In the newcomer test's nested run: keep the quick tests that read the reference fixtures and
    the first quick test of each module; deselect the rest (reported as deselected)."""
    if os.environ.get(NEWCOMER_RUN) != "1":
        return
    keep, seen_modules = [], set()
    for item in items:
        if item.get_closest_marker("slow"):
            continue
        module = item.nodeid.split("::", 1)[0]
        if "fixtures_dir" in getattr(item, "fixturenames", ()) or module not in seen_modules:
            keep.append(item)
            seen_modules.add(module)
    kept = set(map(id, keep))
    dropped = [item for item in items if id(item) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """With CI=true a skipped ComfyUI or browser test is a failure: CI sets both up (.ci/run)."""
    report = yield
    if CI and report.skipped and not hasattr(report, "wasxfail") \
            and any(item.get_closest_marker(m) for m in MUST_RUN_IN_CI):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true, so this test must run, but it skipped: {reason}"
    return report
