"""Step-to-rank assignment (pure Python, no processes)."""

import pytest

from parallel.schedule import (DeviceInfo, MemoryNeed, Schedule, ScheduleError, auto_schedule,
                               make_schedule, single, split_steps, tpp)

GB = 2**30


def test_split_steps_contiguous_and_even():
    assert split_steps(4, 1) == ((0, 1, 2, 3),)
    assert split_steps(4, 2) == ((0, 1), (2, 3))
    assert split_steps(4, 3) == ((0, 1), (2,), (3,))  # the last (decoding) rank gets less
    assert split_steps(4, 4) == ((0,), (1,), (2,), (3,))
    assert split_steps(5, 2) == ((0, 1, 2), (3, 4))
    with pytest.raises(ScheduleError, match="num_dit_ranks"):
        split_steps(4, 5)
    with pytest.raises(ScheduleError, match="num_steps"):
        split_steps(0, 1)


def test_roles_of_reference_shape():
    s = tpp(4, 4, separate_decode=True)
    assert (s.world_size, s.decode_rank, s.kind, s.backend) == (5, 4, "tpp", "gloo")
    r0, r3, r4 = s.role(0), s.role(3), s.role(4)
    assert (r0.steps, r0.prev_rank, r0.next_rank, r0.decodes) == ((0,), None, 1, False)
    assert (r3.steps, r3.next_rank, r3.is_last_dit) == ((3,), 4, True)
    assert (r4.steps, r4.is_dit, r4.decodes, r4.prev_rank) == ((), False, True, 3)
    s2 = tpp(4, 2)
    assert s2.world_size == 2 and s2.role(1).decodes and s2.role(1).next_rank is None
    assert single(4).kind == "single" and single(4).role(0).steps == (0, 1, 2, 3)
    assert "rank 4: decode" in s.describe()


def test_schedule_refuses_bad_devices():
    with pytest.raises(ScheduleError, match="repeat a GPU"):
        tpp(4, 2, devices=["cuda:0", "cuda:0"])
    with pytest.raises(ScheduleError, match="mix CPU and CUDA"):
        tpp(4, 2, devices=["cuda:0", "cpu"])
    with pytest.raises(ScheduleError, match="devices lists 2 entries"):
        tpp(4, 2, separate_decode=True, devices=["cuda:0", "cuda:1"])
    with pytest.raises(ScheduleError, match="contiguous"):
        Schedule(4, ((0, 2), (1, 3)), False, ("cpu", "cpu"))
    with pytest.raises(ScheduleError, match="unknown schedule"):
        make_schedule("ring", 4)


def gpus(n, free_gb=80):
    return [DeviceInfo(f"cuda:{i}", free_gb * GB, 80 * GB, "H100") for i in range(n)]


@pytest.mark.parametrize("n, dit, sep", [(1, 1, False), (2, 2, False), (3, 3, False),
                                         (4, 4, False), (5, 4, True), (8, 4, True)])
def test_auto_picks_by_predicted_stage_time(n, dit, sep):
    s = auto_schedule(4, gpus(n))
    assert (s.num_dit_ranks, s.separate_decode) == (dit, sep), s.reason
    assert s.devices == tuple(f"cuda:{i}" for i in range(s.world_size))
    assert s.reason.startswith("auto:")


def test_auto_without_gpu_and_with_memory_limits():
    s = auto_schedule(4, [])
    assert s.devices == ("cpu",) and "no CUDA" in s.reason
    # 14B bf16 ~ 33 GB with encoders, 10 GB per step cache (704*384), VAE 2 GB.
    need = MemoryNeed(dit_bytes=33 * GB, cache_bytes_per_step=10 * GB, decode_bytes=2 * GB)
    s = auto_schedule(4, gpus(2, free_gb=60), need)  # 2 steps/rank: 33+20+2+2 = 57 GB fits
    assert (s.num_dit_ranks, s.separate_decode) == (2, False)
    s = auto_schedule(4, gpus(1, free_gb=60), need)  # 4 steps need 77 GB: nothing fits
    assert s.devices == ("cuda:0",) and "no layout fits" in s.reason
    # 5 GPUs, the last one small: 4 DiT + decode still fits (decode rank needs 4 GB).
    small = gpus(4, free_gb=60) + [DeviceInfo("cuda:4", 6 * GB, 24 * GB)]
    s = auto_schedule(4, small, need)
    assert (s.num_dit_ranks, s.separate_decode) == (4, True)
