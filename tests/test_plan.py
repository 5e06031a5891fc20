"""Block plan: frame accounting, lead-in, clip caps, seeded noise and sink offsets."""

import pytest
import torch

from liveavatar.config import DEFAULT_STREAM as S
from liveavatar.pipeline.plan import block_noise, make_plan, sink_offsets


@pytest.mark.parametrize("n", [1, 8, 9, 10, 45, 100, 481])
def test_written_frames_equal_audio_frames(n):
    plan = make_plan(n, S)
    assert plan.num_frames == n
    assert sum(b.num_out_frames for b in plan.blocks) == n
    # contiguous output and absolute latent positions
    for prev, nxt in zip(plan.blocks, plan.blocks[1:]):
        assert nxt.out_first_frame == prev.out_first_frame + prev.num_out_frames
        assert nxt.start_frame == prev.start_frame + S.frames_per_block_latent
    assert plan.blocks[0].keep[0] == 3  # lead-in frames dropped from the first block


def test_num_clip_caps_like_reference():
    # the reference writes 48 * clips - 3 frames
    assert make_plan(1000, S, num_clip=2).num_frames == 93
    with pytest.raises(ValueError, match="num_clip"):
        make_plan(10, S, num_clip=0)
    with pytest.raises(ValueError, match="audio"):
        make_plan(0, S)


def test_noise_and_offsets_are_seeded_and_rank_independent():
    plan = make_plan(100, S)
    b = plan.blocks[5]
    a1 = block_noise(7, b, (6, 8), S)
    a2 = block_noise(7, b, (6, 8), S)
    assert torch.equal(a1, a2) and a1.shape == (16, 3, 6, 8)
    assert not torch.equal(a1, block_noise(8, b, (6, 8), S))
    offs = sink_offsets(7, 5, 4, S)
    assert offs == sink_offsets(7, 5, 4, S)
    assert all(4 <= d <= 30 for d in offs)
    assert len({tuple(sink_offsets(s, 0, 4, S)) for s in range(20)}) > 1
