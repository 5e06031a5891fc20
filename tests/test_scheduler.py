"""Flow-match Euler schedule against the reference tables (fixtures/reference/scheduler/)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from liveavatar.scheduler import (
    ScheduleError,
    euler_step,
    flow_match_schedule,
    flow_match_schedule_closed_form,
)


@pytest.fixture(scope="module")
def tables(fixtures_dir):
    return json.loads((fixtures_dir / "scheduler" / "flow_match_euler.json").read_text())


@pytest.mark.parametrize("steps", [3, 4, 5])
def test_schedule_equals_reference_tables(tables, steps):
    ref = tables["steps"][str(steps)]
    for make in (flow_match_schedule, flow_match_schedule_closed_form):
        sched = make(steps, shift=tables["shift"], num_train_timesteps=tables["num_train_timesteps"])
        assert sched.timesteps.dtype == torch.float32 and sched.sigmas.dtype == torch.float32
        assert sched.timesteps.shape == (steps,) and sched.sigmas.shape == (steps + 1,)
        # bitwise: the fixture values are float32 numbers written out exactly
        assert torch.equal(sched.timesteps, torch.tensor(ref["timesteps"], dtype=torch.float32)), make.__name__
        assert torch.equal(sched.sigmas, torch.tensor(ref["sigmas"], dtype=torch.float32)), make.__name__


def test_library_and_closed_form_agree_for_all_allowed_steps():
    for steps in range(1, 9):
        a, b = flow_match_schedule(steps), flow_match_schedule_closed_form(steps)
        assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas), steps
        assert a.sigmas[0] == 1.0 and a.sigmas[-1] == 0.0
        assert torch.all(a.sigmas[1:] < a.sigmas[:-1])


@pytest.mark.parametrize("steps", [0, 9, -1, 4.0, True])
def test_bad_step_counts_are_refused(steps):
    with pytest.raises(ScheduleError, match="4"):
        flow_match_schedule(steps)


def test_euler_step_matches_reference_example(fixtures_dir, tables):
    data = load_file(fixtures_dir / "scheduler" / "euler_example.safetensors")
    sigmas = flow_match_schedule(4).sigmas
    assert torch.equal(sigmas, torch.tensor(tables["euler_example"]["sigmas_used"], dtype=torch.float32))
    for i in range(4):
        out = euler_step(data["x"], data["v"], sigmas[i], sigmas[i + 1])
        assert out.dtype == torch.float32
        assert torch.equal(out, data[f"x_next_step{i}"]), i
        # python floats (exact float32 values) give the same result
        out_f = euler_step(data["x"], data["v"], sigmas[i].item(), sigmas[i + 1].item())
        assert torch.equal(out_f, out)


def test_euler_step_matches_diffusers_step_in_bf16():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 4, 6, generator=g).to(torch.bfloat16)
    v = torch.randn(1, 16, 3, 4, 6, generator=g).to(torch.bfloat16)
    ours = flow_match_schedule(4)
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(v, t, x, return_dict=False)[0]
        out = euler_step(x, v, ours.sigmas[i], ours.sigmas[i + 1])
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref), i


def test_euler_step_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        euler_step(torch.zeros(2, 3), torch.zeros(3, 2), 1.0, 0.5)
