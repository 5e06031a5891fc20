"""The soak, shortened: 8 jobs through real ComfyUI's /prompt, alternating valid and invalid (the
full 50-job run with its numbers is `bench/soak_comfyui.py`, results in bench/results/). Needs
COMFYUI_DIR."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_nodes_support import COMFYUI_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from soak_comfyui import soak  # noqa: E402

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR or not (Path(COMFYUI_DIR or ".") / "main.py").is_file(),
                                 reason="COMFYUI_DIR does not point at a ComfyUI checkout")]


def test_soak_short(tmp_path):
    records = soak(8, tmp_path / "base", lambda rec: None)
    assert [r["job"] for r in records if not r["ok"]] == []
    # nothing accumulates: no child process left, open files back to where the first cycle left them
    assert all(r["children"] == 0 for r in records)
    assert records[-1]["open_files"] <= records[3]["open_files"] + 2
