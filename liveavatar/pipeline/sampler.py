"""The one block/step loop of Live Avatar ("timestep forcing").

Each denoising step index s owns a KV cache that holds the previous blocks as they were at step
s. A `StepRunner` owns a subset of the step indices (all of them on one GPU; a contiguous group
on each DiT rank of a TPP worker group) and advances a block through those steps. Single-GPU and
TPP generation run this same code: parallelism only decides which runner owns which steps and how
the block latents travel between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from liveavatar.config import StreamConfig
from liveavatar.pipeline.memory import CachePlan
from liveavatar.pipeline.plan import BlockSpec, sink_offsets
from liveavatar.scheduler import FlowMatchSchedule, euler_step, flow_match_schedule


@dataclass
class BlockInputs:
    """Per-block conditioning, identical on every rank.

    audio: [1, n_states, audio_dim, frames_per_block] features of the block's video frames.
    cond: [1, 16, frames_per_block_latent, h, w] pose latents, or None (no pose video = zeros).
    """

    audio: torch.Tensor
    cond: torch.Tensor | None = None


class StepRunner:
    """Owns the DiT, the shared sink cache and the KV caches of `steps` (indices into the schedule).

    dit: a `CausalS2VDiT` (already on its device / dtype).
    text: the DiT's encoded text state for this job (`dit.encode_text(context)`).
    latent_hw: (h, w) of the latent grid (pixels / 8).
    caches: how the step caches are held, decided before (`memory.plan_caches`, through
    `pipeline.job.plan_rank_caches`); the runner follows it: offload (host memory, one shared
    device buffer), prefetch (two device buffers, the next step's rows copied in on a side CUDA
    stream while this step computes), sink_slot (resident caches with rows for the rotated sink),
    resident_kv_layers (per-layer paging through the DiT's layer stream, `dit.stream_layers`),
    fp8 (step and sink caches stored as fp8, dequantized for attention).
    """

    def __init__(self, dit, text, latent_hw: tuple[int, int], schedule: FlowMatchSchedule,
                 steps: Sequence[int], stream: StreamConfig, seed: int,
                 device: torch.device | str, dtype: torch.dtype, caches: CachePlan = CachePlan()):
        self.dit = dit
        self.text = text
        self.latent_hw = latent_hw
        self.schedule = schedule
        self.steps = list(steps)
        self.stream = stream
        self.seed = int(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        if caches.prefetch and not (caches.offload and self.device.type == "cuda"):
            raise ValueError(f"kv_prefetch: needs the KV offload on a CUDA device (this runner: {self.device})")
        self.kv_fp8 = caches.fp8
        self.sink = dit.new_sink_cache(latent_hw, device=self.device, dtype=dtype, fp8=caches.fp8)
        self.kv_offload = caches.offload
        self.kv_prefetch = caches.prefetch
        self.working = None
        self.buffers: list = []
        self.copy_stream = None
        if caches.resident_kv_layers is not None:  # paged per layer by the DiT's layer stream
            if dit.layer_stream is None:
                raise ValueError("resident_kv_layers: the DiT streams no layers (call dit.stream_layers first)")
            self.caches = {s: dit.new_step_cache(latent_hw, device=self.device, dtype=dtype,
                                                 resident_layers=caches.resident_kv_layers, fp8=caches.fp8)
                           for s in self.steps}
            dit.layer_stream.attach_caches([self.caches[s] for s in self.steps])
            return
        if self.kv_offload:  # device buffer(s), the step caches' rows in host memory
            self.buffers = [dit.new_working_buffer(latent_hw, device=self.device, dtype=dtype, fp8=caches.fp8)
                            for _ in range(2 if self.kv_prefetch else 1)]
            self.working = self.buffers[0]
            if self.kv_prefetch:
                self.copy_stream = torch.cuda.Stream(self.device)
                for buf in self.buffers:  # freed (e.g. after a cancel) only once its copies are done
                    buf.tensor.record_stream(self.copy_stream)
            self.caches = {s: dit.new_step_cache(latent_hw, device=self.device, dtype=dtype,
                                                 working=self.buffers[i % len(self.buffers)], fp8=caches.fp8)
                           for i, s in enumerate(self.steps)}
            return
        # sink slot: no per-layer concatenation of [window, sink]
        self.caches = {s: dit.new_step_cache(latent_hw, device=self.device, dtype=dtype, sink_slot=caches.sink_slot,
                                             fp8=caches.fp8) for s in self.steps}

    @property
    def num_steps(self) -> int:
        return len(self.schedule.timesteps)

    def cache_bytes(self) -> int:
        """Device bytes of the caches (the shared working buffer counted once when offloaded)."""
        working = sum(b.nbytes for b in self.buffers)
        stream = self.dit.layer_stream
        slots = sum(t.numel() * t.element_size() for t in stream.kv_slots) if stream is not None else 0
        return self.sink.nbytes + working + slots + sum(c.nbytes for c in self.caches.values())

    def host_cache_bytes(self) -> int:
        return sum(c.host_nbytes for c in self.caches.values())

    def prefill(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> None:
        """(Re)build the sink from the reference latent [1,16,1,h,w] and motion latents [1,16,T,h,w]."""
        self.sink.reset()
        self.dit.prefill_sink(ref_latents.to(self.device, self.dtype),
                              motion_latents.to(self.device, self.dtype), self.text, self.sink)

    @torch.no_grad()
    def run(self, x: torch.Tensor, block: BlockSpec, inputs: BlockInputs,
            on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Advance block latents x [16, n, h, w] through this runner's steps; returns the new x.

        The Euler update runs in float32; x is handed back in float32 so that the next rank (or
        the decoder) sees the same values whichever rank computed the previous step.
        """
        offsets = sink_offsets(self.seed, block.index, self.num_steps, self.stream)
        audio = inputs.audio.to(self.device, self.dtype)
        cond = None if inputs.cond is None else inputs.cond.to(self.device, self.dtype)
        x = x.to(self.device, torch.float32)
        sig = self.schedule.sigmas
        audio_tokens = self.dit.encode_audio(audio)  # once per block, shared by every step
        caches = [self.caches[s] for s in self.steps]
        for i, s in enumerate(self.steps):
            t = float(self.schedule.timesteps[s])
            cache = caches[i]
            cache.page_in(self.copy_stream)  # offload: this step's rows in (no-op if prefetched)
            cache.wait_ready()
            nxt = caches[(i + 1) % len(caches)]  # the next step, or the first one of the next block
            if self.copy_stream is not None and nxt.working is not cache.working:
                nxt.page_in(self.copy_stream)  # overlaps this step's compute
            v = self.dit.forward_block(
                x.to(self.dtype), t, self.text, audio, cond, cache, self.sink,
                start_frame=block.start_frame, sink_offset=offsets[s], audio=audio_tokens,
            )
            cache.page_out()
            x = euler_step(x, v.float(), float(sig[s]), float(sig[s + 1]))
            if on_step is not None:
                on_step(s)
        return x


def make_schedule(steps: int, stream: StreamConfig) -> FlowMatchSchedule:
    return flow_match_schedule(steps, shift=stream.shift, num_train_timesteps=stream.num_train_timesteps)
