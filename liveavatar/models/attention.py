"""The one attention kernel call of the DiT, behind a backend switch.

Every attention in the model (causal self-attention against the KV cache + sink, text
cross-attention, audio cross-attention) is full (non-causal), unmasked, softmax scale
`1/sqrt(head_dim)`, and goes through `attention()` here. Layout is token-major, as the KV caches
store it: `[B, L, H, D]` in, `[B, Lq, H, D]` out.

Backends:
- "sdpa" (default): `torch.nn.functional.scaled_dot_product_attention`, PyTorch picks the kernel.
- "math": SDPA restricted to the reference math kernel (debugging, any device).
- "cudnn": SDPA restricted to cuDNN attention (the kernel the reference uses for self-attention).
- "flash": FlashAttention 3 (`flash_attn_interface`) if importable, else FlashAttention 2.
- "sage": SageAttention (`sageattention.sageattn`), 8-bit QK; approximate.
Optional packages are imported on first use; a missing one raises an error naming the package.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "math", "cudnn", "flash", "sage")

_loaded: dict[str, Callable] = {}


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sdpa_only(kernel: SDPBackend) -> Callable:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([kernel]):
            return _sdpa(q, k, v)

    return run


def _flash() -> Callable:
    for module, name in (("flash_attn_interface", "flash_attn_func"), ("flash_attn", "flash_attn_func")):
        try:
            fn = getattr(importlib.import_module(module), name)
        except ImportError:
            continue

        def run(q, k, v, _fn=fn):
            out = _fn(q, k, v)
            return out[0] if isinstance(out, tuple) else out

        return run
    raise ImportError("attention backend 'flash' needs the flash-attn package (flash_attn or flash_attn_interface)")


def _sage() -> Callable:
    try:
        sageattn = importlib.import_module("sageattention").sageattn
    except ImportError as exc:
        raise ImportError("attention backend 'sage' needs the sageattention package") from exc
    return lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _kernel(backend: str) -> Callable:
    if backend not in _loaded:
        if backend == "sdpa":
            _loaded[backend] = _sdpa
        elif backend == "math":
            _loaded[backend] = _sdpa_only(SDPBackend.MATH)
        elif backend == "cudnn":
            _loaded[backend] = _sdpa_only(SDPBackend.CUDNN_ATTENTION)
        elif backend == "flash":
            _loaded[backend] = _flash()
        elif backend == "sage":
            _loaded[backend] = _sage()
        else:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return _loaded[backend]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Full softmax attention, scale 1/sqrt(D). q `[B, Lq, H, D]`, k/v `[B, Lk, H, D]` -> `[B, Lq, H, D]`.

    q, k, v must share a dtype (the caller casts); the output has that dtype.
    """
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    return _kernel(backend)(q, k, v)


__all__ = ["BACKENDS", "attention"]
