"""CUDA graphs of the streaming VAE decoder's steady-state call (`WanVAE.use_cuda_graphs()`).

The streaming decoder (`vae.StreamingDecoder`) runs the diffusers decoder once per latent frame
with a list of causal caches (one per causal conv, the last two frames of its input). After the
first two frames of a video every call has the same shapes: one latent frame in, four video
frames out, every cache a tensor of a fixed shape. Such a call is about 500 small kernels (convs,
RMS norms, pads, cats, cache clones); at small sizes the CPU that launches them, not the GPU,
sets the pace. `FrameGraph` captures that call once per cache list and replays it: the latent
frame is copied into a static input, the caches live in static buffers that the graph itself
updates in place at its end (the new caches are computed first and copied back last, so every
read sees the old values, as in the eager call), and the output is cloned out of the graph pool.

The replay runs the kernels the eager call runs, in the same order, on the same values: the
frames are the same bits. First sight of a steady call runs eagerly (lazy initialisation,
library plans), the second captures. A capture that fails leaves this cache list eager (logged
once). On a CPU the captured body runs eagerly (same in-place cache updates), so its logic is
tested without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("liveavatar")

DecoderCall = Callable[..., torch.Tensor]  # decoder(x, feat_cache=list, feat_idx=[0], first_chunk=bool)


@dataclass
class GraphCounts:
    """Captures and replays of the frame graphs that share it (e.g. all decoders of one VAE);
    disabled: the last capture failure, if any."""

    captures: int = 0
    replays: int = 0
    disabled: str | None = None


class FrameGraph:
    """The graphed steady-state decoder call of ONE cache list (one video of a batch).

    `decode(x, caches, first_chunk)` = `decoder(x, feat_cache=caches, feat_idx=[0],
    first_chunk=first_chunk)`: x `[1, z_dim, 1, h, w]` (decoder dtype) -> `[1, 3, 4, 8h, 8w]`
    (1 frame for the first chunk). `caches` is updated as by the eager call (its entries may
    become this graph's static buffers). `counts`: where captures / replays are counted.
    """

    def __init__(self, decoder: DecoderCall, counts: GraphCounts | None = None, pool=None):
        self.decoder = decoder
        self.pool = pool
        self.key: tuple | None = None  # the steady call shape last seen (eager) or captured
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: torch.Tensor | None = None
        self.static_caches: list[torch.Tensor] = []
        self.out: torch.Tensor | None = None
        self.counts = counts if counts is not None else GraphCounts()
        self.disabled_reason: str | None = None

    def decode(self, x: torch.Tensor, caches: list, first_chunk: bool) -> torch.Tensor:
        key = None if first_chunk else _call_key(x, caches)
        if key is None or key != self.key or self.disabled_reason is not None:
            out = self.decoder(x, feat_cache=caches, feat_idx=[0], first_chunk=first_chunk)
            # steady: the call leaves the caches as it found them (same kinds, same shapes)
            self.key = key if key is not None and _call_key(x, caches) == key else None
            self.graph = self.static_x = None  # a capture (or the CPU body) binds fresh buffers
            return out
        if x.device.type != "cuda":  # CPU: the captured body, eagerly
            self._bind(x, caches)
            return self._body().clone()
        if self.graph is None and not self._capture(x, caches):
            return self.decoder(x, feat_cache=caches, feat_idx=[0], first_chunk=False)
        self._bind(x, caches)
        self.graph.replay()
        self.counts.replays += 1
        return self.out.clone()

    def _bind(self, x: torch.Tensor, caches: list) -> None:
        """Copy x and any cache tensor that is not already a static buffer into the static buffers,
        and point `caches` at them (after the first call only x is copied). Entries that are not
        tensors (a conv the decoder never caches) stay as they are."""
        if self.static_x is None:
            self.static_x = torch.empty_like(x)
            self.static_caches = [torch.empty_like(c) if isinstance(c, torch.Tensor) else c for c in caches]
        self.static_x.copy_(x)
        for i, (s, c) in enumerate(zip(self.static_caches, caches)):
            if c is not s:
                s.copy_(c)
                caches[i] = s

    def _body(self) -> torch.Tensor:
        """The captured call: decode the static frame, then write the new caches into the static
        ones (after every read of the old ones)."""
        work = list(self.static_caches)
        out = self.decoder(self.static_x, feat_cache=work, feat_idx=[0], first_chunk=False)
        for s, w in zip(self.static_caches, work):
            if w is not s:
                s.copy_(w)
        return out

    def _capture(self, x: torch.Tensor, caches: list) -> bool:
        self._bind(x, caches)  # fresh static buffers, allocated before the capture
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(x.device)
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._body()
        except Exception as exc:  # a kernel that cannot be captured: stay eager
            self.disabled_reason = self.counts.disabled = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("VAE cuda graphs: capture failed (%s); decoding eagerly", self.disabled_reason)
            torch.cuda.synchronize(x.device)
            return False
        # The capture recorded the kernels without running them: the static caches still hold
        # the state before this frame, which the first replay (by the caller) advances.
        self.graph, self.out = graph, out
        self.pool = graph.pool() if self.pool is None else self.pool
        self.counts.captures += 1
        return True


def _call_key(x: torch.Tensor, caches: list) -> tuple | None:
    """The shape of a decoder call: x's shape, dtype, device and every cache entry's shape (or
    its kind when it is not a tensor); None while some entry is a marker string (the first two
    latent frames)."""
    kinds = []
    for c in caches:
        if isinstance(c, torch.Tensor):
            kinds.append(tuple(c.shape))
        elif c is None:
            kinds.append(None)
        else:
            return None
    return tuple(x.shape), x.dtype, x.device, tuple(kinds)


__all__ = ["FrameGraph", "GraphCounts"]
