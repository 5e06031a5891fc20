"""Pinned host buffers for what the layer stream copies, without PyTorch's power-of-two rounding.

PyTorch's pinned allocator rounds every allocation up to the next power of two (a 9.7 GiB step
cache pins 16 GiB; a 0.33 GiB fp8 DiT block pins 0.5 GiB). `HostArena` hands out equal-size
buffers carved from shared pinned allocations whose size keeps that rounding small (a 1 GiB
allocation holds three 0.33 GiB blocks). On the CPU (pin=False) the buffers are plain tensors.
"""

from __future__ import annotations

import torch

_STRIDE = 256  # bytes: buffers start at multiples of it inside an allocation
_MAX_DOUBLINGS = 5  # candidate allocation sizes: the smallest power of two holding one buffer, up to x32


def pinned_bytes(nbytes: int, pin: bool) -> torch.Tensor:
    """`nbytes` uint8 host bytes, pinned when `pin` (pageable if pinning is refused, e.g. limits)."""
    if pin:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


class HostArena:
    """Equal-size host buffers (`take(nbytes)`) from as few allocations as keep the pinned
    allocator's rounding under a few percent; `allocated` counts the bytes asked for."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.allocated = 0
        self._arena: torch.Tensor | None = None
        self._used = 0

    @staticmethod
    def per_allocation(nbytes: int) -> int:
        """How many buffers of `nbytes` one allocation holds (the power-of-two size that wastes least)."""
        stride = -(-nbytes // _STRIDE) * _STRIDE
        base = 1 << (stride - 1).bit_length()
        best = max((base << k for k in range(_MAX_DOUBLINGS + 1)), key=lambda size: (size // stride) * stride / size)
        return best // stride

    def take(self, nbytes: int, count_hint: int = 1) -> torch.Tensor:
        """A uint8 host buffer of `nbytes` (count_hint: how many more of this size will be taken,
        so the last allocation is no bigger than needed)."""
        stride = -(-nbytes // _STRIDE) * _STRIDE
        if self._arena is None or self._used + stride > self._arena.numel():
            k = min(self.per_allocation(nbytes), max(1, count_hint))
            self._arena = pinned_bytes(k * stride, self.pin)
            self.allocated += k * stride
            self._used = 0
        view = self._arena[self._used: self._used + nbytes]
        self._used += stride
        return view


__all__ = ["HostArena", "pinned_bytes"]
