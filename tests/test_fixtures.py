"""The vendored reference fixtures (tests/fixtures/reference/) are exactly what SHA256SUMS lists.

Every listed file is there with its SHA-256; nothing unlisted sits beside them (README.md and the
manifest itself excepted), so the folder holds only what the tests read. The fixtures a test run
uses by default are these (LIVEAVATAR_FIXTURES overrides that).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from conftest import VENDORED_FIXTURES

MANIFEST = VENDORED_FIXTURES / "SHA256SUMS"


def manifest() -> dict[str, str]:
    """relative path -> sha256 hex, from `sha256sum` output lines (`<hex>  <path>`)."""
    entries = {}
    for line in MANIFEST.read_text(encoding="utf-8").splitlines():
        digest, name = line.split(maxsplit=1)
        entries[name.lstrip("*")] = digest
    return entries


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_manifest_parses():
    entries = manifest()
    assert len(entries) >= 30
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in entries.values())
    assert "tiny_s2v/diffusion_pytorch_model.safetensors" in entries


def test_vendored_files_match_the_manifest():
    entries = manifest()
    present = {p.relative_to(VENDORED_FIXTURES).as_posix() for p in VENDORED_FIXTURES.rglob("*") if p.is_file()}
    present -= {"SHA256SUMS", "README.md"}
    assert sorted(set(entries) - present) == [], "listed in SHA256SUMS but missing"
    assert sorted(present - set(entries)) == [], "present but not in SHA256SUMS: list it or remove it"
    wrong = [name for name, digest in entries.items() if sha256(VENDORED_FIXTURES / name) != digest]
    assert wrong == [], f"content differs from SHA256SUMS: {wrong}"


def test_default_fixtures_are_the_vendored_ones(fixtures_dir):
    if not os.environ.get("LIVEAVATAR_FIXTURES"):
        assert fixtures_dir == VENDORED_FIXTURES
    assert (fixtures_dir / "tiny_s2v" / "config.json").is_file()
