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
# nested run proves the clone's folder name, fixtures and imports; it leaves out the `slow` tests
# (over ~4 s each on 2 cores, all of which the outer run has just run) and the newcomer tests
# themselves (no recursion).
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
    """In the newcomer test's nested run: deselect the `slow` tests (reported as deselected)."""
    if os.environ.get(NEWCOMER_RUN) != "1":
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


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
