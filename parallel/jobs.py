"""A job on a worker group (`JobHandle`, made by `WorkerGroup.submit`) and its `JobResult`."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from parallel.faults import GroupError, JobInputError, WorkerError, with_remedy
from parallel.procs import innermost_frames, last_traceback, tail
from parallel.stall import RankProgress, stalled_ranks
from parallel.tpp import BlockFrames

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    """End of a job: `status` is "ok" or "cancelled"; `stats` per rank (seconds, wait share)."""

    status: str
    blocks: int
    seconds: float
    stats: dict[int, dict] = field(default_factory=dict)


class JobHost(Protocol):
    """What a `JobHandle` uses of the `parallel.group.WorkerGroup` that submitted it (that module
    imports this one, so the handle only knows the group by these members)."""

    config: Any  # GroupConfig: schedule.decode_rank, stall (StallLimit), heartbeat_s
    world_size: int
    state: str
    chans: dict  # rank -> parallel.channel.Channel
    log_dir: Path
    progress: dict  # rank -> parallel.stall.RankProgress (from the heartbeats)
    _last_hb: dict  # rank -> monotonic seconds of its last message
    _job_lock: threading.Lock

    def log_path(self, rank: int) -> Path: ...

    def dump_stacks(self) -> None: ...

    def _next_event(self, deadline: float | None) -> tuple | None: ...

    def _break(self) -> None: ...


class JobHandle:
    """One submitted job. Iterate `frames()` exactly once; then `result` holds the JobResult."""

    def __init__(self, group: JobHost, job_id: int) -> None:
        self.group, self.job_id = group, job_id
        self.result: JobResult | None = None
        self._cancel_sent = False
        self._done: dict[int, tuple[bool, dict]] = {}
        self._input_errors: list[tuple[int, str]] = []
        self._blocks = 0
        self._block_s: list[float] = []  # seconds each block took to arrive (StallLimit.limit_s)
        self._t0 = self._last_block = self._last_progress = time.monotonic()

    def cancel(self) -> None:
        """Ask every rank to stop this job at its next block or step boundary (any thread)."""
        if self._cancel_sent:
            return
        self._cancel_sent = True
        for chan in self.group.chans.values():
            try:
                chan.send(("cancel", self.job_id))
            except EOFError:  # ChannelClosed: that rank's fault is reported by the reader
                pass

    def _fail(self, first: tuple, grace_s: float = 1.5) -> WorkerError:
        """Build the error for a fault and tear the group down.

        Peers of a dead rank fail too (their sockets close), sometimes before the controller
        sees the death: gather the faults of the next `grace_s` seconds and blame a lost or
        hung rank before ranks that merely raised.
        """
        faults = [first]
        deadline = time.monotonic() + grace_s
        while (msg := self.group._next_event(deadline)) is not None:
            if msg[0] in ("lost", "hung") or (msg[0] == "error" and msg[2] != "prepare"):
                faults.append(msg)
        faults.sort(key=lambda m: {"lost": 0, "hung": 1}.get(m[0], 2))
        main = faults[0]
        rank = main[1]
        if main[0] == "error":
            _, _, phase, _, text, tb = main
            detail = f"failed ({phase}): {with_remedy(text)}"
        else:
            detail, tb = main[2], last_traceback(tail(self.group.log_path(rank)))
        self.group._break()
        others = sorted({m[1] for m in faults[1:]} - {rank})
        msg = f"rank {rank} {detail} (job {self.job_id}, after {time.monotonic() - self._t0:.1f} s)"
        if others:
            msg += f"; ranks {others} failed after it"
        tb = tb.strip()
        if tb:
            msg += f"; its last traceback:\n{tb[-3000:]}"
        return WorkerError(msg, rank, tb)

    def _handle(self, msg: tuple) -> BlockFrames | None:
        """Account one event; returns frames of this job, raises on faults."""
        kind = msg[0]
        if kind == "frames" and msg[1] == self.job_id:
            now = time.monotonic()
            self._blocks += 1
            self._block_s.append(now - self._last_block)
            self._last_block = self._last_progress = now
            return BlockFrames(msg[2], msg[3], msg[4])
        if kind == "done" and msg[1] == self.job_id:
            self._done[msg[2]] = (msg[3], msg[4])
            self._last_progress = time.monotonic()
        elif kind == "error":
            _, rank, phase, job_id, text, tb = msg
            if phase == "prepare" and job_id == self.job_id:
                self._input_errors.append((rank, text))
            elif job_id in (None, self.job_id):
                raise self._fail(msg)
        elif kind in ("lost", "hung"):
            if kind == "hung":
                time.sleep(0.5)  # let faulthandler write the stacks (SIGUSR1) to the log
            raise self._fail(msg)
        return None

    def _check_stalled(self) -> None:
        """Raise WorkerError (group torn down) when no block arrived for the stall limit
        (`GroupConfig.stall`, `parallel.stall.StallLimit`, from the block times so far)."""
        g = self.group
        policy = g.config.stall
        limit = policy.limit_s(self._block_s)
        idle = time.monotonic() - self._last_progress
        if not limit or idle <= limit:
            return
        stacks = self._dump_stacks()
        now = time.monotonic()
        hb_s = g.config.heartbeat_s
        silent = [r for r in range(g.world_size) if now - g._last_hb.get(r, self._t0) > 2 * hb_s + 1.0]
        blamed = stalled_ranks({r: g.progress.get(r, RankProgress()) for r in range(g.world_size)},
                               silent, self.job_id, self._t0,
                               0.25 * policy.block_time_s(self._block_s) if self._block_s else 0.1)
        g._break()

        def rank_text(r: int) -> str:
            p = g.progress.get(r, RankProgress())
            done, since = (p.blocks, p.since) if p.job_id == self.job_id else (0, self._t0)
            text = f"reported {done} block{'s' if done != 1 else ''} done, the last {now - since:.1f} s ago"
            spot = stacks.get(r)
            if r in silent:  # a stopped process writes no stack; one frozen holding the GIL may
                quiet = now - g._last_hb.get(r, self._t0)
                text += f", no heartbeat for {quiet:.1f} s: the process is stopped or frozen"
                return text + (f", in {spot}" if spot else " (no stack)")
            return text + f", in {spot or '(no stack in its log)'}"

        first = blamed[0] if blamed else -1
        who = f"rank{'s' if len(blamed) > 1 else ''} {', '.join(map(str, blamed))}"
        raise WorkerError(
            f"{who} made no progress (job {self.job_id} stalled: no new block for {idle:.1f} s after "
            f"{self._blocks} block{'s' if self._blocks != 1 else ''}, {policy.explain(self._block_s)}): "
            + "; ".join(f"rank {r}: {rank_text(r)}" for r in sorted(range(g.world_size), key=lambda r: r not in blamed))
            + f". Stacks in {g.log_dir}/rank*.log. The group was stopped; the next job starts a fresh "
            "one. If the GPU is just slow, give GroupConfig a larger stall=StallLimit(...).", first, "")

    def _dump_stacks(self, wait_s: float = 1.0) -> dict[int, str]:
        """Ask every rank for its stacks; returns, per rank, where its signalled thread stands
        ("file:line in func; ..."), read from what its log gained in the next `wait_s` seconds."""
        g = self.group
        sizes = {r: g.log_path(r).stat().st_size if g.log_path(r).exists() else 0 for r in range(g.world_size)}
        g.dump_stacks()
        time.sleep(wait_s)  # faulthandler writes the stacks to the rank logs
        out = {}
        for r, size in sizes.items():
            text = tail(g.log_path(r), 20000)
            grown = g.log_path(r).stat().st_size - size if g.log_path(r).exists() else 0
            out[r] = innermost_frames(text[-grown:] if grown > 0 else "")
        return out

    def frames(self, should_cancel: Callable[[], bool] | None = None) -> Iterator[BlockFrames]:
        """Yield BlockFrames as the decode rank finishes blocks; polls `should_cancel` ~10x/s.

        Raises WorkerError (group torn down) or JobInputError (group still usable). Stopping the
        iteration early cancels the job and waits for the ranks to drain it.
        """
        g = self.group
        finished = False
        try:
            while len(self._done) < g.world_size:
                if should_cancel is not None and not self._cancel_sent and should_cancel():
                    self.cancel()
                out = self._handle(g._next_event(None))
                if out is not None:
                    yield out
                    self._last_progress = time.monotonic()  # the consumer's time is not the ranks' stall
                else:
                    self._check_stalled()
            finished = True
        finally:
            if not finished and g.state == "ready":
                self._abandon()
            g._job_lock.release()
        if self._input_errors:
            by_text: dict[str, list[int]] = {}
            for rank, text in self._input_errors:
                by_text.setdefault(text, []).append(rank)
            raise JobInputError("the job was refused before it started (group still loaded): "
                                + "; ".join(f"{text} (rank{'s' if len(r) > 1 else ''} "
                                            f"{', '.join(map(str, r))})" for text, r in by_text.items()))
        complete = self._done[g.config.schedule.decode_rank][0]
        self.result = JobResult("ok" if complete else "cancelled", self._blocks,
                                time.monotonic() - self._t0, {r: s for r, (_, s) in self._done.items()})
        log.info("job %d %s: %d blocks in %.2f s; time waiting on neighbours per rank: %s",
                 self.job_id, self.result.status, self._blocks, self.result.seconds,
                 ", ".join(f"{r}: {s.get('wait_share', 0.0):.0%}"
                           for r, s in sorted(self.result.stats.items())))

    def _abandon(self, timeout: float = 60.0) -> None:
        """The consumer stopped early: cancel and drain, or tear the group down."""
        self.cancel()
        deadline = time.monotonic() + timeout
        try:
            while len(self._done) < self.group.world_size:
                msg = self.group._next_event(deadline)
                if msg is None:
                    log.error("job %d did not drain in %.0f s; tearing the group down",
                              self.job_id, timeout)
                    self.group._break()
                    return
                self._handle(msg)
        except GroupError as exc:
            log.error("while draining job %d: %s", self.job_id, exc)

    def wait(self, should_cancel: Callable[[], bool] | None = None) -> list[BlockFrames]:
        """Collect every block's frames (convenience for tests and scripts)."""
        return list(self.frames(should_cancel))


__all__ = ["JobHandle", "JobHost", "JobResult"]
