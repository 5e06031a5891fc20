"""Worker groups in real subprocesses on CPU (gloo), running the toy engine.

Groups are expensive to start (one torch import per rank), so one 2-rank group (process-group
timeout 5 s) is shared by the tests of this module through a GroupManager; tests that break it
let the manager start a fresh one, which is itself part of what they check.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from parallel import GroupConfig, GroupManager, WorkerGroup, schedule
from parallel.faults import GroupStartError, JobInputError, WorkerError
from parallel.stall import StallLimit
from test_parallel_toy import JOB, naive_video

TESTS = str(Path(__file__).resolve().parent)
TOY = "test_parallel_toy:ToyEngine"
SLOW = {**JOB, "num_clips": 20, "step_sleep": 0.05}  # 80 blocks, >= 0.1 s per block per rank
_LOGS: list = []  # a TemporaryDirectory for worker logs, made on first use, removed at exit


def config(sched, engine_config=None, **kw):
    if "log_dir" not in kw:
        if not _LOGS:
            _LOGS.append(tempfile.TemporaryDirectory(prefix="parallel-test-logs-"))
        kw["log_dir"] = tempfile.mkdtemp(dir=_LOGS[0].name)
    kw.setdefault("pg_timeout_s", 5.0)
    kw.setdefault("start_timeout_s", 90.0)
    return GroupConfig(sched, TOY, {"num_steps": 4, **(engine_config or {})}, sys_path=(TESTS,), **kw)


def video(blocks):
    return torch.cat([b.frames for b in blocks])


def gone(pids, timeout=10.0):
    """True once none of `pids` is a live (non-zombie) process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def want():
    return naive_video(JOB)


@pytest.fixture(scope="module")
def two():
    """Shared 2-rank group manager (steps [0,1] | [2,3] + decode)."""
    manager = GroupManager()
    yield manager, config(schedule.tpp(4, 2))
    manager.close()


def run(manager_cfg, job, **kw):
    manager, cfg = manager_cfg
    gen = manager.run(cfg, job, **kw)
    blocks = []
    try:
        while True:
            blocks.append(next(gen))
    except StopIteration as stop:
        return blocks, stop.value


@pytest.mark.parametrize("sched", [schedule.single(4), schedule.tpp(4, 3),
                                   schedule.tpp(4, 4, separate_decode=True)],
                         ids=["world1", "world3", "world5-4dit+decode"])
@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_world_sizes_give_identical_frames(sched, want):
    with WorkerGroup(config(sched)) as group:
        handle = group.submit(JOB)
        blocks = handle.wait()
        pids = list(group.pids.values())
    assert [(b.clip, b.block) for b in blocks] == [(c, b) for c in range(3) for b in range(4)]
    assert torch.equal(video(blocks), want)  # fp32 CPU: bit-identical to the plain loop
    assert handle.result.status == "ok" and set(handle.result.stats) == set(range(sched.world_size))
    assert gone(pids)  # close() ends every worker


@pytest.mark.slow
def test_two_ranks_identical_and_idle_past_collective_timeout(two, want):
    blocks, result = run(two, JOB)
    assert torch.equal(video(blocks), want) and result.status == "ok"
    stats = result.stats[0]
    assert stats["blocks"] == 12 and 0.0 <= stats["wait_share"] <= 1.0
    pids = dict(two[0].group.pids)
    time.sleep(8.0)  # idle longer than the 5 s process-group timeout
    blocks, result = run(two, JOB)
    assert torch.equal(video(blocks), want)
    assert two[0].group.pids == pids  # the same processes took the job


def test_interrupt_stops_within_a_block_and_group_stays_usable(two, want):
    manager, cfg = two
    group = manager.get(cfg)
    pids = dict(group.pids)
    handle = group.submit(SLOW)
    blocks, t_cancel = [], None
    for bf in handle.frames():
        blocks.append(bf)
        if len(blocks) == 2:
            t_cancel = time.monotonic()
            handle.cancel()
    stop_s = time.monotonic() - t_cancel
    total = SLOW["num_clips"] * 4
    assert handle.result.status == "cancelled" and len(blocks) < total
    # One block costs ~0.1 s per rank here; allow for a loaded 2-core machine.
    assert stop_s < 2.0, f"took {stop_s:.2f} s to stop"
    assert len(blocks) <= 4
    # should_cancel (the ComfyUI interrupt hook) on the next job, then a normal job.
    got = []
    gen = manager.run(cfg, SLOW, should_cancel=lambda: len(got) >= 2)
    try:
        while True:
            got.append(next(gen))
    except StopIteration as stop:
        assert stop.value.status == "cancelled" and 2 <= len(got) <= 5
    blocks, result = run(two, JOB)
    assert torch.equal(video(blocks), want) and result.status == "ok"
    assert manager.group.pids == pids


def test_bad_input_keeps_group_loaded(two, want):
    manager, cfg = two
    pids = dict(manager.get(cfg).pids)
    with pytest.raises(JobInputError, match="bad input 'no audio'"):
        run(two, {**JOB, "bad_input": "no audio"})
    assert manager.group.healthy and manager.group.pids == pids
    blocks, _ = run(two, JOB)
    assert torch.equal(video(blocks), want)


def test_killed_worker_ends_job_naming_rank_then_group_restarts(two, want):
    manager, cfg = two
    group = manager.get(cfg)
    old = dict(group.pids)
    gen = manager.run(cfg, SLOW)
    next(gen)
    t0 = time.monotonic()
    os.kill(old[1], signal.SIGKILL)
    with pytest.raises(WorkerError) as err:
        for _ in gen:
            pass
    assert time.monotonic() - t0 < 30.0
    assert err.value.rank == 1 and "SIGKILL" in str(err.value)
    assert gone(old.values())  # the surviving rank was torn down too
    blocks, result = run(two, JOB)  # next job: fresh group, right frames
    assert torch.equal(video(blocks), want) and result.status == "ok"
    assert set(manager.group.pids.values()).isdisjoint(old.values())


def test_worker_exception_reports_rank_and_traceback(two, want):
    with pytest.raises(WorkerError) as err:
        run(two, {**SLOW, "fail_at": [0, 0, 2]})
    assert err.value.rank == 0
    assert "toy failure on rank 0 at clip 0 block 2" in str(err.value)
    assert "run_steps" in err.value.traceback
    blocks, _ = run(two, JOB)
    assert torch.equal(video(blocks), want)


def test_native_crash_reports_rank_and_stack(two, want):
    """A rank that dies hard (abort, as a segfault would) is named with its faulthandler stack."""
    with pytest.raises(WorkerError) as err:
        run(two, {**SLOW, "crash_at": [1, 0, 1]})
    assert err.value.rank == 1 and "SIGABRT" in str(err.value)
    assert "Fatal Python error: Aborted" in err.value.traceback and "run_steps" in err.value.traceback
    blocks, _ = run(two, JOB)
    assert torch.equal(video(blocks), want)


def test_load_error_names_rank_and_file():
    group = WorkerGroup(config(schedule.tpp(4, 2), {"fail_load_rank": 1, "path": "dit.safetensors"}))
    with pytest.raises(GroupStartError) as err:
        group.start()
    assert err.value.rank == 1 and err.value.phase == "load"
    assert "rank 1 failed to load" in str(err.value) and "dit.safetensors" in str(err.value)
    assert "FileNotFoundError" in err.value.traceback
    assert gone([p.pid for p in group.procs.values()])


def test_broken_interconnect_reported_in_seconds():
    group = WorkerGroup(config(schedule.tpp(4, 2), env={"GLOO_SOCKET_IFNAME": "nosuchif0"}))
    t0 = time.monotonic()
    with pytest.raises(GroupStartError, match="rank [01] failed to init: .*nosuchif0.*GLOO_SOCKET_IFNAME") as err:
        group.start()
    assert err.value.phase == "init" and time.monotonic() - t0 < 30.0
    assert gone([p.pid for p in group.procs.values()])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_topology_refused_before_spawning():
    group = WorkerGroup(config(schedule.tpp(4, 2, devices=["cuda:0", "cuda:1"])))
    t0 = time.monotonic()
    with pytest.raises(GroupStartError, match=r"2 ranks on \['cuda:0', 'cuda:1'\] but 0 CUDA") as err:
        group.start()
    assert err.value.phase == "topology" and not group.procs and time.monotonic() - t0 < 5.0


@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_stuck_rank_ends_the_job_with_where_it_stands(want):
    """A rank that stays alive (heartbeats fine) but never finishes a block: after the stall
    limit (here fixed at 3 s: floor = cap) the job ends naming that rank, with the ranks'
    positions from their stack dumps, nothing is left running, and the next job gets a fresh
    group."""
    manager = GroupManager()
    cfg = config(schedule.tpp(4, 2), stall=StallLimit(cap_s=3.0, floor_s=3.0), heartbeat_s=0.2)
    try:
        gen = manager.run(cfg, {**SLOW, "hang_at": [1, 0, 2]})
        next(gen)
        pids = dict(manager.group.pids)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"^rank 1 made no progress \(job \d+ stalled: no new block for [\d.]+ s "
                                              r"after 2 blocks, limit 3.0 s = 10 x [\d.]+ s") as err:
            for _ in gen:
                pass
        text = str(err.value)
        assert time.monotonic() - t0 < 30.0 and err.value.rank == 1
        assert re.search(r"rank 1: reported 2 blocks done, the last [\d.]+ s ago, in test_parallel_toy\.py:\d+ in "
                         r"_maybe_fail; test_parallel_toy\.py:\d+ in run_steps", text), text
        assert gone(pids.values())
        blocks = list(manager.run(cfg, JOB))
        assert torch.equal(video(blocks), want)
    finally:
        manager.close()


@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_frozen_worker_detected_by_heartbeat(want):
    """A rank that stops responding (SIGSTOP: no exit, no EOF) is caught by the heartbeat."""
    manager = GroupManager()
    cfg = config(schedule.tpp(4, 2), heartbeat_s=0.5, heartbeat_timeout_s=3.0)
    try:
        gen = manager.run(cfg, SLOW)
        next(gen)
        pids = dict(manager.group.pids)
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGSTOP)
        with pytest.raises(WorkerError, match="rank 1 sent no heartbeat") as err:
            for _ in gen:
                pass
        assert err.value.rank == 1 and time.monotonic() - t0 < 30.0
        assert gone(pids.values())
    finally:
        manager.close()
