"""The stall limit (`parallel.stall`): exact numbers of the rule, then real 2-rank gloo groups on
the CPU (toy engine) where a rank is stopped mid-job, or where the job keeps getting slower.

Timing bounds are derived from what the job measured, never a wall-clock constant: the error
states the measured block time and the limit it used; the test checks that the limit is the
rule applied to that block time, that the block time is the one the test itself saw between
blocks, and that the job ended no sooner than the limit and at most a controller tick (0.1 s)
plus scheduling delay after it.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch

from parallel import GroupManager, WorkerGroup, schedule
from parallel.faults import WorkerError
from parallel.stall import RankProgress, StallLimit, stalled_ranks
from test_parallel_group import config, gone, video
from test_parallel_toy import naive_video

# -------------------------------------------------------------------------------- the rule


def test_limit_follows_the_measured_block_time_with_floor_cap_and_first_block():
    rule = StallLimit(first_block_s=1800.0, cap_s=300.0, floor_s=20.0, factor=10.0)
    assert rule.limit_s([]) == 1800.0  # no block yet: the first-block limit (compile included)
    assert rule.limit_s([1.5]) == 20.0  # only the first block: 10 x 1.5 = 15 < floor
    assert rule.limit_s([3.25]) == 32.5  # 10 x the first block (its time includes compiling)
    assert rule.limit_s([95.0]) == 300.0  # capped
    assert rule.limit_s([95.0, 0.75, 0.5]) == 20.0  # steady 0.75 s blocks: the floor
    assert rule.limit_s([95.0, 2.5, 3.25, 2.75]) == 32.5  # the slowest block after the first
    assert rule.limit_s([95.0, 1.0, 2.0, 4.0]) == 40.0  # a job getting slower raises its limit
    assert rule.limit_s([0.5, 40.0]) == 300.0
    assert StallLimit.block_time_s([95.0, 2.5, 3.25]) == 3.25 and StallLimit.block_time_s([7.0]) == 7.0
    assert StallLimit(cap_s=0.0).limit_s([1.0, 1.0]) == 0.0  # 0 disables
    assert StallLimit(first_block_s=0.0).limit_s([]) == 0.0
    assert StallLimit(floor_s=2.0, factor=4.0, cap_s=60.0).limit_s([9.0, 0.25, 0.125]) == 2.0
    assert StallLimit(floor_s=2.0, factor=4.0, cap_s=60.0).limit_s([9.0, 0.75]) == 3.0


def test_limit_explained_with_block_time_and_bounds():
    rule = StallLimit(first_block_s=600.0, cap_s=300.0, floor_s=20.0, factor=10.0)
    assert rule.explain([]) == "limit 600 s for the first block, compile included (StallLimit.first_block_s)"
    assert rule.explain([95.0, 2.5, 3.25]) == ("limit 32.5 s = 10 x 3.25 s (the slowest block so far), "
                                               "at least 20 s, at most 300 s")
    assert rule.explain([1.5]) == ("limit 20.0 s = 10 x 1.50 s (the first block, compile included), "
                                   "at least 20 s, at most 300 s")


@pytest.mark.parametrize("field,value", [("floor_s", -1.0), ("factor", float("nan")), ("cap_s", float("inf"))])
def test_limit_refuses_values_that_are_not_finite_or_negative(field, value):
    with pytest.raises(ValueError, match=f"StallLimit.{field} must be a finite number >= 0"):
        StallLimit(**{field: value})


def test_blamed_ranks_are_the_silent_ones_else_those_that_stopped_first():
    progress = {0: RankProgress(3, 9, 100.0), 1: RankProgress(3, 4, 97.0), 2: RankProgress(3, 5, 97.4)}
    assert stalled_ranks(progress, [], 3, 90.0, 0.5) == [1, 2]
    assert stalled_ranks(progress, [], 3, 90.0, 0.2) == [1]
    assert stalled_ranks(progress, [2], 3, 90.0, 0.5) == [2]  # no heartbeat: stopped or frozen
    progress[2] = RankProgress(2, 7, 50.0)  # still reports the previous job: stopped at this job's start
    assert stalled_ranks(progress, [], 3, 90.0, 0.5) == [2]
    p = RankProgress()
    p.update(4, 0, 10.0)
    p.update(4, 0, 11.0)  # same count: the time of the last change stays
    assert (p.job_id, p.blocks, p.since) == (4, 0, 10.0)
    p.update(4, 1, 12.0)
    assert (p.blocks, p.since) == (1, 12.0)


# -------------------------------------------------------------------------------- real groups

STALL = StallLimit(first_block_s=120.0, cap_s=120.0, floor_s=1.0, factor=4.0)
MESSAGE = re.compile(r"^rank (\d+) made no progress \(job \d+ stalled: no new block for ([\d.]+) s after (\d+) "
                     r"blocks, limit ([\d.]+) s = 4 x ([\d.]+) s \(the slowest block so far\), at least 1 s, "
                     r"at most 120 s\): ")


@pytest.fixture(scope="module")
def two():
    """A 2-rank toy group manager: steps [0, 1] | [2, 3] + decode. Heartbeats every 0.2 s (the
    blame's time resolution); the heartbeat timeout far beyond the stall limit, so that the stall
    rule, not the missing heartbeat of a stopped rank, is what ends a job here."""
    manager = GroupManager()
    yield manager, config(schedule.tpp(4, 2), stall=STALL, heartbeat_s=0.2, heartbeat_timeout_s=300.0)
    manager.close()


def stop_rank_and_check(group: WorkerGroup, job: dict, victim: int, after: int, rule: StallLimit) -> str:
    """Run `job` on `group`, SIGSTOP rank `victim` once `after` blocks arrived; the job must end
    with a WorkerError naming that rank, the measured block time and the limit (`rule`, whose
    message `MESSAGE` matches), within the limit's bounds, and leave no worker process. Returns
    the message."""
    pids = dict(group.pids)
    handle = group.submit(job)
    arrivals = [time.monotonic()]
    try:
        with pytest.raises(WorkerError) as err:
            for _ in handle.frames():
                arrivals.append(time.monotonic())
                if len(arrivals) == after + 1:
                    os.kill(pids[victim], signal.SIGSTOP)
        ended = time.monotonic()
    finally:
        try:
            os.kill(pids[victim], signal.SIGCONT)
        except ProcessLookupError:
            pass
    text = str(err.value)
    m = MESSAGE.match(text)
    assert m, text
    blamed, idle, blocks, limit, block_s = int(m[1]), float(m[2]), int(m[3]), float(m[4]), float(m[5])
    assert blamed == victim and err.value.rank == victim and "\n" not in text
    assert f"rank {victim}: " in text and "no heartbeat for" in text and "stopped or frozen" in text
    assert blocks == len(arrivals) - 1 >= after
    seen = max(b - a for a, b in zip(arrivals[1:], arrivals[2:]))  # slowest block after the first
    assert abs(block_s - seen) <= 0.05 + 0.1 * seen, (block_s, seen)  # the block time the test saw
    assert abs(limit - rule.limit_s([60.0, block_s])) <= 0.1  # the rule on the reported time (rounded)
    # detected no sooner than the limit, and within a controller tick (0.1 s) plus scheduling
    # delay (half the limit) after it; then the design's fixed costs: 1 s to collect the stacks,
    # the teardown (SIGKILL, the reader thread joined within 2 s)
    assert limit <= idle <= 1.5 * limit + 0.2, (idle, limit, text)  # both rounded to 0.1 s
    assert idle < ended - arrivals[-1] <= idle + 1.0 + 2.5, (ended - arrivals[-1], idle)
    assert gone(pids.values())
    return text


@pytest.mark.slow
def test_a_job_that_keeps_getting_slower_is_not_cut_off(two):
    """Each block's steps sleep twice as long as the last block's (32 x from the first block to
    the last): the last block takes more than the factor (4) x the first steady block and more
    than the floor, yet the limit follows the slowest block so far and the job finishes with the
    right frames."""
    manager, cfg = two
    job = {"seed": 7, "num_blocks": 6, "blocks_per_clip": 4, "step_sleep": 0.025, "sleep_growth": 2.0}
    handle = manager.get(cfg).submit(job)
    arrivals, got = [time.monotonic()], []
    for bf in handle.frames():
        got.append(bf)
        arrivals.append(time.monotonic())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert handle.result.status == "ok" and torch.equal(video(got), naive_video(job))
    assert gaps[-1] > max(STALL.floor_s, STALL.factor * gaps[1]), gaps  # a fixed limit would have cut it


@pytest.mark.slow
def test_stopped_rank_ends_the_job_after_a_few_block_times_naming_it(two):
    """Rank 1 (steps 2-3 and the decoder) is stopped after 4 blocks of ~0.4 s: the job ends once
    no block came for 4 x the slowest block (floor 1 s) with rank 1 named, rank 0's position
    given, nothing left running; the next job gets a fresh group and the right frames."""
    manager, cfg = two
    job = {"seed": 7, "num_clips": 20, "blocks_per_clip": 4, "step_sleep": 0.2}
    text = stop_rank_and_check(manager.get(cfg), job, victim=1, after=4, rule=STALL)
    assert re.search(r"rank 0: reported \d+ blocks done, the last [\d.]+ s ago, in \S+\.py:\d+", text), text
    small = {"seed": 7, "num_clips": 2, "blocks_per_clip": 4}
    assert torch.equal(video(manager.run(cfg, small)), naive_video(small))
