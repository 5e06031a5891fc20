"""The per-rank job runner: one schedule around the engine's per-step code.

Every rank, whatever the schedule, runs `run_rank`: single-rank mode is the same loop with no
neighbours. A block's latents `x` (shape `plan.latent_shape`, e.g. `[C, F_block, h, w]`) enter at
DiT rank 0 (`engine.initial_latents`), go through each DiT rank's own steps (`engine.run_steps`,
which checks the cancel flag between steps) and end at the decode rank
(`engine.decode`), which yields the frames of that block.

Point-to-point protocol (torch.distributed isend/irecv over gloo, through host memory, one
process group per link, see `LinkGroups`; every message is a header `int64[2]` = (kind, block index) followed by a payload of
`plan.latent_shape`):

- stream (tag 1/2): rank k -> k+1, then last DiT rank -> decode rank. Exactly one message per
  block index, in order, or a STOP message after which that sender sends nothing more. Receivers
  pre-post the next receive before computing, so transfers overlap compute.
- sink (tag 3/4): when the plan refreshes the sink and has more than one clip, the last DiT rank
  sends the final latents of clip 0 block 0 to every other DiT rank exactly once per job (a STOP
  message if it never got that far). They receive it before `begin_clip(1, ...)`, or drain it at
  the end of a cancelled job.

Cancel: rank 0 stops producing; a rank that sees the cancel flag forwards STOP instead of data and
drains its upstream without computing. Every send has a matching receive, so no collective or
p2p operation is left pending when the job ends (idle ranks never sit inside one).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch

from parallel.schedule import Role

DATA, STOP = 0, 1
TAG_STREAM, TAG_SINK, TAG_RING = 1, 3, 7  # header tag; payload uses tag + 1 (5: parallel.slices' tokens)


@dataclass(frozen=True)
class JobPlan:
    """Shape of a job, identical on every rank (the engine derives it from the job inputs).

    Block i belongs to clip i // blocks_per_clip (the last clip may be shorter). `num_steps`:
    the job's denoising steps (None: the group's schedule), re-split over the same DiT ranks.
    """

    num_blocks: int
    blocks_per_clip: int
    latent_shape: tuple[int, ...]  # one block's latents, e.g. [C, F_block, h, w]
    dtype: torch.dtype = torch.float32
    refresh_sink: bool = True  # DiT ranks get clip 0 block 0's final latents for clips >= 1
    num_steps: int | None = None
    # layer slices (`parallel.slices`): the tokens between slices of a block step / a sink prefill
    hidden_shape: tuple[int, ...] = ()  # e.g. [1, F_block * fsl, dim]
    sink_hidden_shape: tuple[int, ...] = ()  # e.g. [1, sink_tokens, dim]
    hidden_dtype: torch.dtype = torch.float32

    @property
    def num_clips(self) -> int:
        return -(-self.num_blocks // self.blocks_per_clip)


@dataclass
class BlockFrames:
    """Decoded frames of one block (whatever `engine.decode` returned, e.g. `[T, H, W, 3]`)."""

    clip: int
    block: int
    frames: Any


@dataclass
class RankStats:
    """Seconds one rank spent computing and waiting on its neighbours during a job."""

    rank: int
    compute_s: float = 0.0
    decode_s: float = 0.0
    recv_wait_s: float = 0.0
    send_wait_s: float = 0.0
    blocks: int = 0
    wall_s: float = 0.0
    block_compute_s: list = field(default_factory=list)  # DiT compute of each block, in order
    extra: dict = field(default_factory=dict)
    last_block_at: float = field(default_factory=time.monotonic)  # when `blocks` last grew (job start)

    def block_done(self) -> None:
        """Count one block this rank finished (its heartbeat reports the count and its age)."""
        self.blocks += 1
        self.last_block_at = time.monotonic()

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("last_block_at")
        d["wait_share"] = (self.recv_wait_s + self.send_wait_s) / self.wall_s if self.wall_s else 0.0
        return d


class Engine(Protocol):
    """What a model must provide to run under any schedule (one instance per rank).

    All methods run on the rank's own device (`role.device`). A decode-only rank gets `load`,
    `prepare`, `decode`, `end_job`; DiT ranks get everything except `decode` unless they decode.
    """

    def load(self, config: Mapping[str, Any], role: Role) -> None:
        """Load what this role needs (DiT ranks: DiT + encoders; decode rank: the VAE)."""

    def prepare(self, job: Mapping[str, Any]) -> JobPlan:
        """Per-job setup (conditioning, fresh KV caches for this rank's steps only, i.e.
        `role.for_steps(job steps).steps`); returns the same plan on every rank."""

    def begin_clip(self, clip: int, first_block: torch.Tensor | None) -> None:
        """Start clip `clip` (DiT ranks). `first_block`: final latents of clip 0 block 0, given
        for clips >= 1 when the plan refreshes the sink (the engine refreshes at clip 1)."""

    def initial_latents(self, clip: int, block: int) -> torch.Tensor:
        """Noise of one block (rank 0 only), shape `plan.latent_shape`."""

    def run_steps(self, clip: int, block: int, x: torch.Tensor, steps: Sequence[int],
                  cancelled: Callable[[], bool]) -> torch.Tensor | None:
        """Run denoising steps `steps` (absolute indices, this rank's own) on block latents `x`.

        Returns the new `x`, or None if `cancelled()` turned true between two steps.
        """

    def decode(self, clip: int, block: int, x: torch.Tensor) -> Any:
        """Decode one finished block (decode rank); returns its frames, or None to emit nothing."""

    def end_job(self) -> None:
        """Drop per-job state (KV caches, decoder caches)."""

    def unload(self) -> None:
        """Free everything `load` took."""


class _Recv:
    def __init__(self, header: torch.Tensor, payload: torch.Tensor, works: list) -> None:
        self.header, self.payload, self.works = header, payload, works

    def wait(self) -> tuple[int, int, torch.Tensor]:
        for w in self.works:
            w.wait()
        kind, index = self.header.tolist()
        return int(kind), int(index), self.payload


@dataclass
class LinkGroups:
    """Process groups that carry the p2p traffic: one per pipeline link and one for the sink.

    They are gloo groups, so latents cross between ranks through host memory even when the ranks
    compute on GPUs under NCCL. A pending NCCL receive is a kernel spinning on the receiver's GPU
    (and a pending send one on the sender's); with CUDA's lazy module loading, a rank that
    launches a kernel for the first time (first block, first decode, a new clip) can wait for its
    GPU to drain, which a receive that depends on that same rank's progress never lets happen.
    On 2 H100s that hung the first job. A block's latents are under 1 MB, so the host copy costs
    about a millisecond against hundreds of milliseconds of compute, and no GPU ever waits on a
    peer. A group per link (k -> k+1) and a separate sink group keep each message stream
    one-directional. Create them with `make_link_groups` on every rank, in the same order, right
    after the process group is initialised.
    """

    forward: dict[int, Any]  # sender rank k -> group {k, k+1}
    sink: Any  # group of the DiT ranks (None when there is a single DiT rank)
    ring: Any = None  # layer slices: the last slice -> rank 0 (group {0, num_dit_ranks - 1})


def make_link_groups(world_size: int, num_dit_ranks: int, rank: int | None = None,
                     ring: bool = False) -> LinkGroups:
    """Collective: every rank must call this with the same arguments. With `rank`, every link
    also carries one message here (`warm_links`), so a broken link fails at start, not in a job.
    `ring`: also the link from the last DiT rank back to rank 0 (layer slices)."""
    import torch.distributed as dist

    forward = {k: dist.new_group([k, k + 1], backend="gloo") for k in range(world_size - 1)}
    sink = dist.new_group(list(range(num_dit_ranks)), backend="gloo") if num_dit_ranks > 1 else None
    back = dist.new_group([0, num_dit_ranks - 1], backend="gloo") if ring and num_dit_ranks > 1 else None
    groups = LinkGroups(forward, sink, back)
    if rank is not None:
        warm_links(groups, rank, num_dit_ranks)
    return groups


def warm_links(groups: LinkGroups, rank: int, num_dit_ranks: int) -> None:
    """Send one tiny message over every link, in the same order on every rank (forward links in
    pipeline order, then the sink pairs), so that each link is known to work before any job."""
    import torch.distributed as dist

    token = torch.zeros(1)
    for k in sorted(groups.forward):
        if rank == k:
            dist.send(token, k + 1, group=groups.forward[k])
        elif rank == k + 1:
            dist.recv(token, k, group=groups.forward[k])
    if groups.sink is not None:
        last = num_dit_ranks - 1
        for dst in range(last):
            if rank == last:
                dist.send(token, dst, group=groups.sink)
            elif rank == dst:
                dist.recv(token, last, group=groups.sink)
    if groups.ring is not None:
        if rank == num_dit_ranks - 1:
            dist.send(token, 0, group=groups.ring)
        elif rank == 0:
            dist.recv(token, num_dit_ranks - 1, group=groups.ring)


class Links:
    """Non-blocking point-to-point messages over `LinkGroups`, with wait accounting.

    `device`: where message tensors live, the CPU for gloo links (`LinkGroups`); received
    payloads are handed to the engine there, and the engine moves them to its own device.
    """

    def __init__(self, plan: JobPlan, device: torch.device, stats: RankStats, rank: int,
                 groups: LinkGroups | None = None, max_inflight: int = 4) -> None:
        self.plan, self.device, self.stats, self.rank = plan, device, stats, rank
        self.groups = groups
        self._sends: deque = deque()
        self._max_inflight = max_inflight

    def _group(self, src: int, dst: int, tag: int) -> Any:
        if self.groups is None:
            return None  # default group (fine for gloo; NCCL wants LinkGroups)
        if tag == TAG_SINK:
            return self.groups.sink
        if tag == TAG_RING:
            return self.groups.ring
        return self.groups.forward[src]

    def post_recv(self, src: int, tag: int, shape: tuple[int, ...] | None = None,
                  dtype: torch.dtype | None = None) -> _Recv:
        """Receive a header and a payload (`shape` / `dtype`: default the plan's block latents)."""
        import torch.distributed as dist

        group = self._group(src, self.rank, tag)
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        payload = torch.empty(shape or self.plan.latent_shape, dtype=dtype or self.plan.dtype, device=self.device)
        works = [dist.irecv(header, src, group=group, tag=tag),
                 dist.irecv(payload, src, group=group, tag=tag + 1)]
        return _Recv(header, payload, works)

    def wait_recv(self, pending: _Recv) -> tuple[int, int, torch.Tensor]:
        t0 = time.perf_counter()
        out = pending.wait()
        self.stats.recv_wait_s += time.perf_counter() - t0
        return out

    def send(self, dst: int, tag: int, kind: int, index: int, x: torch.Tensor | None,
             dtype: torch.dtype | None = None) -> None:
        """Send a header and `x` (None: zeros of the plan's block latents) as `dtype` (default the plan's)."""
        import torch.distributed as dist

        header = torch.tensor([kind, index], dtype=torch.int64, device=self.device)
        if x is None:
            x = torch.zeros(self.plan.latent_shape, dtype=self.plan.dtype, device=self.device)
        x = x.to(device=self.device, dtype=dtype or self.plan.dtype).contiguous()
        group = self._group(self.rank, dst, tag)
        self._sends.append((dist.isend(header, dst, group=group, tag=tag), header, x))
        self._sends.append((dist.isend(x, dst, group=group, tag=tag + 1), header, x))
        while len(self._sends) > 2 * self._max_inflight:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        work = self._sends.popleft()[0]
        t0 = time.perf_counter()
        work.wait()
        self.stats.send_wait_s += time.perf_counter() - t0

    def flush(self) -> None:
        while self._sends:
            self._wait_oldest()


def _sync(device: torch.device) -> None:
    """Wait for this rank's compute stream (not the whole device: nothing else may wait on it)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def run_rank(engine: Engine, role: Role, plan: JobPlan, cancelled: Callable[[], bool],
             stats: RankStats | None = None, links: Links | None = None) -> Iterator[BlockFrames]:
    """Run this rank's part of one prepared job; yields frames on the decode rank.

    `links` is required when `role.world_size > 1`. Returns normally both when the job finished
    and when it was cancelled (check `cancelled()`); on return no p2p operation is pending.
    """
    stats = stats if stats is not None else RankStats(role.rank)
    if plan.num_steps is not None:
        role = role.for_steps(plan.num_steps)
    if role.world_size > 1 and links is None:
        raise ValueError("run_rank: a world of several ranks needs Links")
    if role.sliced:
        raise ValueError("run_rank: a layer slice runs parallel.slices.run_slices (see parallel.slices.run_any)")
    t_start = time.perf_counter()
    device = torch.device(role.device)
    total, per_clip = plan.num_blocks, plan.blocks_per_clip
    share_sink = plan.refresh_sink and plan.num_clips > 1 and role.num_dit_ranks > 1
    last_dit = role.num_dit_ranks - 1
    sink_pending = (links.post_recv(last_dit, TAG_SINK)
                    if share_sink and role.is_dit and not role.is_last_dit else None)
    sink_sent = False
    first_block: torch.Tensor | None = None
    upstream = role.prev_rank if role.is_dit else last_dit
    pending = links.post_recv(upstream, TAG_STREAM) if upstream is not None and total else None
    stopped = False  # STOP sent downstream: from now on only drain

    def stop_downstream() -> None:
        nonlocal stopped
        if not stopped and not role.decodes:
            links.send(role.next_rank, TAG_STREAM, STOP, -1, None)
        stopped = True

    i = 0
    while i < total:
        x = None
        if upstream is not None:
            kind, index, payload = links.wait_recv(pending)
            pending = None
            if kind == STOP:
                break
            if index != i:
                raise RuntimeError(f"rank {role.rank}: expected block {i} from rank {upstream}, got {index}")
            x = payload
            if i + 1 < total:
                pending = links.post_recv(upstream, TAG_STREAM)
        elif cancelled():
            break
        if stopped or cancelled():
            stop_downstream()
            i += 1
            continue
        clip, block = divmod(i, per_clip)
        if role.is_dit:
            t0 = time.perf_counter()
            if block == 0:
                if clip >= 1 and plan.refresh_sink and first_block is None and sink_pending is not None:
                    kind, _, payload = links.wait_recv(sink_pending)
                    sink_pending = None
                    if kind == STOP:  # the last rank stopped before clip 0 block 0: job is ending
                        stop_downstream()
                        i += 1
                        continue
                    first_block = payload
                engine.begin_clip(clip, first_block if clip >= 1 and plan.refresh_sink else None)
            if x is None:
                x = engine.initial_latents(clip, block)
            x = engine.run_steps(clip, block, x, role.steps, cancelled)
            _sync(device)  # so that compute and wait times are measured apart
            elapsed = time.perf_counter() - t0
            stats.compute_s += elapsed
            stats.block_compute_s.append(elapsed)
            if x is None or cancelled():
                stop_downstream()
                i += 1
                continue
            if role.is_last_dit and i == 0 and plan.refresh_sink and plan.num_clips > 1:
                first_block = x.detach().clone()
                if share_sink:
                    for dst in range(last_dit):
                        links.send(dst, TAG_SINK, DATA, 0, first_block)
                    sink_sent = True
        if role.decodes:
            t0 = time.perf_counter()
            frames = engine.decode(clip, block, x)
            _sync(device)
            stats.decode_s += time.perf_counter() - t0
            stats.block_done()
            if frames is not None:
                yield BlockFrames(clip, block, frames)
        else:
            links.send(role.next_rank, TAG_STREAM, DATA, i, x)
            stats.block_done()
        i += 1
    if i < total:  # ended early (upstream STOP or cancel on rank 0): tell downstream
        stop_downstream()
    if share_sink and role.is_last_dit and not sink_sent:
        for dst in range(last_dit):
            links.send(dst, TAG_SINK, STOP, 0, None)
    if sink_pending is not None:
        links.wait_recv(sink_pending)
    if links is not None:
        links.flush()
    stats.wall_s += time.perf_counter() - t_start


def run_inprocess(engine: Engine, job: Mapping[str, Any], role: Role,
                  should_cancel: Callable[[], bool] | None = None,
                  stats: RankStats | None = None) -> Iterator[BlockFrames]:
    """Single-rank mode in this process (no torch.distributed): the same loop as every worker.

    `role` is the one-rank role the engine was loaded with (e.g. `schedule.single(S).role(0)`).
    """
    if role.world_size != 1:
        raise ValueError(f"run_inprocess runs one rank; role has world_size {role.world_size}")
    plan = engine.prepare(job)
    try:
        yield from run_rank(engine, role, plan, should_cancel or (lambda: False), stats)
    finally:
        engine.end_job()


__all__ = ["JobPlan", "BlockFrames", "RankStats", "Engine", "LinkGroups", "make_link_groups", "warm_links", "Links",
           "run_rank", "run_inprocess", "DATA", "STOP"]
