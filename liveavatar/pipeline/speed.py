"""Speed options applied to a loaded DiT: attention backend, fp8 linears, torch.compile."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("liveavatar")

from liveavatar.models.attention import BACKENDS as ATTENTION_BACKENDS


def apply_speed_options(dit, *, attn: str = "sdpa", fp8: bool = False, compile: bool = False,
                        device: torch.device | None = None) -> None:
    """Configure `dit` in place. Raises ValueError naming the option when it cannot apply."""
    if attn not in ATTENTION_BACKENDS:
        raise ValueError(f"attn: {attn!r} is not one of {ATTENTION_BACKENDS}")
    dit.attn_backend = attn
    if fp8:
        if device is None or device.type != "cuda":
            raise ValueError("fp8: needs a CUDA GPU with fp8 support (sm89+: Ada, Hopper); use dtype bf16 on CPU")
        from liveavatar.models.fp8 import convert_to_fp8

        convert_to_fp8(dit)
    if compile:
        if device is None or device.type != "cuda":
            log.warning("compile: ignored on CPU")
        else:
            dit.compile_blocks()
