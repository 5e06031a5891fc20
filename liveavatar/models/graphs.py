"""CUDA graphs of repeated streaming DiT calls (`CausalS2VDiT.use_cuda_graphs()`).

After the first clip every streaming call of a job has one of a few shapes: the same number of
block tokens, the whole ring attended, the block written at one of `ring / block` ring offsets,
and the sink keys either re-rotated or not. A call is a pure function of a few small per-block
tensors (latents, audio tokens, pose latents, time modulation, RoPE factors) and of tensors that
live for the whole job at fixed addresses (weights, text K/V, the step and sink caches). So the
second time the same call shape comes for the same caches it is captured once as a CUDA graph and
replayed from then on: the per-block tensors are copied into the graph's input buffers, the
thousands of kernel launches of a step (40 layers of fused regions, fp8 GEMMs, attention) become
one launch, and the CPU no longer paces the GPU.

First sight of a shape runs eagerly (it also compiles the fused regions and lets cuDNN build its
attention plans), the second captures and replays. Graphs hold weak references to the text state,
step cache and sink cache they read; when any of them is gone the graph is dropped (a new job
captures its own). All graphs of a model share one memory pool.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable, Hashable, Sequence

import torch

log = logging.getLogger("liveavatar")


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: torch.Tensor):
        self.graph = graph
        self.inputs = inputs
        self.output = output


class BlockGraphs:
    """Captured calls keyed by the caller's call-shape key, bound to the objects they read.

    `run(key, owners, fn, tensors)` = `fn(*tensors)`; `tensors` are the per-call inputs (copied
    into static buffers on replay), `owners` the long-lived objects whose storage `fn` reads.
    """

    def __init__(self, max_graphs: int = 64):
        self.max_graphs = max_graphs
        self._graphs: dict[Hashable, _Graph] = {}
        self._owners: dict[Hashable, tuple[weakref.ref, ...]] = {}
        self._seen: dict[Hashable, tuple[weakref.ref, ...]] = {}
        self._pool = None
        self.captures = 0
        self.replays = 0
        self.disabled_reason: str | None = None

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (and with the last one, the shared memory pool)."""
        self._graphs.clear()
        self._owners.clear()
        self._seen.clear()
        self._pool = None

    def _purge(self) -> None:
        for table in (self._seen, self._owners):
            for key in [k for k, refs in table.items() if any(r() is None for r in refs)]:
                del table[key]
                self._graphs.pop(key, None)
        if not self._graphs:
            self._pool = None

    def run(self, key: Hashable, owners: Sequence[object], fn: Callable[..., torch.Tensor],
            tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """`fn(*tensors)`, eagerly the first time `key` is seen, from a CUDA graph afterwards."""
        if not tensors or tensors[0].device.type != "cuda":  # CPU: the same call, eagerly
            return fn(*tensors)
        self._purge()
        entry = self._graphs.get(key)
        if entry is None:
            if self.disabled_reason is not None or key not in self._seen or len(self._graphs) >= self.max_graphs:
                self._seen[key] = tuple(weakref.ref(o) for o in owners)
                return fn(*tensors)
            entry = self._capture(key, owners, fn, tensors)
            if entry is None:
                return fn(*tensors)
        for static, new in zip(entry.inputs, tensors):
            static.copy_(new)
        entry.graph.replay()
        self.replays += 1
        return entry.output.clone()

    def _capture(self, key: Hashable, owners: Sequence[object], fn: Callable[..., torch.Tensor],
                 tensors: Sequence[torch.Tensor]) -> _Graph | None:
        inputs = [t.clone() for t in tensors]
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = fn(*inputs)
        except Exception as exc:  # a kernel that cannot be captured: stay eager for this model
            self.disabled_reason = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("cuda graphs: capture failed (%s); running the DiT eagerly", self.disabled_reason)
            torch.cuda.synchronize()
            return None
        if self._pool is None:
            self._pool = graph.pool()
        entry = _Graph(graph, inputs, output)
        self._graphs[key] = entry
        self._owners[key] = tuple(weakref.ref(o) for o in owners)
        self.captures += 1
        return entry


__all__ = ["BlockGraphs"]
