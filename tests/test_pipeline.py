"""The in-process pipeline on a tiny checkpoint: streaming, determinism, cancel, sink refresh."""

from __future__ import annotations


import pytest
import torch

from liveavatar.pipeline import GenerationCancelled
from tiny_support import job_fixture, model_fixture  # noqa: F401 (the module's `model` and `job` fixtures)


_RUNS: dict = {}


def run(model, job, blocks: int | None = None, **kw):
    """Generated blocks (all, or the first `blocks`); full runs are cached per arguments."""
    import itertools

    key = tuple(sorted((k, v) for k, v in kw.items() if k != "progress"))
    if blocks is None and "progress" not in kw and key in _RUNS:
        return _RUNS[key]
    out = list(itertools.islice(model.generate(job["ctx"], job["aud"], job["img"], reference=job["ref"], **kw), blocks))
    if blocks is None:
        _RUNS[key] = out
    return out


def test_streams_every_frame_once_and_is_deterministic(model, job):
    events = []
    blocks = run(model, job, seed=3, progress=events.append)
    n = job["aud"].num_frames
    assert n == 55
    assert sum(b.frames.shape[0] for b in blocks) == n
    assert [b.first_frame for b in blocks] == [0] + [sum(x.frames.shape[0] for x in blocks[:i]) for i in range(1, len(blocks))]
    assert all(b.frames.dtype == torch.uint8 and b.frames.shape[1:] == (64, 64, 3) for b in blocks)
    # each block carries exactly its frames' audio
    assert sum(b.audio.numel() for b in blocks) == round(n * 16000 / 25)
    assert [e["step"] for e in events if e["event"] == "step"][:4] == [0, 1, 2, 3]
    again = run(model, job, seed=3)  # cached: the run without progress callback
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(blocks, again))
    other = run(model, job, blocks=1, seed=4)
    assert not torch.equal(blocks[0].frames, other[0].frames)


def test_sink_refresh_changes_the_second_clip_only(model, job):
    # 55 frames + 3 lead-in = 5 blocks: clip 1 starts at block 4
    with_refresh = run(model, job, seed=3)
    without = run(model, job, seed=3, sink_refresh=False)
    assert len(with_refresh) == 5
    for a, b in zip(with_refresh[:4], without[:4]):
        assert torch.equal(a.frames, b.frames)
    assert not torch.equal(with_refresh[4].frames, without[4].frames)


def test_cancel_stops_between_steps(model, job):
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 6

    gen = model.generate(job["ctx"], job["aud"], job["img"], reference=job["ref"], seed=1, cancel=cancel)
    got = []
    with pytest.raises(GenerationCancelled):
        for b in gen:
            got.append(b)
    assert len(got) == 1  # stopped inside the second block, between steps


def test_audio_from_precomputed_states_matches_own_path(model, job):
    samples = job["audio"].samples
    states = model.audio_encoder.hidden_states(samples)
    cond = model.audio_conditioning_from_states(states, job["audio"])
    own = job["aud"]
    assert cond.features.shape == own.features.shape and cond.num_frames == own.num_frames
    # past the lead-in both describe the same audio; the tiny random wav2vec2 mixes the whole
    # clip, so only a loose agreement is expected
    a, b = cond.features[..., 10:50], own.features.columns(10, 50)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9
    with pytest.raises(ValueError, match="hidden states"):
        model.audio_conditioning_from_states(states[:-1], job["audio"])


def test_kv_offload_gives_the_same_frames(model, job):
    """Step caches in host memory paged through one shared buffer (5 blocks: the ring wraps and
    the sink is refreshed at clip 1): bitwise the frames of resident caches, a quarter of the
    cache rows on the device."""
    from liveavatar.pipeline.job import make_runner

    resident = run(model, job, seed=3)
    offloaded = run(model, job, seed=3, kv_offload=True)
    assert len(offloaded) == len(resident) == 5
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(resident, offloaded))
    on = make_runner(model, job["ctx"], job["img"], seed=3, steps=4, kv_offload=True)
    off = make_runner(model, job["ctx"], job["img"], seed=3, steps=4, kv_offload=False)
    per_cache = next(iter(off.caches.values())).nbytes
    assert on.host_cache_bytes() == 4 * per_cache and off.host_cache_bytes() == 0
    assert on.cache_bytes() == off.cache_bytes() - 3 * per_cache


def test_kv_offload_refuses_a_cache_used_without_paging(model, job):
    from liveavatar.pipeline.job import make_runner
    from liveavatar.pipeline.plan import make_plan
    from liveavatar.pipeline.sampler import BlockInputs

    r = make_runner(model, job["ctx"], job["img"], seed=3, steps=4, kv_offload=True)
    r.prefill(job["ref"].ref, job["ref"].motion)
    block = make_plan(job["aud"].num_frames, model.stream, lead_in_frames=3).blocks[0]
    x = torch.zeros(16, 3, *job["img"].latent_hw)
    r.run(x, block, BlockInputs(audio=job["aud"].block_features(block)))  # pages in and out
    cache = r.caches[1]
    assert r.working.owner is r.caches[3]  # the last step's rows are in the buffer now
    with pytest.raises(RuntimeError, match="page_in"):
        model.dit.forward_block(x, 500.0, r.text, job["aud"].block_features(block), None, cache, r.sink,
                                start_frame=3, sink_offset=0)


def test_kv_offload_decision_from_the_numbers():
    """The one cache decision of every rank (`memory.plan_caches`) on the 14B estimate at 704x384,
    for a 48 GB, an 80 GB and a 24 GB card (fp8 weights resident: 15.5 GiB of the free memory gone)."""
    from liveavatar.config import DiTConfig
    from liveavatar.options import CachePolicy
    from liveavatar.pipeline.memory import GIB, CachePlan, estimate_memory, host_cache_bytes, plan_caches

    cfg = DiTConfig()
    res, off = (estimate_memory(cfg, 704, 384, steps_owned=4, param_counts=(0, 0), kv_offload=o) for o in (False, True))
    slot = estimate_memory(cfg, 704, 384, steps_owned=4, param_counts=(0, 0), sink_slot=True)
    host = host_cache_bytes(cfg, 704, 384, 4)
    assert round(host / GIB, 1) == 38.7 and off.step_caches * 4 == res.step_caches

    def plan(free_gib, kv_offload=None, prefetch=False, ram=None, steps=4):
        got = plan_caches(cfg, 704, 384, steps, policy=CachePolicy(kv_offload, prefetch), free=int(free_gib * GIB),
                          total=int(80 * GIB), host_available=ram, what="test")
        return (got.offload, got.prefetch) if got.offload or not got.sink_slot else "slot"

    assert plan(80 - 15.5) == "slot"  # H100 with fp8 weights: everything resident, with sink slots
    assert plan(res.total / GIB) == (False, False)  # resident, but the slots do not fit
    assert plan(slot.total / GIB) == "slot"
    assert plan(47.5 - 15.5) == (True, False)  # 48 GB card: offloaded automatically
    assert plan(47.5 - 15.5, prefetch=True) == (True, True)  # ... and the second buffer fits too
    assert plan(80 - 15.5, kv_offload=True, prefetch=True) == (True, True)  # asked for
    assert plan(47.5 - 15.5, prefetch=None) == (True, True)  # the default: prefetch whenever it fits
    assert plan(80 - 15.5, kv_offload=True, prefetch=True, steps=1) == (True, False)  # one step: nothing to prefetch
    tight = (off.total + off.step_caches / 2) / GIB  # one step-cache buffer fits, two do not
    assert plan(tight, prefetch=None) == (True, False) and plan(tight, prefetch=True) == (True, False)
    with pytest.raises(MemoryError, match="kv-offload"):
        plan(47.5 - 15.5, kv_offload=False)
    with pytest.raises(MemoryError, match="offloaded to host memory"):
        plan(23.5 - 15.5)  # 24 GB: not even one step cache of 704x384
    with pytest.raises(MemoryError, match="host memory, 16.0 GiB"):
        plan(47.5 - 15.5, ram=16 * GIB)
    assert CachePlan() == CachePlan(offload=False, prefetch=False, sink_slot=False)


def test_token_counts_have_one_definition(model):
    """The DiT's caches, the memory estimate and the token helpers agree (sink = 2.5 frames)."""
    from liveavatar.models.tokens import clip_tokens, frame_tokens, sink_tokens
    from liveavatar.pipeline.memory import host_cache_bytes

    dit, s = model.dit, model.stream
    for hw in ((8, 8), (48, 88), (16, 24)):
        fsl = frame_tokens(hw)
        assert dit.frame_seqlen(hw) == fsl and dit.sink_tokens(hw) == sink_tokens(hw, (1, 2, 2), s) == 5 * fsl // 2
        cache = dit.new_step_cache(hw, dtype=torch.float32)
        assert cache.nbytes == host_cache_bytes(dit.cfg, hw[1] * 8, hw[0] * 8, 1, torch.float32, s)
        assert clip_tokens(hw, (1, 2, 2), s) == s.latent_frames_per_clip * fsl
