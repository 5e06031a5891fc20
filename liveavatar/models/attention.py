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
- "fa4": FlashAttention 4 (`flash_attn.cute.flash_attn_func`, package flash-attn-4: CuTeDSL kernels
  for Hopper and Blackwell, JIT-compiled at the first call of each kernel configuration; CUDA only).
  Inside torch.compile it is the opaque custom op `liveavatar::fa4_attention` (no graph break).
Optional packages are imported on first use (or by `check_backend()`, at the edge); a missing one
raises an ImportError naming the package.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "math", "cudnn", "flash", "sage", "fa4")
FA4_PACKAGE = "flash-attn-4 (with 'nvidia-cutlass-dsl[cu13]' for a CUDA 13 PyTorch)"


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
        try:  # AttributeError: flash-attn-4 alone makes `flash_attn` a namespace package without the FA2 API
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
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


@functools.cache
def _fa4_func() -> Callable:
    """`flash_attn.cute.flash_attn_func`, imported once. Any import failure (package missing, no CUDA 13
    flavour of the CuTeDSL libraries for this driver, ...) becomes an ImportError naming the package."""
    try:
        return importlib.import_module("flash_attn.cute").flash_attn_func
    except Exception as exc:  # noqa: BLE001 -- the optional-package boundary: reported with its cause
        raise ImportError(f"attention backend 'fa4' needs the package {FA4_PACKAGE}; importing "
                          f"flash_attn.cute failed: {type(exc).__name__}: {exc}") from exc


def _fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.device.type != "cuda":
        raise ValueError(f"attention backend 'fa4' runs on CUDA GPUs only (tensors are on {q.device}); "
                         "use 'sdpa' elsewhere")
    return _fa4_func()(q, k, v)[0]  # (out, lse)


@torch.library.custom_op("liveavatar::fa4_attention", mutates_args=())
def fa4_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention 4 as one opaque op for torch.compile: q `[B, Lq, H, D]`, k/v `[B, Lk, H, D]`."""
    return _fa4_forward(q, k, v)


@fa4_attention_op.register_fake
def _fa4_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # eager: the direct call (no dispatcher hop); traced: the custom op, which dynamo cannot look into
    if torch.compiler.is_compiling():
        return fa4_attention_op(q, k, v)
    return _fa4_forward(q, k, v)


_loaded: dict[str, Callable] = {"sdpa": _sdpa, "math": _sdpa_only(SDPBackend.MATH),
                                "cudnn": _sdpa_only(SDPBackend.CUDNN_ATTENTION), "fa4": _fa4}
_LOADERS: dict[str, Callable[[], Callable]] = {"flash": _flash, "sage": _sage}


def _kernel(backend: str) -> Callable:
    if backend not in _loaded:
        if backend not in _LOADERS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        _loaded[backend] = _LOADERS[backend]()
    return _loaded[backend]


def check_backend(backend: str, device: torch.device | str | None = None) -> None:
    """Fail early (before any weight is loaded) if `backend` cannot run on `device`: an unknown name
    (ValueError), a missing optional package (ImportError naming it), 'fa4' off CUDA (ValueError)."""
    _kernel(backend)
    if backend == "fa4":
        if device is None or torch.device(device).type != "cuda":
            raise ValueError(f"attention backend 'fa4' runs on CUDA GPUs only (device {device}); use 'sdpa'")
        _fa4_func()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Full softmax attention, scale 1/sqrt(D). q `[B, Lq, H, D]`, k/v `[B, Lk, H, D]` -> `[B, Lq, H, D]`.

    q, k, v must share a dtype (the caller casts); the output has that dtype.
    """
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    return _kernel(backend)(q, k, v)


__all__ = ["BACKENDS", "FA4_PACKAGE", "attention", "check_backend", "fa4_attention_op"]
