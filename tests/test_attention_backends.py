"""Attention backends that need optional packages (models/attention.py), on the CPU.

What a CPU can check of them: the errors name the missing package or the device, early
(`check_backend`), and 'fa4' stays one opaque op when torch.compile traces it (no graph break).
Its speed and accuracy on a GPU: `bench/attn_routes_micro.py`.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from liveavatar.models import attention as attn_mod
from liveavatar.models.attention import attention, check_backend
from liveavatar.pipeline.speed import apply_speed_options


def _qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q `[1, 6, 2, 8]`, k/v `[1, 5, 2, 8]` (token-major, as the KV caches)."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, n, 2, 8, generator=g) for n in (6, 5, 5))


def test_fa4_needs_cuda_and_names_its_package(monkeypatch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'fa4' runs on CUDA GPUs only"):
        attention(q, k, v, "fa4")
    with pytest.raises(ValueError, match="'fa4' runs on CUDA GPUs only"):
        check_backend("fa4", torch.device("cpu"))
    with pytest.raises(ValueError, match="'fa4' runs on CUDA GPUs only"):  # the load path checks before any weight
        apply_speed_options(torch.nn.Module(), attn="fa4", device=torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # as when flash-attn-4 is not installed
    attn_mod._fa4_func.cache_clear()
    try:
        with pytest.raises(ImportError, match="needs the package flash-attn-4") as err:
            check_backend("fa4", "cuda")
        assert "flash_attn.cute failed" in str(err.value)
    finally:
        attn_mod._fa4_func.cache_clear()


def test_fa4_is_one_opaque_op_under_torch_compile():
    """dynamo traces attention(..., 'fa4') into the custom op (fake output shape from register_fake),
    fullgraph; running the graph calls the real kernel path, which refuses CPU tensors."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda q, k, v: attention(q, k, v, "fa4") * 2, backend=record, fullgraph=True)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'fa4' runs on CUDA GPUs only"):
        fn(q, k, v)
    assert len(graphs) == 1
    ops = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "fa4_attention" in str(n.target)]
    assert len(ops) == 1, graphs[0].graph
    assert tuple(ops[0].meta["example_value"].shape) == (1, 6, 2, 8)


def test_flash_backend_with_only_flash_attn_4_installed(tmp_path, monkeypatch):
    """flash-attn-4 ships `flash_attn/cute/` without `flash_attn/__init__.py`: `flash_attn` imports as a
    namespace package without `flash_attn_func`. The 'flash' backend must still say what is missing."""
    if importlib.util.find_spec("flash_attn_interface") or importlib.util.find_spec("flash_attn"):
        pytest.skip("a flash-attn package is installed here: the 'flash' backend would load it")
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(attn_mod._loaded, "flash", raising=False)
    q, k, v = _qkv()
    try:
        with pytest.raises(ImportError, match="'flash' needs the flash-attn package"):
            attention(q, k, v, "flash")
        assert sys.modules["flash_attn"].__spec__.submodule_search_locations  # it did import, as a namespace
    finally:
        sys.modules.pop("flash_attn", None)
