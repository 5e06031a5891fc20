"""pytest plugin (loaded by `-p pack_root` from pyproject.toml): the repository root is a directory.

The repository root holds `__init__.py` because ComfyUI imports the pack as a package named after
its folder (`custom_nodes/ComfyUI-LiveAvatar`). pytest would collect that folder as a test
`Package` and import its `__init__.py` during setup; when the folder's name is not a Python
identifier (`ComfyUI-LiveAvatar`, `comfyui-liveavatar`) pytest imports it as a top-level module
named `__init__`, whose relative import of `.nodes` then fails for every test. The root holds no
tests of its own, so it is collected as a plain directory whatever its name. Tests that need the
pack as ComfyUI sees it import it themselves (`test_nodes_support.load_pack`).

This module is not a conftest.py: a conftest in the root would itself be imported as part of the
package, and a conftest below the root is consulted only after the root was collected.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path.resolve() == REPO:
        return pytest.Dir.from_parent(parent, path=path)
    return None
