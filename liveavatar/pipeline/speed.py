"""Speed options applied to a loaded DiT: attention backend, fp8 linears, torch.compile."""

from __future__ import annotations

import logging

import torch

from liveavatar.models.attention import check_backend

log = logging.getLogger("liveavatar")

# CUDA graphs of the steady-state streaming calls: opt-in (cuda_graphs=True) until they pay
CUDA_GRAPHS_WITH_COMPILE = False  # measured on H100: 16.53 vs 16.65 FPS without (no gain)


def fp8_scaling_for(fp8: bool | str | None, device: torch.device | None) -> str | None:
    """The fp8 scaling a load option asks for (`options.resolve_fp8_scaling`; None: fp8 off),
    checked against `device` before any weight is read.

    Raises ValueError naming `fp8` for an unknown scaling or a CPU device, and
    `fp8.FP8Unsupported` for a GPU without fp8 matmuls (pre-sm89)."""
    from liveavatar.options import resolve_fp8_scaling

    scaling = resolve_fp8_scaling(fp8)
    if scaling is None:
        return None
    from liveavatar.models.fp8 import check_fp8_support

    if device is None or device.type != "cuda":
        raise ValueError("fp8: needs a CUDA GPU with fp8 support (sm89+: Ada, Hopper); use dtype bf16 on CPU")
    check_fp8_support(device)
    return scaling


def apply_speed_options(dit, *, attn: str = "sdpa", fp8: bool | str | None = None, compile: bool = False,
                        device: torch.device | None = None, cuda_graphs: bool | None = None) -> None:
    """Configure `dit` in place. Raises ValueError naming the option when it cannot apply.

    fp8: the scaling by name, "tensor" (the reference's) or "row" (per token / per output
        channel), or None / False (off); True = the default scaling (`options.resolve_fp8_scaling`).
    cuda_graphs: replay repeated streaming calls from CUDA graphs (needs compile on CUDA);
    None = `CUDA_GRAPHS_WITH_COMPILE` when compiling.
    """
    from liveavatar.options import resolve_attention

    dit.attn_backend = resolve_attention(attn)
    check_backend(attn, device)  # a missing optional package (flash, sage, fa4) or fa4 off CUDA: now, not mid-job
    scaling = fp8_scaling_for(fp8, device)
    if scaling is not None:
        from liveavatar.models.fp8 import FP8Linear, convert_to_fp8

        if not any(isinstance(m, FP8Linear) for m in dit.modules()):  # not already converted while loading
            from liveavatar.models.block_packing import repack_on_device

            convert_to_fp8(dit, scaling=scaling)
            repack_on_device(dit.blocks)  # frees the bf16 buffers that loading packed the blocks into
    if compile:
        if device is None or device.type != "cuda":
            log.warning("compile: ignored on CPU")
        else:
            dit.compile_blocks()
            if CUDA_GRAPHS_WITH_COMPILE if cuda_graphs is None else cuda_graphs:
                dit.use_cuda_graphs()
    elif cuda_graphs:
        raise ValueError("cuda_graphs: needs compile=True on a CUDA GPU (graphs replay the compiled layers)")
