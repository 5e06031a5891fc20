"""What the CUDA caching allocator holds and what a preflight counts as free (issue 15).

`allocation_bytes`: the device bytes one tensor of n bytes holds (the allocator's rounding, with
its default or its expandable segments); `device_free`: (free, total) of a device as every
preflight measures it, the allocator's cache released first.
"""

from __future__ import annotations

import os

import torch

# The CUDA caching allocator's rules (c10/cuda/CUDACachingAllocator.cpp): blocks are multiples of
# 512 bytes; with its default segments a tensor of 10 MiB or more gets a segment of its own,
# rounded up to 2 MiB, and a rest of at most 1 MiB is not split off (it stays with the tensor).
_ALLOC_BLOCK = 512
_LARGE_ALONE = 10 * 2**20
_SEGMENT_ROUND = 2 * 2**20
_UNSPLIT_REST = 2**20


def expandable_segments() -> bool:
    """Whether the CUDA allocator maps memory in expandable segments (PYTORCH_CUDA_ALLOC_CONF /
    PYTORCH_ALLOC_CONF `expandable_segments:True`): then tensors are packed back to back."""
    conf = ",".join(os.environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def allocation_bytes(nbytes: int, expandable: bool | None = None) -> int:
    """Device bytes the CUDA caching allocator holds for one tensor of `nbytes` (see the rules
    above; an fp8 5120 x 5120 weight of 25 MiB holds 26 MiB with default segments)."""
    size = max(_ALLOC_BLOCK, -(-nbytes // _ALLOC_BLOCK) * _ALLOC_BLOCK)
    if (expandable_segments() if expandable is None else expandable) or size < _LARGE_ALONE:
        return size
    segment = -(-size // _SEGMENT_ROUND) * _SEGMENT_ROUND
    return segment if segment - size <= _UNSPLIT_REST else size


def device_free(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, as every preflight measures them: the caching
    allocator's cached blocks are released first (`torch.cuda.empty_cache`). They are this
    process's to reuse (loading leaves the bf16 staging of the last block, fp32 temporaries of the
    fp8 conversion and the device copies of blocks packed to host memory there), but
    `torch.cuda.mem_get_info` alone counts them as used."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


__all__ = ["allocation_bytes", "device_free", "expandable_segments"]
