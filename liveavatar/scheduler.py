"""Flow-matching Euler sampler schedule (the 4-step DMD sampler of Live Avatar).

The reference samples with diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
shift=3)` followed by `set_timesteps(steps)`, and restarts the step index at 0 for every causal
block. We take the tables from that same class (it reproduces the reference fixtures bit for
bit) and keep the Euler update as a plain function, because the streaming loop indexes steps
itself (per block, per pipeline rank) and has no use for the scheduler's internal step counter.

Units: timesteps are on the training scale 0..`num_train_timesteps` (the value fed to the DiT),
sigmas on 0..1 (the noise fraction of the flow: x_sigma = (1 - sigma) * x0 + sigma * noise).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

MIN_STEPS = 1
MAX_STEPS = 8
TRAINED_STEPS = 4


class ScheduleError(ValueError):
    """A sampling-step count or shift the sampler cannot use."""


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Timesteps fed to the model and the sigma ladder of the Euler update.

    timesteps: [S] float32, `num_train_timesteps * sigmas[:S]` (1000 .. ~8.93 for shift 3).
    sigmas:    [S + 1] float32, from 1.0 down to the final 0.0.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise ScheduleError(
            f"steps must be an integer in {MIN_STEPS}..{MAX_STEPS} ({TRAINED_STEPS} is the trained value), "
            f"got {type(steps).__name__} {steps!r}"
        )
    steps = int(steps)
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise ScheduleError(
            f"steps={steps} is outside {MIN_STEPS}..{MAX_STEPS}: the Live Avatar DMD LoRA was "
            f"distilled for {TRAINED_STEPS} sampling steps (3 and 5 are also used in practice); "
            "set sample_steps to 4"
        )
    return steps


def flow_match_schedule(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> FlowMatchSchedule:
    """Timesteps [steps] and sigmas [steps + 1] (float32, CPU) of the shifted flow-match schedule.

    Equal to diffusers `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift=shift)` after
    `set_timesteps(steps)`: for shift 3 and 4 steps, timesteps 1000, 857.6923, 602.1506, 8.9286.
    """
    steps = _check_steps(steps)
    if not shift > 0:
        raise ScheduleError(f"shift must be > 0, got {shift}")
    if num_train_timesteps < 2:
        raise ScheduleError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=float(shift))
    sched.set_timesteps(steps, device="cpu")
    timesteps = sched.timesteps.detach().to(torch.float32).clone()
    sigmas = sched.sigmas.detach().to(torch.float32).clone()
    if timesteps.shape != (steps,) or sigmas.shape != (steps + 1,):  # pragma: no cover - library drift
        raise ScheduleError(
            f"diffusers returned {tuple(timesteps.shape)} timesteps / {tuple(sigmas.shape)} sigmas "
            f"for {steps} steps; expected ({steps},) / ({steps + 1},)"
        )
    return FlowMatchSchedule(timesteps=timesteps, sigmas=sigmas)


def flow_match_schedule_closed_form(
    steps: int, shift: float = 3.0, num_train_timesteps: int = 1000
) -> FlowMatchSchedule:
    """The same schedule written out (training table in float32, sampling table in float64 then
    rounded to float32, in the order diffusers uses).

    With s(x) = shift * x / (1 + (shift - 1) * x): the training sigmas are s(i / N), i = 1..N,
    so sigma_max = s(1) = 1 and sigma_min = s(1 / N). The sampler takes `steps` points evenly
    spaced in timestep space from N * sigma_max to N * sigma_min, divides by N and applies s a
    second time (so the last point is shifted twice: 0.008929 for N = 1000, shift 3), and appends
    a final sigma 0. Kept as an independent check of the library; `flow_match_schedule` is the
    one to use.
    """
    steps = _check_steps(steps)
    n = num_train_timesteps
    train = torch.linspace(1, n, n, dtype=torch.float32).flip(0) / n
    train = shift * train / (1 + (shift - 1) * train)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    t = torch.linspace(sigma_max * n, sigma_min * n, steps, dtype=torch.float64)
    s = t / n
    s = (shift * s / (1 + (shift - 1) * s)).to(torch.float32)
    sigmas = torch.cat([s, torch.zeros(1, dtype=torch.float32)])
    return FlowMatchSchedule(timesteps=s * n, sigmas=sigmas)


def euler_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma_now: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One flow-matching Euler step: x + (sigma_next - sigma_now) * v.

    x: the current latent (any shape); v: the model's flow velocity (noise - x0), same shape.
    The sigma difference is taken in float32 and the sum in float32 (x is upcast), as diffusers'
    `FlowMatchEulerDiscreteScheduler.step` does; the product dt * v keeps v's dtype (a 0-d float32
    tensor does not promote a bf16 tensor), which is also what the library does. The result is
    cast to `out_dtype` (default: x.dtype; diffusers casts to v.dtype, which is the same in
    an fp32 run).
    """
    if x.shape != v.shape:
        raise ValueError(f"euler_step: x {tuple(x.shape)} and v {tuple(v.shape)} must have the same shape")
    now = torch.as_tensor(sigma_now, dtype=torch.float32, device=x.device)
    nxt = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    if now.ndim or nxt.ndim:
        raise ValueError("euler_step: sigma_now and sigma_next must be scalars")
    dt = nxt - now
    out = x.to(torch.float32) + dt * v
    return out.to(out_dtype or x.dtype)


__all__ = [
    "FlowMatchSchedule", "ScheduleError", "flow_match_schedule", "flow_match_schedule_closed_form",
    "euler_step", "TRAINED_STEPS", "MIN_STEPS", "MAX_STEPS",
]
