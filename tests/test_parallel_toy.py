"""A small deterministic engine with Live Avatar's state structure, and in-process runner tests.

`ToyEngine` is the job engine the parallel/ infrastructure tests run in real worker processes
(imported there as `test_parallel_toy:ToyEngine`). It is not a model: it keeps the structure that
makes scheduling mistakes visible in the output:

- one "KV cache" per denoising step, holding what each earlier block looked like *at that step*
  (a rank running a step it does not own, or steps out of order, changes the frames);
- a sink initialised from a reference latent and refreshed at clip 1 from the final latents of
  clip 0 block 0 (a missing or wrong refresh changes every frame from clip 1 on);
- per-clip seeded noise, an Euler update with the 4-step sigmas, and a streaming decoder whose
  state carries across blocks (a dropped, duplicated or reordered block changes later frames).

Job keys: seed, num_clips, blocks_per_clip (4), height/width (latent, 4x6), step_sleep (s),
fail_at [rank, clip, block] (raise there), oom_at [rank, clip, block] (raise torch.OutOfMemoryError
there), crash_at [rank, clip, block] (abort the process),
hang_at [rank, clip, block] (never return from there; the process stays alive), sleep_growth
(step_sleep x sleep_growth ** block index: a job that gets slower block by block),
bad_input (refused in prepare), no_sink_refresh. Config keys: num_steps, channels, weight_seed,
fail_load_rank, path.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import pytest
import torch

from parallel import schedule
from parallel.schedule import Role
from parallel.tpp import JobPlan, RankStats, run_inprocess, run_rank

SIGMAS = {4: [1.0, 0.8576923, 0.6021506, 0.008928572, 0.0]}


def sigmas(num_steps: int) -> list[float]:
    if num_steps in SIGMAS:
        return SIGMAS[num_steps]
    return [1.0 - i / num_steps for i in range(num_steps)] + [0.0]


class ToyEngine:
    """Deterministic toy (see module docstring); fp32 on the rank's device."""

    def load(self, config: Mapping[str, Any], role: Role) -> None:
        if config.get("fail_load_rank") == role.rank:
            raise FileNotFoundError(f"toy weights not found: {config.get('path', 'toy.safetensors')}")
        self.role = role
        self.num_steps = int(config.get("num_steps", 4))
        self.c = int(config.get("channels", 4))
        g = torch.Generator().manual_seed(int(config.get("weight_seed", 0)))
        self.mix = torch.randn(self.num_steps, self.c, self.c, generator=g) * 0.5
        self.to_rgb = torch.randn(3, self.c, generator=g) * 0.5
        self.sig = sigmas(self.num_steps)
        self.device = torch.device(role.device)
        self.clips_begun: list[int] = []

    def prepare(self, job: Mapping[str, Any]) -> JobPlan:
        if job.get("bad_input"):
            raise ValueError(f"toy: bad input {job['bad_input']!r}")
        self.job = dict(job)
        self.seed = int(job.get("seed", 0))
        self.blocks = int(job.get("blocks_per_clip", 4))
        self.h, self.w = int(job.get("height", 4)), int(job.get("width", 6))
        g = torch.Generator().manual_seed(self.seed + 1000)
        self.sink = torch.randn(self.c, 1, self.h, self.w, generator=g)
        steps = int(job.get("steps", self.num_steps))
        self.sig = sigmas(steps)
        self.caches = {s: [] for s in self.role.for_steps(steps).steps}  # only this rank's steps
        self.dec_state = torch.zeros(self.c, self.h, self.w)
        num_blocks = int(job.get("num_blocks", int(job.get("num_clips", 2)) * self.blocks))
        return JobPlan(num_blocks, self.blocks, (self.c, 3, self.h, self.w), torch.float32,
                       refresh_sink=not job.get("no_sink_refresh"), num_steps=steps)

    def _maybe_fail(self, clip: int, block: int) -> None:
        where = [self.role.rank, clip, block]
        if self.job.get("fail_at") == where:
            raise RuntimeError(f"toy failure on rank {self.role.rank} at clip {clip} block {block}")
        if self.job.get("crash_at") == where:
            os.abort()
        if self.job.get("oom_at") == where:  # what the CUDA caching allocator raises
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (toy, rank {self.role.rank})")
        if self.job.get("hang_at") == where:
            while True:  # like a rank stuck in a GPU kernel: alive, heartbeats still going
                time.sleep(0.05)

    def begin_clip(self, clip: int, first_block: torch.Tensor | None) -> None:
        self.clips_begun.append(clip)
        if clip == 1 and first_block is not None:
            self.sink = first_block[:, :1].clone()  # first latent frame of clip 0

    def initial_latents(self, clip: int, block: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + clip)
        noise = torch.randn(self.c, 3 * self.blocks, self.h, self.w, generator=g)
        return noise[:, 3 * block:3 * block + 3].clone()

    def run_steps(self, clip: int, block: int, x: torch.Tensor, steps: Sequence[int],
                  cancelled=lambda: False) -> torch.Tensor | None:
        self._maybe_fail(clip, block)
        for s in steps:
            if cancelled():
                return None
            if s not in self.caches:
                raise RuntimeError(f"rank {self.role.rank} asked to run step {s}, owns {self.role.steps}")
            cache = self.caches[s]
            hist = torch.stack(cache[-4:]).mean(0) if cache else torch.zeros(self.c, self.h, self.w)
            drive = torch.einsum("oc,cfhw->ofhw", self.mix[s], x)
            v = torch.tanh(drive + 0.3 * hist[:, None] + 0.2 * self.sink + 1e-3 * s)
            cache.append(x.mean(dim=1))  # what this block looked like at step s
            x = x + (self.sig[s + 1] - self.sig[s]) * v
            if self.job.get("step_sleep"):
                index = clip * self.blocks + block
                time.sleep(float(self.job["step_sleep"]) * float(self.job.get("sleep_growth", 1.0)) ** index)
        return x

    def decode(self, clip: int, block: int, x: torch.Tensor) -> torch.Tensor:
        """Frames `[4 * F, H, W, 3]` in [-1, 1]; 2x nearest upsampling of the latent grid."""
        self._maybe_fail(clip, block)
        out = []
        for f in range(x.shape[1]):
            self.dec_state = 0.5 * self.dec_state + x[:, f]
            rgb = torch.tanh(torch.einsum("oc,chw->hwo", self.to_rgb, self.dec_state))
            rgb = rgb.repeat_interleave(2, 0).repeat_interleave(2, 1)
            out += [rgb * (1 - 0.1 * k) for k in range(4)]
        return torch.stack(out)

    def end_job(self) -> None:
        self.caches = {}

    def unload(self) -> None:
        pass


def naive_video(job: dict, num_steps: int = 4) -> torch.Tensor:
    """The plain single-process loop written out (no parallel/ code): the expected frames."""
    eng = ToyEngine()
    eng.load({"num_steps": num_steps}, schedule.single(num_steps).role(0))
    plan = eng.prepare(job)
    frames, first = [], None
    for i in range(plan.num_blocks):
        clip, block = divmod(i, plan.blocks_per_clip)
        if block == 0:
            eng.begin_clip(clip, first if clip >= 1 and plan.refresh_sink else None)
        x = eng.initial_latents(clip, block)
        for s in range(plan.num_steps):
            x = eng.run_steps(clip, block, x, [s])
        if i == 0:
            first = x.clone()
        frames.append(eng.decode(clip, block, x))
    return torch.cat(frames)


def inprocess_video(job: dict, num_steps: int = 4, cancel_after: int | None = None) -> torch.Tensor:
    role = schedule.single(num_steps).role(0)
    eng = ToyEngine()
    eng.load({"num_steps": num_steps}, role)
    got = []
    for bf in run_inprocess(eng, job, role, should_cancel=lambda: cancel_after is not None
                            and len(got) >= cancel_after):
        got.append(bf.frames)
    return torch.cat(got)


JOB = {"seed": 7, "num_clips": 3, "blocks_per_clip": 4}


def test_inprocess_matches_naive_loop():
    want = naive_video(JOB)
    assert want.shape == (3 * 4 * 12, 8, 12, 3)
    assert torch.equal(inprocess_video(JOB), want)


def test_toy_is_sensitive_to_sink_refresh_and_seed():
    base = naive_video(JOB)
    no_refresh = naive_video({**JOB, "no_sink_refresh": True})
    per_clip = 4 * 12
    assert torch.equal(no_refresh[:per_clip], base[:per_clip])  # clip 0 unaffected
    assert not torch.allclose(no_refresh[per_clip:], base[per_clip:], atol=1e-4)
    assert not torch.allclose(naive_video({**JOB, "seed": 8}), base, atol=1e-4)


def test_inprocess_cancel_stops_between_blocks():
    got = inprocess_video({**JOB, "num_clips": 5}, cancel_after=2)
    assert got.shape[0] == 2 * 12


def test_partial_last_clip_and_other_step_count():
    job = {**JOB, "num_blocks": 6, "steps": 3}  # clip 1 has 2 of 4 blocks
    want = naive_video(job)
    assert want.shape[0] == 6 * 12
    assert torch.equal(inprocess_video(job), want)
    assert not torch.allclose(want, naive_video({**job, "steps": 4}), atol=1e-4)


def test_rank_refuses_foreign_step():
    eng = ToyEngine()
    role = schedule.tpp(4, 2).role(1)  # owns steps 2, 3
    eng.load({}, role)
    eng.prepare(JOB)
    with pytest.raises(RuntimeError, match="owns"):
        eng.run_steps(0, 0, torch.zeros(4, 3, 4, 6), [0])
    with pytest.raises(ValueError, match="at least 2 denoising steps"):
        role.for_steps(1)


def test_run_rank_needs_links_for_several_ranks():
    role = schedule.tpp(4, 2).role(0)
    eng = ToyEngine()
    eng.load({}, role)
    with pytest.raises(ValueError, match="Links"):
        list(run_rank(eng, role, eng.prepare(JOB), lambda: False, RankStats(0)))
