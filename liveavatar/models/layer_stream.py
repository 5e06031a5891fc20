"""Per-layer streaming of DiT block weights and step-cache rows: the DiT on a card smaller than it.

Placement is decided before (`pipeline.memory.fit_residency`) and handed in as a `LayerResidency`:
the first `weights` DiT blocks keep their weights on the GPU, the others ("streamed") live in
pinned host memory, each packed into one byte buffer (fp8 linears stay fp8: 1 byte per weight);
the first `kv` layers keep their step-cache rows on the GPU, the others page them per layer.

A streamed layer runs from one of `buffers` fixed device slots. A slot is a byte buffer with a
`DiTBlock` bound to views of it (`block_packing.bind_views`), so the layer code, and the
torch.compile'd regions that take weights as inputs (models/compiled.py), always see the same
tensors: a copy into the slot is the only thing that changes, nothing recompiles per layer.
Copies run on a side CUDA stream (`h2d`), `buffers - 1` layers ahead of compute, in the cyclic
order the layers are used (the last layer of a call prefetches the first streamed ones of the
next call); CUDA events order them: `ready` (the copy into a slot is done) before compute,
`released` (compute, and a KV slot's write-back, are done) before the next copy into the slot.

Step caches paged per layer (`StepKVCache(resident_layers=...)`) go the same way: each streamed
layer's ring rows (keys and values) are copied in whole before the layer runs, and the rows the
block wrote are copied back to host memory on a second stream (`d2h`) after it, so the two
directions overlap. The order over caches is the runner's step order (`attach_caches`).
The stream holds the caches weakly (a finished job's caches, pinned host memory as large as the
DiT, go when its runner goes, not when the next job attaches its own) and its slot rings call
back into it weakly, so dropping the model frees its device slots without waiting for Python's
cycle collector.

On the CPU the "device" slots are host tensors and the copies synchronous: the same code path,
bookkeeping and byte counts (tests). `StreamStats` counts host-to-device and device-to-host bytes
and measures the copy bandwidth (CUDA events around every copy; host clock on the CPU).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch
from torch import nn

from .block_packing import bind_views, meta_clone, pack_to_host
from .pinned import HostArena


@dataclass(frozen=True)
class LayerResidency:
    """What stays on the GPU: the first `weights` DiT blocks' weights and the first `kv` layers'
    step-cache rows; `buffers` device slots per streamed kind (prefetch depth + 1, >= 1)."""

    weights: int
    kv: int
    buffers: int = 3

    def describe(self, num_layers: int) -> str:
        return (f"{self.weights}/{num_layers} DiT layers resident ({num_layers - self.weights} streamed), "
                f"KV of {self.kv}/{num_layers} layers resident, {self.buffers} copy buffers")


@dataclass
class StreamStats:
    """Bytes copied by the streamer and the measured copy bandwidth.

    h2d_bytes = weight_bytes + kv_bytes (host -> device), d2h_bytes: KV rows written back.
    `timed` keeps (start, end, bytes) CUDA event pairs of host-to-device copies (CPU: seconds,
    bytes); `copy_gbps()` resolves them (synchronising once)."""

    weight_bytes: int = 0
    kv_bytes: int = 0
    d2h_bytes: int = 0
    copies: int = 0
    timed: list = field(default_factory=list)

    @property
    def h2d_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def reset(self) -> None:
        self.weight_bytes = self.kv_bytes = self.d2h_bytes = self.copies = 0
        self.timed.clear()

    def copy_seconds(self) -> tuple[float, int]:
        """(seconds spent in timed host-to-device copies, their bytes)."""
        secs, nbytes = 0.0, 0
        for rec in self.timed:
            if len(rec) == 3:
                rec[1].synchronize()
                secs += rec[0].elapsed_time(rec[1]) / 1000.0
            else:
                secs += rec[0]
            nbytes += rec[-1]
        return secs, nbytes

    def copy_gbps(self) -> float | None:
        """Host-to-device copy bandwidth, GB/s (1e9 bytes), or None before any copy."""
        secs, nbytes = self.copy_seconds()
        return nbytes / secs / 1e9 if secs > 0 else None

    def snapshot(self) -> dict:
        return {"h2d_bytes": self.h2d_bytes, "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes,
                "d2h_bytes": self.d2h_bytes, "copies": self.copies}


class _Streams:
    """The copy streams and events of one device (no-ops on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None

    def record(self, stream=None):
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=False)
        ev.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return ev

    def wait(self, event, stream=None) -> None:
        if event is not None:
            (stream if stream is not None else torch.cuda.current_stream(self.device)).wait_event(event)

    def timed_copy(self, dst: torch.Tensor, src: torch.Tensor, stats: StreamStats) -> None:
        """dst.copy_(src) on the h2d stream (the caller is inside it), timed into `stats`."""
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(self.h2d)
            dst.copy_(src, non_blocking=True)
            b.record(self.h2d)
            stats.timed.append((a, b, src.numel() * src.element_size()))
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            stats.timed.append((time.perf_counter() - t0, src.numel() * src.element_size()))
        stats.copies += 1


def _stream_ctx(streams: _Streams, stream):
    import contextlib

    return torch.cuda.stream(stream) if streams.cuda else contextlib.nullcontext()


class _SlotRing:
    """`len(slots)` device slots cycling over items (layers, or (weakref to a cache, layer) pairs).

    fill(item, slot_index) copies an item in (on the h2d stream, after the slot's `released`
    event). acquire(item, upcoming) makes sure `item` is in a slot (copying it if not), queues the
    copies of the `upcoming` items that fit in the other slots, waits for `item`'s copy on the
    current stream and returns its slot. release(item, writeback) ends its use: writeback (on the
    d2h stream) runs after the compute that is queued now."""

    def __init__(self, n: int, fill: Callable[[Hashable, int], None], streams: _Streams):
        self.n = n
        self.fill = fill
        self.streams = streams
        self.holder: list = [None] * n
        self.ready: list = [None] * n
        self.released: list = [None] * n
        self.issued = [0] * n
        self._tick = 0

    def slot_of(self, item) -> int | None:
        for j, h in enumerate(self.holder):
            if h is not None and h == item:
                return j
        return None

    def forget(self, pred: Callable[[Hashable], bool]) -> None:
        """Drop the items for which pred is true (their slots are free to take)."""
        for j, h in enumerate(self.holder):
            if h is not None and pred(h):
                self.holder[j] = None
                self.issued[j] = 0

    def _issue(self, item, keep: list) -> int:
        free = [j for j in range(self.n) if self.holder[j] is None or self.holder[j] not in keep]
        j = min(free, key=lambda k: self.issued[k])
        self._tick += 1
        self.holder[j], self.issued[j] = item, self._tick
        s = self.streams
        with _stream_ctx(s, s.h2d):
            s.wait(self.released[j], s.h2d)
            self.fill(item, j)
            self.ready[j] = s.record(s.h2d)
        return j

    def acquire(self, item, upcoming: Sequence) -> int:
        keep = [item, *upcoming[: self.n - 1]]
        j = self.slot_of(item)
        if j is None:
            j = self._issue(item, keep)
        for u in keep[1:]:
            if self.slot_of(u) is None:
                self._issue(u, keep)
        self.streams.wait(self.ready[j])
        return j

    def release(self, item, writeback: Callable[[int], None] | None = None) -> None:
        j = self.slot_of(item)
        if j is None:
            return
        s = self.streams
        done = s.record()
        if writeback is not None:
            with _stream_ctx(s, s.d2h):
                s.wait(done, s.d2h)
                writeback(j)
                done = s.record(s.d2h)
        self.released[j] = done


def _weak_call(method: Callable) -> Callable:
    """`method` (bound) called without keeping its object alive: a slot ring lives inside the
    stream whose method fills it, and a bound method there would make a reference cycle."""
    ref = weakref.WeakMethod(method)
    return lambda *args: ref()(*args)


# ----------------------------------------------------------------------------- the streamer
class LayerStream:
    """Streams the DiT's non-resident blocks (and paged step-cache layers) through device slots.

    blocks: the DiT's `nn.ModuleList`; residency: the resolved placement; device: the compute
    device. Blocks `[0, residency.weights)` must already be on `device`; the others are packed
    into pinned host memory here (wherever they are). Use through `CausalS2VDiT.stream_layers`.
    """

    def __init__(self, blocks: nn.ModuleList, residency: LayerResidency, device: torch.device | str):
        if residency.buffers < 1:
            raise ValueError(f"layer streaming: buffers must be >= 1, got {residency.buffers}")
        n_layers = len(blocks)
        if not (0 <= residency.weights <= n_layers and 0 <= residency.kv <= n_layers):
            raise ValueError(f"layer streaming: resident counts must be in [0, {n_layers}], got {residency}")
        self.device = torch.device(device)
        self.residency = residency
        self.blocks = blocks
        self.num_layers = n_layers
        self.stats = StreamStats()
        self.streams = _Streams(self.device)
        self.streamed = list(range(residency.weights, n_layers))
        self._pos = {layer: p for p, layer in enumerate(self.streamed)}
        self.slots: list[nn.Module] = []
        self._slot_flats: list[torch.Tensor] = []
        self.weights_ring: _SlotRing | None = None
        self._pack(self.streamed)
        self.kv_ring: _SlotRing | None = None
        self.kv_slots: list[torch.Tensor] = []
        self._order: list = []
        self._out_events: dict = {}
        self.attached_kv: int | None = None  # resident KV layers of the attached runner's caches

    def _pack(self, layers: Sequence[int]) -> None:
        """Pack `layers` (not packed yet) into pinned host memory and make the device slots their
        copies run from (up to `buffers`, one block's bytes each)."""
        blocks = self.blocks
        arena = HostArena(pin=self.device.type == "cuda")
        for k, i in enumerate(layers):
            if getattr(blocks[i], "_stream_flat", None) is None:
                pack_to_host(blocks[i], arena, len(layers) - k)
        if not self.streamed:
            return
        layout = blocks[self.streamed[0]]._stream_layout
        for i in self.streamed:
            if blocks[i]._stream_layout != layout:
                raise ValueError(f"layer streaming: block {i} has another layout than block {self.streamed[0]}")
        nbytes = blocks[self.streamed[0]]._stream_flat.numel()
        while len(self.slots) < min(self.residency.buffers, len(self.streamed)):
            flat = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
            slot = meta_clone(blocks[self.streamed[0]])
            bind_views(slot, flat, layout)
            self.slots.append(slot)
            self._slot_flats.append(flat)
        self.weights_ring = _SlotRing(len(self.slots), _weak_call(self._fill_weights), self.streams)

    def demote(self, count: int) -> list[int]:
        """Stream `count` more blocks: the last resident ones, `[weights - count, weights)`, are
        packed into pinned host memory (their device tensors freed) and join the streamed blocks;
        device slots are added up to `buffers` when fewer exist. Meant for the re-fit after
        loading (`pipeline.job.plan_paged_caches`), before a block runs: the copies in flight are
        waited for and the slot ring starts afresh; the layer code and the compiled regions see
        the same slot tensors as for the other streamed blocks (no new shapes, no recompile).
        Returns the demoted layer indices."""
        w = self.residency.weights
        if not 0 <= count <= w:
            raise ValueError(f"layer streaming: cannot demote {count} of {w} resident blocks")
        if count == 0:
            return []
        if self.streams.cuda:
            torch.cuda.synchronize(self.device)
        moved = list(range(w - count, w))
        self.residency = LayerResidency(w - count, self.residency.kv, self.residency.buffers)
        self.streamed = moved + self.streamed
        self._pos = {layer: p for p, layer in enumerate(self.streamed)}
        self._pack(moved)
        return moved

    def release_slots(self) -> None:
        """Free the device slots (weights and KV) while the model's weights are away from the
        device (`CausalS2VDiT.move_weights`); `restore_slots` makes them again."""
        if self.streams.cuda:
            torch.cuda.synchronize(self.device)
        self.slots, self._slot_flats, self.weights_ring = [], [], None
        self.kv_slots, self.kv_ring, self._order, self._out_events = [], None, [], {}

    def restore_slots(self) -> None:
        """The device slots again after `release_slots` (the streamed blocks stayed in host memory)."""
        if not self.slots:
            self._pack([])

    # ------------------------------------------------------------------ bytes
    @property
    def layer_bytes(self) -> int:
        """Bytes of one streamed block's packed weights (0 when none is streamed)."""
        return self._slot_flats[0].numel() if self._slot_flats else 0

    def host_bytes(self) -> int:
        return sum(self.blocks[i]._stream_flat.numel() for i in self.streamed)

    def device_bytes(self) -> int:
        """Device bytes of the slots (weights and KV)."""
        return (sum(f.numel() for f in self._slot_flats)
                + sum(t.numel() * t.element_size() for t in self.kv_slots))

    # ------------------------------------------------------------------ weights
    def _fill_weights(self, layer: int, j: int) -> None:
        src = self.blocks[layer]._stream_flat
        self.streams.timed_copy(self._slot_flats[j], src, self.stats)
        self.stats.weight_bytes += src.numel()

    def _upcoming_weights(self, layer: int) -> list[int]:
        s, p = self.streamed, self._pos[layer]
        return [s[(p + k) % len(s)] for k in range(1, min(len(self.slots), len(s)))]

    # ------------------------------------------------------------------ step caches
    def attach_caches(self, caches: Sequence) -> None:
        """The step caches of a runner, in the order their calls come (the ring's prefetch order).
        Makes the KV slots for the paged ones (shape of one layer of their rows)."""
        paged = [c for c in caches if getattr(c, "paged_layers", 0)]
        self._order = [weakref.ref(c) for c in paged]
        live = {id(c) for c in paged}  # write-back events of caches no longer attached go
        self._out_events = {key: ev for key, ev in self._out_events.items() if key[0] in live}
        self.attached_kv = min((c.resident_layers for c in caches), default=None)
        if self.kv_ring is not None:
            self.kv_ring.forget(lambda item: True)
        if not paged:
            return
        first = [c.host_layer(c.resident_layers) for c in paged]
        shape, dtype = tuple(first[0].shape), first[0].dtype
        if any(tuple(t.shape) != shape or t.dtype != dtype for t in first):
            raise ValueError("layer streaming: a runner's paged step caches must share one shape")
        if not self.kv_slots or tuple(self.kv_slots[0].shape) != shape or self.kv_slots[0].dtype != dtype:
            n = min(self.residency.buffers, paged[0].paged_layers * len(paged))
            self.kv_slots = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n)]
            self.kv_ring = _SlotRing(n, _weak_call(self._fill_kv), self.streams)

    def forget_cache(self, cache) -> None:
        """A cache's rows are about to change on the host (reset): wait for the copies in flight;
        its slots no longer hold its rows."""
        if self.streams.cuda:
            self.streams.h2d.synchronize()
            self.streams.d2h.synchronize()
        if self.kv_ring is not None:
            self.kv_ring.forget(lambda item: item[0]() is cache)

    def _attached(self) -> list:
        """The attached runner's paged step caches that are still alive, in its step order."""
        return [c for c in (ref() for ref in self._order) if c is not None]

    def _fill_kv(self, item: tuple, j: int) -> None:
        ref, layer = item
        cache = ref()  # alive: items are made from live caches just before their copy is issued
        self.streams.wait(self._out_events.get((id(cache), layer)), self.streams.h2d)
        src = cache.host_layer(layer)
        self.streams.timed_copy(self.kv_slots[j], src, self.stats)
        self.stats.kv_bytes += src.numel() * src.element_size()

    def _upcoming_kv(self, cache, layer: int) -> list[tuple]:
        """The (weak cache, layer) items after this one in the runner's cycle (next caches' layers too)."""
        attached = self._attached()
        order = attached if any(c is cache for c in attached) else [cache]
        cycle = [(weakref.ref(c), i) for c in order for i in range(c.resident_layers, c.num_layers)]
        p = next(k for k, (r, i) in enumerate(cycle) if r() is cache and i == layer)
        return [cycle[(p + k) % len(cycle)] for k in range(1, min(len(self.kv_slots), len(cycle)))]

    # ------------------------------------------------------------------ per layer
    def acquire(self, layer: int, cache=None) -> nn.Module:
        """Before layer `layer` runs: its block (resident, or the slot its weights were copied
        to) and, for a paged step cache, its rows bound in `cache` (`cache.layer_kv(layer)`)."""
        if cache is not None and getattr(cache, "paged_layers", 0) and layer >= cache.resident_layers:
            attached = self._attached()
            if self.kv_ring is None or not any(c is cache for c in attached):
                self.attach_caches([*attached, cache])
            cache.pager = self
            j = self.kv_ring.acquire((weakref.ref(cache), layer), self._upcoming_kv(cache, layer))
            cache.bind_layer(layer, self.kv_slots[j])
        if layer not in self._pos:
            return self.blocks[layer]
        return self.slots[self.weights_ring.acquire(layer, self._upcoming_weights(layer))]

    def release(self, layer: int, cache=None, rows: tuple[int, int] | None = None) -> None:
        """After layer `layer` is queued: its slots may be refilled once the queued work (and,
        for a paged cache, the write-back of ring rows `rows` [a, b) to host memory) is done."""
        if layer in self._pos:
            self.weights_ring.release(layer)
        if cache is None or not getattr(cache, "paged_layers", 0) or layer < cache.resident_layers:
            return
        item = (weakref.ref(cache), layer)

        def writeback(j: int) -> None:
            if rows is not None and rows[1] > rows[0]:
                n = cache.write_back(layer, self.kv_slots[j], *rows)
                self.stats.d2h_bytes += n

        self.kv_ring.release(item, writeback)
        self._out_events[(id(cache), layer)] = self.kv_ring.released[self.kv_ring.slot_of(item)]
        cache.bind_layer(layer, None)


__all__ = ["LayerResidency", "LayerStream", "StreamStats"]
