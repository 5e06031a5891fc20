"""Blocks through a runner's steps along the TPP diagonal, one batched pass per tick (an option).

`StepRunner.run` takes one block through all its steps, one DiT call per step. Here, at tick t
the calls (block t, step 0), (t-1, 1), ..., (t-S+1, S-1) run as one `models.diagonal.forward_diagonal`
pass: each weight (and each streamed layer's copy) serves S calls, and every block still gets
exactly the calls it gets from `StepRunner.run` (its own caches, sink offsets, Euler updates).
The Rolling Sink refresh at clip 1 is kept exact: blocks of clip 0 still in flight keep the old
sink, blocks of clip >= 1 use the refreshed one (two sinks while both are in flight).
Same frames as the unbatched loop up to float rounding (tests/test_diagonal.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from liveavatar.models.diagonal import DiagonalCall, forward_diagonal
from liveavatar.pipeline.plan import BlockSpec, sink_offsets
from liveavatar.pipeline.sampler import BlockInputs, StepRunner
from liveavatar.scheduler import euler_step


@dataclass
class _InFlight:
    block: BlockSpec
    x: torch.Tensor  # [16, F, h, w] float32
    audio: tuple[torch.Tensor, torch.Tensor]
    cond: torch.Tensor | None
    offsets: list[int]
    sink: object
    step: int = 0  # index into runner.steps


def diagonal_blocks(runner: StepRunner, blocks: Sequence[BlockSpec], noise: Callable[[BlockSpec], torch.Tensor],
                    inputs: Callable[[BlockSpec], BlockInputs], motion: torch.Tensor | None = None,
                    sink_refresh: bool = True) -> Iterator[tuple[BlockSpec, torch.Tensor]]:
    """Yield (block, final latents `[16, F, h, w]` float32) in block order, as `StepRunner.run` would
    produce them block after block. runner: owns the steps (resident caches, prefilled sink);
    noise(block) `[16, F, h, w]`; inputs(block): its `BlockInputs`; motion `[1, 16, T, h, w]`:
    the motion latents for the clip-1 sink refresh (needed when `sink_refresh` and a block of
    clip 1 comes)."""
    if runner.kv_offload:
        raise ValueError("diagonal: needs the step caches on the device (no KV offload)")
    dit, steps, sig = runner.dit, runner.steps, runner.schedule.sigmas
    pending = list(blocks)
    flight: list[_InFlight] = []
    first: torch.Tensor | None = None  # block 0's final latents (the refresh's source)
    new_sink = None
    while pending or flight:
        if pending:
            b = pending[0]
            refresh = sink_refresh and b.clip >= 1
            if refresh and new_sink is None and first is not None:
                if motion is None:
                    raise ValueError("diagonal: the clip-1 sink refresh needs the motion latents")
                new_sink = dit.new_sink_cache(runner.latent_hw, device=runner.device, dtype=runner.dtype)
                dit.prefill_sink(first[:, 0:1].unsqueeze(0).to(runner.device, runner.dtype),
                                 motion.to(runner.device, runner.dtype), runner.text, new_sink)
            if not refresh or new_sink is not None:  # else wait a tick for block 0 to finish
                pending.pop(0)
                inp = inputs(b)
                audio = dit.encode_audio(inp.audio.to(runner.device, runner.dtype))
                cond = None if inp.cond is None else inp.cond.to(runner.device, runner.dtype)
                flight.append(_InFlight(b, noise(b).to(runner.device, torch.float32), audio, cond,
                                        sink_offsets(runner.seed, b.index, runner.num_steps, runner.stream),
                                        new_sink if refresh else runner.sink))
        calls = []
        for f in flight:
            s = steps[f.step]
            calls.append(DiagonalCall(x=f.x.to(runner.dtype), timestep=float(runner.schedule.timesteps[s]),
                                      audio=f.audio, cache=runner.caches[s], sink=f.sink,
                                      start_frame=f.block.start_frame, sink_offset=f.offsets[s], cond=f.cond))
        for f, v in zip(flight, forward_diagonal(dit, runner.text, calls)):
            s = steps[f.step]
            f.x = euler_step(f.x, v.float(), float(sig[s]), float(sig[s + 1]))
            f.step += 1
        while flight and flight[0].step == len(steps):
            done = flight.pop(0)
            if done.block.index == 0:
                first = done.x.clone()
            yield done.block, done.x
    if new_sink is not None:
        runner.sink = new_sink


__all__ = ["diagonal_blocks"]
