"""Shared test fixtures: where the reference tensors live, tiny checkpoints, small media files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("LIVEAVATAR_FIXTURES", REPO.parent / "shared" / "fixtures" / "reference"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """`../shared/fixtures/reference` (override with LIVEAVATAR_FIXTURES)."""
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES}; set LIVEAVATAR_FIXTURES")
    return FIXTURES
