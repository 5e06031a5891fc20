"""When a job whose ranks are all alive counts as stuck, and which ranks stopped making progress.

A rank stuck in a GPU kernel or in a point-to-point transfer that never completes keeps its
heartbeat thread going, so only the blocks tell: the controller (`parallel.jobs.JobHandle`)
measures how long each block takes to arrive and ends the job once no block came for
`StallLimit.limit_s(...)` seconds. The limit follows the measured block time (a 0.7 s block
is stuck after 20 s, not after 5 minutes), with the fixed values as the cap and a separate,
generous limit for the first block, which includes loading work and torch.compile.

Each rank reports in its heartbeat how many blocks of the current job it finished
(`parallel.worker`); `RankProgress` keeps that per rank, so the error names the rank(s) that
stopped first (in a pipeline every rank stops soon after one does) and those that sent no
heartbeat at all (a stopped or frozen process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class StallLimit:
    """How long a job may go without a new block before it counts as stuck (seconds).

    - `first_block_s`: the limit for the first block (conditioning, cache set-up and
      torch.compile, a few minutes cold for the 14B + VAE); 0 disables the limit.
    - after that: `factor` x the measured block time, at least `floor_s`, at most `cap_s`
      (0 disables the limit). The measured block time is the slowest block after the first;
      with only the first block arrived, the first block's own time (compile included: generous).

    A job that slows down raises its own limit (it follows the slowest block so far), so a
    job getting gradually slower is never cut off; a stall is caught after a few blocks' worth
    of time, but never sooner than `floor_s`.
    """

    first_block_s: float = 1800.0
    cap_s: float = 300.0
    floor_s: float = 20.0
    factor: float = 10.0

    def __post_init__(self) -> None:
        for name in ("first_block_s", "cap_s", "floor_s", "factor"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"StallLimit.{name} must be a finite number >= 0 (0 disables), not {value!r}")

    @staticmethod
    def block_time_s(block_s: Sequence[float]) -> float:
        """The block time the limit scales with: the slowest of `block_s[1:]`, else `block_s[0]`."""
        return max(block_s[1:]) if len(block_s) > 1 else block_s[0]

    def limit_s(self, block_s: Sequence[float]) -> float:
        """Seconds without a new block after which the job is stuck; 0 means no limit.

        `block_s`: seconds each block so far took to arrive: `[0]` from the job's start to the
        first block, `[i]` from block i - 1 to block i. Empty: no block yet.
        """
        if not block_s:
            return self.first_block_s
        if not self.cap_s:
            return 0.0
        return min(self.cap_s, max(self.floor_s, self.factor * self.block_time_s(block_s)))

    def explain(self, block_s: Sequence[float]) -> str:
        """The limit and where it comes from, for an error message."""
        limit = self.limit_s(block_s)
        if not block_s:
            return f"limit {limit:g} s for the first block, compile included (StallLimit.first_block_s)"
        which = "the slowest block so far" if len(block_s) > 1 else "the first block, compile included"
        return (f"limit {limit:.1f} s = {self.factor:g} x {self.block_time_s(block_s):.2f} s ({which}), "
                f"at least {self.floor_s:g} s, at most {self.cap_s:g} s")


@dataclass
class RankProgress:
    """What one rank last reported of its job: `blocks` it finished of job `job_id`, and `since`
    (controller's monotonic seconds) when the last of them was finished (the heartbeat tells its
    age)."""

    job_id: int | None = None
    blocks: int = 0
    since: float = 0.0

    def update(self, job_id: int | None, blocks: int, now: float) -> None:
        if (job_id, blocks) != (self.job_id, self.blocks):
            self.job_id, self.blocks, self.since = job_id, blocks, now


def stalled_ranks(progress: Mapping[int, RankProgress], silent: Sequence[int], job_id: int,
                  start: float, tolerance_s: float) -> list[int]:
    """The ranks to blame for a stall: those that sent no heartbeat (`silent`: stopped or frozen
    processes) if any, else those whose last block of `job_id` came first (within `tolerance_s`
    of the earliest; a rank next to a stuck one still finishes the block it holds, about one
    block time later, so a quarter of the block time separates them). A rank that never reported
    on this job counts as stopped at `start` (the job's start)."""
    if silent:
        return sorted(silent)
    since = {r: (p.since if p.job_id == job_id else start) for r, p in progress.items()}
    if not since:
        return []
    first = min(since.values())
    return sorted(r for r, t in since.items() if t <= first + tolerance_s)


__all__ = ["RankProgress", "StallLimit", "stalled_ranks"]
