"""Faults in real worker groups (CPU, gloo, the toy engine): a rank out of memory."""

from __future__ import annotations

import pytest
import torch

from parallel import GroupManager, schedule
from parallel.faults import OOM_REMEDY, WorkerError
from test_parallel_group import SLOW, config, run, video
from test_parallel_toy import JOB, naive_video


@pytest.fixture(scope="module")
def two():
    manager = GroupManager()
    yield manager, config(schedule.tpp(4, 2))
    manager.close()


@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_out_of_memory_in_a_rank_is_named_with_the_remedy(two):
    """torch.OutOfMemoryError on rank 1 mid-job: WorkerError naming rank 1, the allocator's message
    and what to do; the next job runs on a fresh group with the right frames."""
    with pytest.raises(WorkerError) as err:
        run(two, {**SLOW, "oom_at": [1, 0, 1]})
    first = str(err.value).splitlines()[0]
    assert err.value.rank == 1 and first.startswith("rank 1 failed (run): OutOfMemoryError: CUDA out of memory")
    assert OOM_REMEDY in first and "smaller size" in first
    blocks, result = run(two, JOB)
    assert torch.equal(video(blocks), naive_video(JOB)) and result.status == "ok"
