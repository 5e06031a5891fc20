"""Layer-sharded DiT ranks (schedule kind "layers"): the per-rank loop and the slice's job state.

N DiT ranks each hold a contiguous slice of the DiT's layers (`CausalS2VDiT(cfg, layers=...)`)
with the KV caches of those layers for every denoising step, and the sink of those layers. The
unit of work is an item: the sink prefill (at the start, and the Rolling Sink refresh at clip 1)
or one (block, step) pair. Every slice runs the same item sequence (`item_order`). Rank 0 embeds
the block latents and runs its layers; the tokens `[1, tokens, dim]` (with the block latents x,
float32, which the last slice needs for the scheduler step) go rank k -> k + 1; the last slice
applies the head and the Euler step and hands the new x back to rank 0 over the ring link for
the next step (or, after the last step, to the decoder: itself or a decode rank).

Keeping the pipeline full: the sequence runs the diagonals (b, 0), (b-1, 1), ... in order of
b + s (within one, lower steps first), so (b, s) is S + 1 items behind (b, s - 1), its only
input; with N <= S + 1 slices no slice waits for a result in steady state. (b, s) also needs
block b - 1's step-s keys/values of each layer, which the same slice wrote earlier in the
sequence. The sink refresh at clip 1 (from the final latents of block 0) comes after every item
of clip 0 and before any of clip 1, as in one process (a short drain once per job).

Rank 0 receives ring messages in the last slice's order and keeps the ones it does not need yet
(the refresh's latents arrive long before the refresh). Only rank 0 decides to stop (cancel): it
sends STOP down the slices in place of its next item, the last slice answers STOP on the ring,
and rank 0 drains the ring up to it, so no p2p operation is left pending.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from parallel.schedule import Role
from parallel.tpp import DATA, STOP, TAG_RING, TAG_STREAM, BlockFrames, JobPlan, Links, RankStats, run_rank

TAG_HIDDEN = 5  # header tag of the tokens between slices (payload 6), beside tpp's tags
PREFILL, STEP = 0, 1


@dataclass(frozen=True)
class Item:
    """One unit of work: a sink prefill (`phase` 0 at the start, 1 the refresh at clip 1) or
    denoising step `step` of block `block` (global block index)."""

    kind: int
    block: int = -1
    step: int = -1
    phase: int = 0


def item_order(num_blocks: int, num_steps: int, blocks_per_clip: int, refresh: bool) -> list[Item]:
    """The item sequence every slice runs (module docstring): prefill, then the (block, step)
    diagonals of clip 0, the refresh (when `refresh`), the diagonals of the later clips."""

    def diagonals(blocks: range) -> list[Item]:
        pairs = [(b, s) for b in blocks for s in range(num_steps)]
        return [Item(STEP, b, s) for b, s in sorted(pairs, key=lambda p: (p[0] + p[1], p[1]))]

    if not refresh or num_blocks <= blocks_per_clip:
        return [Item(PREFILL)] + diagonals(range(num_blocks))
    return ([Item(PREFILL)] + diagonals(range(blocks_per_clip)) + [Item(PREFILL, phase=1)]
            + diagonals(range(blocks_per_clip, num_blocks)))


def run_any(engine: Any, role: Role, plan: JobPlan, cancelled: Callable[[], bool],
            stats: RankStats | None = None, links: Links | None = None) -> Iterator[BlockFrames]:
    """This rank's part of one prepared job in any layout: a layer slice runs `run_slices`, every
    other rank `tpp.run_rank` (the one entry of worker processes)."""
    if not role.sliced:
        yield from run_rank(engine, role, plan, cancelled, stats, links)
        return
    stats = stats if stats is not None else RankStats(role.rank)
    if plan.num_steps is not None:
        role = role.for_steps(plan.num_steps)
    if role.world_size > 1 and links is None:
        raise ValueError("run_any: a world of several ranks needs Links")
    yield from run_slices(engine, role, plan, cancelled, stats, links)


def run_slices(engine: Any, role: Role, plan: JobPlan, cancelled: Callable[[], bool],
               stats: RankStats, links: Links) -> Iterator[BlockFrames]:
    """This slice's part of one prepared job (`run_any` hands sliced DiT ranks here; `role` already
    for the job's step count).

    The engine provides `slice_prefill(phase, first_block, hidden)`, `slice_step(clip, block,
    step, x, hidden)`, `initial_latents(clip, block)` and, on the decoding slice, `decode`.
    """
    t_start = time.perf_counter()
    k, n = role.rank % role.num_slices, role.num_slices
    first, last = k == 0, k == n - 1
    steps, per_clip = len(role.steps), plan.blocks_per_clip
    refresh = plan.refresh_sink and plan.num_clips > 1
    items = item_order(plan.num_blocks, steps, per_clip, refresh)
    due = plan.num_blocks * (steps - 1) + int(refresh)  # ring messages rank 0 receives in a full job
    ring = _Ring(links, n - 1, due) if first else None
    nxt = role.rank + 1
    pending = None if first else _post_item(links, role.rank - 1, items[0], plan)
    block_s: dict[int, float] = {}
    stopped = False
    for idx, item in enumerate(items):
        if first:
            if cancelled():
                _send_item(links, nxt, items[idx], plan, STOP, idx, None, None)
                stopped = True
                break
            x, hidden = _first_input(engine, item, ring, steps, per_clip), None
        else:
            kind, index, x, hidden = _wait_item(links, pending)
            pending = None
            if kind == STOP:
                if not last:
                    _send_item(links, nxt, item, plan, STOP, idx, None, None)
                stopped = True
                break
            if index != idx:
                raise RuntimeError(f"rank {role.rank}: expected item {idx} from rank {role.rank - 1}, got {index}")
            if idx + 1 < len(items):
                pending = _post_item(links, role.rank - 1, items[idx + 1], plan)
        t0 = time.perf_counter()
        if item.kind == PREFILL:
            out = engine.slice_prefill(item.phase, x if item.phase else None, hidden)
        else:
            clip, blk = divmod(item.block, per_clip)
            out = engine.slice_step(clip, blk, item.step, x, hidden)
        _sync(role.device)
        elapsed = time.perf_counter() - t0
        stats.compute_s += elapsed
        if item.kind == STEP:
            block_s[item.block] = block_s.get(item.block, 0.0) + elapsed
            if item.step == steps - 1:
                stats.block_compute_s.append(block_s.pop(item.block))
        if not last:
            _send_item(links, nxt, item, plan, DATA, idx, x, out)
            if item.kind == STEP and item.step == steps - 1:
                stats.block_done()
            continue
        if item.kind == PREFILL:
            continue
        final = item.step == steps - 1
        if not final or (refresh and item.block == 0):  # next step (or the refresh) on rank 0
            links.send(0, TAG_RING, DATA, item.block * steps + item.step, out)
        if final:
            yield from _finish_block(engine, role, links, stats, item.block, per_clip, out)
    if last and stopped:
        links.send(0, TAG_RING, STOP, -1, None)  # rank 0 drains the ring up to this
    if last and stopped and not role.decodes:
        links.send(role.rank + 1, TAG_STREAM, STOP, -1, None)
    if pending is not None:
        _wait_item(links, pending)
    if ring is not None:
        ring.close(stopped)
    links.flush()
    stats.wall_s += time.perf_counter() - t_start


class _Ring:
    """Rank 0's end of the ring link: one receive posted while messages are `due`; messages it
    does not need yet are kept by the item that produced them (block * steps + step)."""

    def __init__(self, links: Links, src: int, due: int) -> None:
        self.links, self.src, self.due = links, src, due
        self.kept: dict[int, torch.Tensor] = {}
        self.pending = self._post()

    def _post(self) -> Any:
        if self.due <= 0:
            return None
        self.due -= 1
        return self.links.post_recv(self.src, TAG_RING)

    def take(self, produced_by: int) -> torch.Tensor:
        """The x the item `produced_by` produced (waits for ring messages until it is there)."""
        while produced_by not in self.kept:
            if self.pending is None:
                raise RuntimeError(f"rank 0: no ring message left for item {produced_by}")
            kind, index, payload = self.links.wait_recv(self.pending)
            self.pending = self._post()
            if kind == STOP:
                raise RuntimeError("rank 0: the last slice stopped the job unasked")
            self.kept[index] = payload
        return self.kept.pop(produced_by)

    def close(self, stopped: bool) -> None:
        """After rank 0 sent STOP: receive (and drop) up to the last slice's STOP answer."""
        if not stopped:
            return
        while True:
            pending = self.pending or self.links.post_recv(self.src, TAG_RING)
            self.pending = None
            kind, _, _ = self.links.wait_recv(pending)
            if kind == STOP:
                return
            self.pending = self._post()


def _first_input(engine: Any, item: Item, ring: _Ring, steps: int, per_clip: int) -> torch.Tensor | None:
    """Rank 0's input of an item: noise at step 0, the ring's x after, the final x of block 0
    for the refresh, nothing for the first prefill."""
    if item.kind == PREFILL:
        return None if item.phase == 0 else ring.take(steps - 1)
    if item.step == 0:
        return engine.initial_latents(*divmod(item.block, per_clip))
    return ring.take(item.block * steps + item.step - 1)


def _shapes(item: Item, plan: JobPlan) -> tuple[tuple[int, ...], torch.dtype]:
    return (plan.sink_hidden_shape if item.kind == PREFILL else plan.hidden_shape), plan.hidden_dtype


def _post_item(links: Links, src: int, item: Item, plan: JobPlan) -> tuple:
    shape, dtype = _shapes(item, plan)
    return (links.post_recv(src, TAG_STREAM), links.post_recv(src, TAG_HIDDEN, shape, dtype))


def _wait_item(links: Links, pending: tuple) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    kind, index, x = links.wait_recv(pending[0])
    _, _, hidden = links.wait_recv(pending[1])
    return kind, index, x, hidden


def _send_item(links: Links, dst: int, item: Item, plan: JobPlan, kind: int, index: int,
               x: torch.Tensor | None, hidden: torch.Tensor | None) -> None:
    shape, dtype = _shapes(item, plan)
    links.send(dst, TAG_STREAM, kind, index, x)
    links.send(dst, TAG_HIDDEN, kind, index, hidden if hidden is not None else torch.zeros(shape), dtype)


def _finish_block(engine: Any, role: Role, links: Links, stats: RankStats, block: int, per_clip: int,
                  x: torch.Tensor) -> Iterator[BlockFrames]:
    """The last slice's final latents of a block: decode here, or send to the decode rank."""
    clip, blk = divmod(block, per_clip)
    if not role.decodes:
        links.send(role.rank + 1, TAG_STREAM, DATA, block, x)
        stats.block_done()
        return
    t0 = time.perf_counter()
    frames = engine.decode(clip, blk, x)
    _sync(role.device)
    stats.decode_s += time.perf_counter() - t0
    stats.block_done()
    if frames is not None:
        yield BlockFrames(clip, blk, frames)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream(torch.device(device)).synchronize()


__all__ = ["Item", "item_order", "run_slices", "PREFILL", "STEP", "TAG_HIDDEN"]
