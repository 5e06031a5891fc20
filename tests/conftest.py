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
# Set in the environment of the suites that tests/test_newcomer.py runs inside fresh clones (no
# recursion: the newcomer tests skip there). Those nested runs prove the clone's folder name,
# fixtures and imports; they leave out the `slow` tests (over ~4 s each on 2 cores), which the
# outer run has just run. With the value NEWCOMER_SAMPLE (the README's test command, which would
# otherwise run every quick test a second time) every test module is still collected (imported),
# and only the tests that read the vendored reference fixtures and the first test of each module
# run.
NEWCOMER_RUN = "LIVEAVATAR_NEWCOMER_RUN"
NEWCOMER_SAMPLE = "sample"


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
    """In a newcomer test's nested run: deselect the `slow` tests; with NEWCOMER_SAMPLE keep only
    the quick tests that read the reference fixtures and the first quick test of each module
    (reported as deselected)."""
    mode = os.environ.get(NEWCOMER_RUN)
    if not mode:
        return
    keep, dropped, seen_modules = [], [], set()
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        sampled_out = mode == NEWCOMER_SAMPLE and module in seen_modules \
            and "fixtures_dir" not in getattr(item, "fixturenames", ())
        if item.get_closest_marker("slow") or sampled_out:
            dropped.append(item)
        else:
            keep.append(item)
            seen_modules.add(module)
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
