"""One DiT block in one byte buffer: the packing that layer streaming and loading share.

A packed block's parameters and buffers are views of a single `uint8` buffer (`layout`: every
tensor at a multiple of `PACK_ALIGN` bytes, q/k/v side by side), so it moves host <-> device as one
copy, the CUDA allocator rounds it once, and a streamed layer's device slot (layer_stream.py) is
the same layout bound to another buffer (`meta_clone` + `bind_views`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .pinned import HostArena

_QKV = ("self_attn.q", "self_attn.k", "self_attn.v")
# bytes: start of every packed tensor. cuBLASLt's fp8 GEMM refuses (CUBLAS_STATUS_NOT_SUPPORTED)
# operands that are not 16-byte aligned, its scale pointers included; 256 is the allocator's own
# alignment (what unpacked tensors get), so packed and unpacked blocks run the same kernels.
PACK_ALIGN = 256


def _tensors(block: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(module path, name, tensor) of a block's parameters and buffers, in packing order: the q, k,
    v projections' tensors of each kind side by side (so a fused q|k|v view exists, see
    compiled.fuse_linears), then the rest in module order, tensors of sizes that are not a
    multiple of `PACK_ALIGN` bytes (e.g. 0-d fp8 scales) last, so that padding follows only those."""
    out = []
    for path, mod in block.named_modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                out.append((path, name, t))
    first = sorted((e for e in out if e[0] in _QKV), key=lambda e: (e[1], _QKV.index(e[0])))
    ordered = first + [e for e in out if e[0] not in _QKV]
    odd = [(e[2].numel() * e[2].element_size()) % PACK_ALIGN != 0 for e in ordered]
    return [e for e, o in zip(ordered, odd) if not o] + [e for e, o in zip(ordered, odd) if o]


def _layout(block: nn.Module) -> tuple[list[tuple], int]:
    """[(path, name, is_param, offset, shape, dtype)], total bytes. Every tensor starts at a
    multiple of `PACK_ALIGN` bytes; the gaps (after the few tensors whose size is not a multiple of
    it, packed last) are under `PACK_ALIGN` bytes each, zeros, and copied with the block."""
    entries, off = [], 0
    for path, name, t in _tensors(block):
        nbytes = t.numel() * t.element_size()
        off = -(-off // PACK_ALIGN) * PACK_ALIGN
        is_param = name in block.get_submodule(path)._parameters
        entries.append((path, name, is_param, off, tuple(t.shape), t.dtype))
        off += nbytes
    return entries, off


def bind_views(block: nn.Module, flat: torch.Tensor, layout: list[tuple]) -> None:
    """Point every tensor of `block` at its view of the byte buffer `flat` (in place)."""
    for path, name, is_param, off, shape, dtype in layout:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        view = flat[off: off + nbytes].view(dtype).view(shape)
        mod = block.get_submodule(path)
        if is_param:
            mod._parameters[name] = nn.Parameter(view, requires_grad=False)
        else:
            mod._buffers[name] = view


@torch.no_grad()
def pack_to_host(block: nn.Module, arena: HostArena, count_hint: int = 1) -> torch.Tensor:
    """Move a block's tensors into one host byte buffer from `arena` (pinned on CUDA), in place;
    returns the buffer. The block's tensors are then views of it (the device copies are freed).
    count_hint: blocks still to pack from this arena (its allocation sizes)."""
    layout, nbytes = _layout(block)
    flat = _pack_into(block, arena.take(nbytes, count_hint), layout)
    block._stream_flat = flat
    block._stream_layout = layout
    return flat


@torch.no_grad()
def pack_on_device(block: nn.Module, device: torch.device | str | None = None, pin: bool = False) -> torch.Tensor:
    """Move a resident block's tensors into one byte buffer on their own device, in place (the
    layout of `pack_to_host`); returns the buffer. One allocation per block instead of one per
    tensor: the CUDA caching allocator rounds the block once (under 2 MiB) instead of each tensor
    (with its default segments an fp8 5120 x 5120 weight of 25 MiB holds 26 MiB: 9 MiB per 14B
    block, 0.36 GiB over 40), and q, k, v lie back to back (a fused GEMM takes views of them,
    models/compiled.py). Streaming it later (`layer_stream.LayerStream.demote`) packs it to the host as any block."""
    layout, nbytes = _layout(block)
    if device is None:
        device = next(iter((*block.parameters(), *block.buffers()))).device
    flat = _pack_into(block, torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin), layout)
    block._device_flat_ptr = flat.untyped_storage().data_ptr()
    return flat


@torch.no_grad()
def repack_on_device(blocks: nn.ModuleList) -> int:
    """Pack again the device-packed blocks (`pack_on_device`) some of whose tensors were replaced
    since (fp8 conversion after loading: the new e4m3 weights are separate allocations while the
    norms and biases left in place keep the whole old bf16 buffer alive, about 2x the block).
    Returns how many blocks were packed again."""
    count = 0
    for block in blocks:
        ptr = getattr(block, "_device_flat_ptr", None)
        if ptr is None:
            continue
        tensors = (*block.parameters(), *block.buffers())
        if all(t.untyped_storage().data_ptr() == ptr for t in tensors):
            continue
        pack_on_device(block)
        count += 1
    return count


def _pack_into(block: nn.Module, flat: torch.Tensor, layout: list[tuple]) -> torch.Tensor:
    """Copy the block's tensors into `flat` at their `layout` offsets (gaps zeroed) and bind them there."""
    flat.zero_()
    for path, name, is_param, off, shape, dtype in layout:
        mod = block.get_submodule(path)
        t = mod._parameters[name] if is_param else mod._buffers[name]
        n = t.numel() * t.element_size()
        flat[off: off + n].copy_(t.detach().reshape(-1).view(torch.uint8))
    bind_views(block, flat, layout)
    return flat


def meta_clone(block: nn.Module) -> nn.Module:
    """A copy of `block` with meta tensors (no memory; `bind_views` gives it storage)."""
    memo = {}
    for _, mod in block.named_modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None:
                meta = torch.empty_like(t, device="meta")
                memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    for attr in ("_stream_flat", "_stream_layout"):
        if hasattr(block, attr):
            memo[id(getattr(block, attr))] = None
    clone = copy.deepcopy(block, memo)
    for attr in ("_stream_flat", "_stream_layout"):
        clone.__dict__.pop(attr, None)
    return clone


__all__ = ["PACK_ALIGN", "bind_views", "meta_clone", "pack_on_device", "pack_to_host", "repack_on_device"]
