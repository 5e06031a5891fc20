"""KV storage of the streaming DiT and the two self-attention policies that use it (spec §2.6).

`SinkCache` (one per job, shared by all denoising steps): per layer the **un-rotated** keys and
the values of the conditioning tokens [reference frame | FramePack motion tokens], written by the
sink prefill. `StepKVCache` (one per denoising step): per layer a ring buffer of one clip of
block tokens (RoPE applied, as they were at that step), optionally followed by a "sink slot"
holding the sink keys rotated for the current call and the sink values.

Layout of both: one tensor `kv[layer, 0=key/1=value, batch=1, token, head, head_dim]`.
Step cache token rows: `[0, ring)` ring buffer, `[ring, ring + sink_capacity)` sink slot. A block
attends to `[ring rows of the window] ++ [sink rows]`, the reference's key order.
- With the slot: once the ring is full (every clip after the first) the keys are one contiguous
  slice, no copy is made; while it fills (clip 0) the two parts are concatenated. The slot is
  re-rotated only when the sink or the reference token's position changed since the previous
  call on this cache. Costs `sink_capacity` more rows per step cache.
- Without the slot (`sink_capacity=0`): the sink keys are rotated and concatenated in every
  layer of every call (transient memory only), as the reference does.
Both give identical numbers.

Offload (`working=KVWorkingBuffer`): a step cache keeps its rows in host memory (pinned on
CUDA) and shares a device buffer with other step caches of its runner. `page_in()` before its
call copies the filled rows in, `page_out()` after it copies the block's new rows back. With two
buffers the next step's page-in runs on a copy stream while this step computes (`page_in(stream)`
+ `wait_ready()`, ordered by CUDA events). One or two step caches on the GPU instead of all of
them; the same numbers (no sink slot in this mode).

Per-layer paging (`resident_layers=R`): the first R layers' rows stay on the device (`kv`), the
others live in host memory (`host`, pinned on CUDA) and are lent a device slot per layer by the
DiT's layer streamer (models/layer_stream.py: `bind_layer`, `write_back`) while that layer runs.
Same numbers again (no sink slot either).

fp8 storage (`fp8=True`, both caches): each cached row of one head (`head_dim` values) is stored
as float8_e4m3fn values plus one bf16 scale, packed into `head_dim + 2` bytes (uint8 storage
`[..., head, head_dim + 2]`), about half the bf16 bytes. The scale is per token and head, a power
of two (exact in bf16, so dequantizing multiplies exactly) with the row's largest value mapped into
(224, 448]: no calibration, no overflow whatever the activations do, and every row stands alone
(a ring write never rescales older rows). e4m3 has the same relative step (3 mantissa bits) at
every magnitude, so a per-tensor scale would gain nothing, a per-row one only the range. Rows are
dequantized to the compute dtype for attention; the block being written attends to its own keys and
values unquantized. Because the packed rows are plain byte tensors of the same layout, paging,
ring offsets and the sink slot work unchanged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .attention import attention
from .pinned import HostArena
from .rope import RopeFactors, apply_rope

_uids = itertools.count()

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_SCALE_BYTES = 2  # one bf16 scale per (token, head)


def kv_row_width(head_dim: int, fp8: bool) -> int:
    """Last-dimension size of the cache storage: `head_dim` (plain), `head_dim + 2` bytes (fp8)."""
    return head_dim + _SCALE_BYTES if fp8 else head_dim


def kv_storage_dtype(dtype: torch.dtype, fp8: bool) -> torch.dtype:
    """Storage dtype of cached rows: the compute dtype, or uint8 packed fp8 rows + scales."""
    return torch.uint8 if fp8 else dtype


def pack_rows(x: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """Rows `[..., head_dim]` -> storage rows (a dtype cast, or fp8 values + bf16 scale packed
    into `[..., head_dim + 2]` uint8 when `storage` is uint8; see the module docstring)."""
    if storage != torch.uint8:
        return x.to(storage)
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))  # power of two: amax / scale <= 448
    q = (xf / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([q, scale.to(torch.bfloat16).view(torch.uint8)], dim=-1)


def unpack_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Storage rows -> `[..., head_dim]` in `dtype` (the inverse of `pack_rows`)."""
    if rows.dtype != torch.uint8:
        return rows.to(dtype)
    d = rows.shape[-1] - _SCALE_BYTES
    values = rows[..., :d].view(torch.float8_e4m3fn).to(dtype)
    return values * rows[..., d:].view(torch.bfloat16).to(dtype)


class SinkCache:
    """Un-rotated keys and values of the conditioning (sink) tokens, all layers.

    kv: `[layers, 2, 1, capacity, heads, head_dim]` (fp8: uint8 `[..., head_dim + 2]`, module
    docstring). `length` rows are valid after a prefill.
    `positions` (int64 `[length, 3]`, CPU) are the prefill RoPE positions; the first `ref_tokens`
    rows are the reference frame, whose temporal position moves per streaming call.
    """

    def __init__(self, num_layers: int, capacity: int, num_heads: int, head_dim: int,
                 latent_hw: tuple[int, int], ref_tokens: int,
                 device: torch.device | str, dtype: torch.dtype, fp8: bool = False):
        self.dtype = dtype  # compute dtype of keys() / values()
        self.kv = torch.zeros(num_layers, 2, 1, capacity, num_heads, kv_row_width(head_dim, fp8), device=device,
                              dtype=kv_storage_dtype(dtype, fp8))
        self.latent_hw = tuple(latent_hw)
        self.ref_tokens = ref_tokens
        self.uid = next(_uids)
        self.version = 0
        self.length = 0
        self.positions: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def reset(self) -> None:
        """Forget the prefill (the storage is kept)."""
        self.length = 0
        self.positions = None
        self.version += 1

    def begin_prefill(self, positions: torch.Tensor) -> None:
        """Start a (re)fill with `len(positions)` tokens; bumps the version seen by step caches."""
        n = positions.shape[0]
        if n > self.capacity:
            raise ValueError(f"sink prefill has {n} tokens, capacity is {self.capacity}")
        self.length = n
        self.positions = positions.to("cpu", torch.int64)
        self.version += 1

    def keys(self, layer: int) -> torch.Tensor:
        """Un-rotated sink keys `[1, length, heads, head_dim]` in the compute dtype."""
        return unpack_rows(self.kv[layer, 0, :, : self.length], self.dtype)

    def values(self, layer: int) -> torch.Tensor:
        """Sink values `[1, length, heads, head_dim]` in the compute dtype."""
        return unpack_rows(self.kv[layer, 1, :, : self.length], self.dtype)

    def stream_positions(self, ref_t: int) -> torch.Tensor:
        """Sink positions for a streaming call: the reference tokens moved to temporal index `ref_t`."""
        if self.positions is None:
            raise RuntimeError("the sink cache is empty: call model.prefill_sink() before forward_block()")
        pos = self.positions.clone()
        pos[: self.ref_tokens, 0] = ref_t
        return pos

    def prefill_attend(self, layer: int, rope: RopeFactors, backend: str = "sdpa"):
        """Self-attention policy of the prefill: store k/v un-rotated, attend among the sink tokens."""

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.kv[layer, 0, :, : self.length] = pack_rows(k, self.kv.dtype)
            self.kv[layer, 1, :, : self.length] = pack_rows(v, self.kv.dtype)
            q_rot = apply_rope(q, rope, out_dtype=v.dtype)
            k_rot = apply_rope(k, rope, out_dtype=v.dtype)
            return attention(q_rot, k_rot, v, backend)

        return attend


@dataclass(frozen=True)
class StreamWindow:
    """Where one block goes in a step cache and what it attends to."""

    offset: int  # first ring row written by the block
    tokens: int  # block tokens (rows written)
    window: int  # ring rows [0, window) attended
    sink_len: int  # sink rows attended
    refresh_keys: bool  # sink keys must be rotated in every layer (slot stale, or no slot)
    refresh_values: bool  # sink slot values must be copied in every layer


class KVWorkingBuffer:
    """The device rows shared by offloaded step caches (`tensor`: one step cache's shape) and
    which cache's rows it holds now (`owner`). CUDA events order an asynchronous page-in on a copy
    stream: `ready` (the rows are in), `released` (its previous user is done with it)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.owner: "StepKVCache | None" = None
        self.ready = None  # torch.cuda.Event | None
        self.released = None  # torch.cuda.Event | None

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, a: int, b: int) -> None:
    """dst[..., a:b, :, :] = src[..., a:b, :, :] for `[layers, 2, 1, rows, H, D]` tensors on two
    devices, as one contiguous copy per (layer, k/v): a row range of the whole tensor is strided,
    and a strided host-device copy would stage the rows through a temporary host tensor."""
    d, s_ = dst.flatten(0, 2), src.flatten(0, 2)
    for i in range(d.shape[0]):
        d[i, a:b].copy_(s_[i, a:b], non_blocking=True)


def _host_zeros(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    if pin:
        try:
            return torch.zeros(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # pinning refused (limits): pageable memory, slower copies
            pass
    return torch.zeros(shape, dtype=dtype)


def _own_rows(x: torch.Tensor, own: torch.Tensor, plan: StreamWindow, rows: torch.Tensor | None) -> torch.Tensor:
    """x `[1, n, H, D]` (a dequantized copy) with the block's rows replaced by `own` `[1, tokens, H, D]`."""
    if rows is None:
        x[:, plan.offset: plan.offset + plan.tokens] = own
        return x
    return x.index_copy_(1, rows, own.to(x.dtype))


class StepKVCache:
    """Per-denoising-step ring buffer of block keys/values (+ the rotated sink slot if `sink_capacity`).

    kv: `[layers, 2, 1, ring + sink_capacity, heads, head_dim]`; `ring` = one clip of tokens
    (fp8: uint8 `[..., head_dim + 2]`, module docstring; `dtype` stays the compute dtype).
    `length`: ring rows written so far (the fill level, at most `ring`).
    `working`: offload mode (module docstring): `kv` is the shared device buffer, `host` the rows.
    """

    def __init__(self, num_layers: int, ring: int, sink_capacity: int, num_heads: int, head_dim: int,
                 latent_hw: tuple[int, int], device: torch.device | str, dtype: torch.dtype,
                 working: KVWorkingBuffer | None = None, resident_layers: int | None = None,
                 fp8: bool = False):
        shape = (num_layers, 2, 1, ring + sink_capacity, num_heads, kv_row_width(head_dim, fp8))
        storage = kv_storage_dtype(dtype, fp8)
        self.working = working
        self.host: torch.Tensor | None = None
        self.num_layers = num_layers
        self.resident_layers = num_layers if resident_layers is None else int(resident_layers)
        self._pages: dict[int, torch.Tensor] = {}  # paged layer -> the device slot lent for it now
        self._host_pages: list[torch.Tensor] = []  # paged layer - resident_layers -> its host rows
        self.pager = None  # the LayerStream that lends the slots (set by it on first use)
        if resident_layers is not None:
            if sink_capacity or working is not None:
                raise ValueError("StepKVCache: a per-layer paged cache has no sink slot and no working buffer")
            if not 0 <= self.resident_layers <= num_layers:
                raise ValueError(f"StepKVCache: resident_layers must be in [0, {num_layers}], got {resident_layers}")
            self.kv = torch.zeros((self.resident_layers, *shape[1:]), device=device, dtype=storage)
            arena = HostArena(pin=torch.device(device).type == "cuda")  # pinned, without power-of-two rounding
            n = num_layers - self.resident_layers
            nbytes = torch.Size(shape[1:]).numel() * torch.empty((), dtype=storage).element_size()
            self._host_pages = [arena.take(nbytes, n - k).view(storage).view(shape[1:]).zero_() for k in range(n)]
        elif working is None:
            self.kv = torch.zeros(shape, device=device, dtype=storage)
        else:
            if sink_capacity:
                raise ValueError("StepKVCache: an offloaded cache has no sink slot (sink_capacity must be 0)")
            if tuple(working.tensor.shape) != shape or working.tensor.dtype != storage:
                raise ValueError(f"StepKVCache: working buffer {tuple(working.tensor.shape)} {working.tensor.dtype} "
                                 f"does not match {shape} {storage}")
            self.kv = working.tensor
            self.host = _host_zeros(shape, storage, pin=working.tensor.is_cuda)
        self._last: StreamWindow | None = None
        self._out_event = None  # torch.cuda.Event of the last page_out (offload on CUDA)
        self.ring = ring
        self.latent_hw = tuple(latent_hw)
        self.length = 0
        self._sink_key: tuple | None = None  # (sink uid, version, ref_t) of the rotated slot keys
        self._sink_val: tuple | None = None  # (sink uid, version) of the slot values

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    @property
    def paged_layers(self) -> int:
        """Layers whose rows live in host memory and are paged per layer (0: none)."""
        return self.num_layers - self.resident_layers

    def layer_kv(self, layer: int) -> torch.Tensor:
        """The device rows of one layer, `[2, 1, rows, heads, head_dim]` (a paged layer: the slot
        the streamer bound for it; RuntimeError if none is)."""
        if layer < self.resident_layers:
            return self.kv[layer]
        page = self._pages.get(layer)
        if page is None:
            raise RuntimeError(f"StepKVCache: layer {layer} is paged and not bound (run it through the DiT's "
                               "layer stream: CausalS2VDiT.stream_layers)")
        return page

    def bind_layer(self, layer: int, page: torch.Tensor | None) -> None:
        """Lend (or take back, None) the device slot holding paged layer `layer`'s rows."""
        if page is None:
            self._pages.pop(layer, None)
        else:
            self._pages[layer] = page

    def host_layer(self, layer: int) -> torch.Tensor:
        """Host rows of paged layer `layer`, `[2, 1, rows, heads, head_dim]`."""
        return self._host_pages[layer - self.resident_layers]

    def write_back(self, layer: int, page: torch.Tensor, a: int, b: int) -> int:
        """Copy ring rows [a, b) of paged layer `layer` from its device slot `page` to host memory
        (on the current stream); returns the bytes copied."""
        _copy_rows(self.host_layer(layer).unsqueeze(0), page.unsqueeze(0), a, b)
        return 2 * (b - a) * page[0, 0, 0].numel() * page.element_size()

    @property
    def sink_slot(self) -> int:
        """Rows reserved for the rotated sink (0: no slot)."""
        return self.capacity - self.ring

    @property
    def nbytes(self) -> int:
        """Device bytes of this cache alone (0 when offloaded: the shared buffer is the runner's)."""
        return 0 if self.working is not None else self.kv.numel() * self.kv.element_size()  # paged: resident part

    @property
    def host_nbytes(self) -> int:
        pages = sum(t.numel() * t.element_size() for t in self._host_pages)
        return pages + (0 if self.host is None else self.host.numel() * self.host.element_size())

    def reset(self) -> None:
        """Empty the cache (new job). Rows are zeroed, as a fresh reference cache."""
        if self.paged_layers:
            if self.pager is not None:  # no write-back in flight into the rows zeroed now
                self.pager.forget_cache(self)
            for page in self._host_pages:
                page.zero_()
            self.kv.zero_()
            self._pages.clear()
        elif self.host is not None:
            if self._out_event is not None:  # a pending page-out must not land after the zeroing
                self._out_event.synchronize()
                self._out_event = None
            self.host.zero_()
            if self.working.owner is self:
                self.working.owner = None
        else:
            self.kv.zero_()
        self.length = 0
        self._last = None
        self._sink_key = None
        self._sink_val = None

    def page_in(self, stream=None) -> None:
        """Offload mode: bring this cache's filled rows into its device buffer (no-op when
        resident, or when the buffer already holds them or they are on their way).

        `stream`: a CUDA copy stream to do it asynchronously (prefetch); the compute stream then
        calls `wait_ready()` before using the rows. None: on the current stream."""
        w = self.working
        if w is None or w.owner is self:
            return
        if stream is None:
            if w.ready is not None:  # an earlier prefetch into this buffer may still be in flight
                torch.cuda.current_stream(self.kv.device).wait_event(w.ready)
                w.ready = None
            if self.length:
                _copy_rows(self.kv, self.host, 0, self.length)
        else:
            with torch.cuda.stream(stream):
                if w.released is not None:  # the buffer's previous user: computed and paged out
                    stream.wait_event(w.released)
                if self._out_event is not None:  # this cache's own last page-out reached the host
                    stream.wait_event(self._out_event)
                if self.length:
                    _copy_rows(self.kv, self.host, 0, self.length)
                w.ready = torch.cuda.Event()
                w.ready.record(stream)
        w.owner = self

    def wait_ready(self) -> None:
        """Make the current stream wait for an asynchronous `page_in` of this cache."""
        w = self.working
        if w is not None and w.owner is self and w.ready is not None:
            torch.cuda.current_stream(self.kv.device).wait_event(w.ready)
            w.ready = None

    def page_out(self) -> None:
        """Offload mode: copy the rows the last call wrote back to host memory (current stream)."""
        if self.working is None or self._last is None:
            return
        a, b = self._last.offset, self._last.offset + self._last.tokens
        _copy_rows(self.host, self.kv, a, b)
        self._last = None
        if self.kv.is_cuda:  # orders the next page-in of this cache and the buffer's next user
            self._out_event = torch.cuda.Event()
            self._out_event.record(torch.cuda.current_stream(self.kv.device))
            self.working.released = self._out_event

    def ring_rows(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of ring rows [start, stop) of a layer, each `[1, n, heads, head_dim]`."""
        kv = self.layer_kv(layer)
        return kv[0, :, start:stop], kv[1, :, start:stop]

    def plan(self, start_token: int, num_tokens: int, sink: SinkCache, ref_t: int) -> StreamWindow:
        """Ring offset and window for a block starting at absolute token `start_token`.

        While `start_token < ring` (first clip) the window grows to the block's end; afterwards
        the write offset wraps (`start_token mod ring`) and the whole ring is attended.
        """
        if sink.length == 0:
            raise RuntimeError("the sink cache is empty: call model.prefill_sink() before forward_block()")
        if self.sink_slot and sink.length > self.sink_slot:
            raise ValueError(f"sink has {sink.length} tokens, this step cache has room for {self.sink_slot}")
        if start_token < self.ring:
            offset, window = start_token, start_token + num_tokens
        else:
            offset, window = start_token % self.ring, self.ring
        if offset + num_tokens > self.ring:
            raise ValueError(
                f"block rows [{offset}, {offset + num_tokens}) do not fit the ring of {self.ring} tokens; "
                "start_frame must be a multiple of the block length")
        return StreamWindow(
            offset=offset, tokens=num_tokens, window=window, sink_len=sink.length,
            refresh_keys=not self.sink_slot or self._sink_key != (sink.uid, sink.version, ref_t),
            refresh_values=bool(self.sink_slot) and self._sink_val != (sink.uid, sink.version),
        )

    def commit(self, plan: StreamWindow, sink: SinkCache, ref_t: int) -> None:
        """Record a finished block call (fill level, which sink the slot now holds)."""
        if self.working is not None and self.working.owner is not self:
            raise RuntimeError("StepKVCache: offloaded cache used without page_in() (the StepRunner pages)")
        self._last = plan
        self.length = max(self.length, plan.window)
        if self.sink_slot:
            self._sink_key = (sink.uid, sink.version, ref_t)
            self._sink_val = (sink.uid, sink.version)

    def stream_attend(self, layer: int, plan: StreamWindow, rope: RopeFactors | None, sink: SinkCache,
                      sink_rope: RopeFactors | None, backend: str = "sdpa", rotate=None,
                      rows: torch.Tensor | None = None):
        """Self-attention policy of a streaming call for one layer (see the module docstring).

        `rows`: the ring rows the block is written to as a device index tensor `[tokens]` (int64,
        = `arange(plan.offset, plan.offset + plan.tokens)`), so that a captured CUDA graph serves
        every ring offset; None writes the slice `plan.offset:` directly.
        `rope=None`: the q and k handed to the policy are already rotated (fused block path).
        `rotate(x, factors, out_dtype)`: the rotation used for the sink keys (default `apply_rope`;
        the compiled path passes a fused one).
        """
        rotate = rotate or apply_rope

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            buf = self.layer_kv(layer)  # [2, 1, rows, H, D] (fp8: packed uint8 rows)
            r, s = self.ring, plan.sink_len
            fp8, dt = buf.dtype == torch.uint8, v.dtype
            if rope is None:
                q_rot, k_rot = q, k
            else:
                q_rot, k_rot = apply_rope(q, rope, out_dtype=dt), apply_rope(k, rope, out_dtype=dt)
            if rows is None:
                buf[0, :, plan.offset: plan.offset + plan.tokens] = pack_rows(k_rot, buf.dtype)
                buf[1, :, plan.offset: plan.offset + plan.tokens] = pack_rows(v, buf.dtype)
            else:
                buf[0].index_copy_(1, rows, pack_rows(k_rot, buf.dtype))
                buf[1].index_copy_(1, rows, pack_rows(v, buf.dtype))
            if not self.sink_slot:  # reference way: rotate and concatenate every time
                sink_k = rotate(sink.keys(layer), sink_rope, out_dtype=dt)
                keys = torch.cat([unpack_rows(buf[0, :, : plan.window], dt), sink_k], dim=1)
                values = torch.cat([unpack_rows(buf[1, :, : plan.window], dt), sink.values(layer).to(dt)], dim=1)
            else:
                if plan.refresh_keys:
                    buf[0, :, r: r + s] = pack_rows(rotate(sink.keys(layer), sink_rope, out_dtype=dt), buf.dtype)
                if plan.refresh_values:
                    buf[1, :, r: r + s] = pack_rows(sink.values(layer), buf.dtype)
                if plan.window == r:
                    keys, values = buf[0, :, : r + s], buf[1, :, : r + s]
                else:
                    keys = torch.cat([buf[0, :, : plan.window], buf[0, :, r: r + s]], dim=1)
                    values = torch.cat([buf[1, :, : plan.window], buf[1, :, r: r + s]], dim=1)
                keys, values = unpack_rows(keys, dt), unpack_rows(values, dt)
            if fp8:  # the block attends to its own rows unquantized (they sit at the same positions)
                keys, values = _own_rows(keys, k_rot, plan, rows), _own_rows(values, v, plan, rows)
            return attention(q_rot, keys, values, backend)

        return attend


__all__ = ["SinkCache", "StepKVCache", "StreamWindow", "KVWorkingBuffer"]
