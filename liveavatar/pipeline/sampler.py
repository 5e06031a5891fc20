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
    kv_offload: keep the step caches in host memory with one shared device buffer (True), never
    (False), or only when they do not fit the GPU (None; see `_offload_wanted`).
    kv_prefetch: with offload on CUDA, two device buffers: the next step's rows are copied in on
    a side stream while this step computes (None: when the second buffer fits the free memory).
    """

    def __init__(self, dit, text, latent_hw: tuple[int, int], schedule: FlowMatchSchedule,
                 steps: Sequence[int], stream: StreamConfig, seed: int,
                 device: torch.device | str, dtype: torch.dtype, kv_offload: bool | None = None,
                 kv_prefetch: bool | None = None):
        self.dit = dit
        self.text = text
        self.latent_hw = latent_hw
        self.schedule = schedule
        self.steps = list(steps)
        self.stream = stream
        self.seed = int(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        self.sink = dit.new_sink_cache(latent_hw, device=self.device, dtype=dtype)
        self.kv_offload = self._offload_wanted(kv_offload)
        self.kv_prefetch = (self.kv_offload and self.device.type == "cuda" and len(self.steps) > 1
                            and self._prefetch_wanted(kv_prefetch))
        self.working = None
        self.buffers: list = []
        self.copy_stream = None
        if self.kv_offload:  # device buffer(s), the step caches' rows in host memory
            self.buffers = [dit.new_working_buffer(latent_hw, device=self.device, dtype=dtype)
                            for _ in range(2 if self.kv_prefetch else 1)]
            self.working = self.buffers[0]
            if self.kv_prefetch:
                self.copy_stream = torch.cuda.Stream(self.device)
                for buf in self.buffers:  # freed (e.g. after a cancel) only once its copies are done
                    buf.tensor.record_stream(self.copy_stream)
            self.caches = {s: dit.new_step_cache(latent_hw, device=self.device, dtype=dtype,
                                                 working=self.buffers[i % len(self.buffers)])
                           for i, s in enumerate(self.steps)}
            return
        # sink slot (no per-layer concatenation of [window, sink]) when all caches fit with it
        slot = bool(getattr(dit, "sink_slot_fits", None)
                    and dit.sink_slot_fits(latent_hw, len(self.steps), self.device, dtype))
        self.caches = {s: dit.new_step_cache(latent_hw, device=self.device, dtype=dtype, sink_slot=slot)
                       for s in self.steps}

    def _offload_wanted(self, kv_offload: bool | None) -> bool:
        """kv_offload True / False, or None: offload only on CUDA when this runner owns several
        steps and their caches do not fit the free memory (keeping 2 GiB for activations)."""
        if kv_offload is not None:
            return bool(kv_offload)
        if self.device.type != "cuda" or len(self.steps) < 2:
            return False
        return not self._fits(self._cache_bytes(len(self.steps)))

    def _prefetch_wanted(self, kv_prefetch: bool | None) -> bool:
        """kv_prefetch True / False, or None: when two step-cache buffers fit the free memory
        (keeping 2 GiB for activations); called with the offload decided, before any buffer."""
        if kv_prefetch is not None:
            return bool(kv_prefetch)
        return self._fits(2 * self._cache_bytes(1))

    def _cache_bytes(self, steps: int) -> int:
        """Bytes of `steps` step caches at this runner's size (`memory.host_cache_bytes`)."""
        from liveavatar.pipeline.memory import host_cache_bytes

        h, w = self.latent_hw
        return host_cache_bytes(self.dit.cfg, w * 8, h * 8, steps, self.dtype, self.stream)

    def _fits(self, nbytes: int) -> bool:
        """`nbytes` fit the device's free memory with 2 GiB left for activations."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return nbytes + (2 << 30) <= free

    @property
    def num_steps(self) -> int:
        return len(self.schedule.timesteps)

    def cache_bytes(self) -> int:
        """Device bytes of the caches (the shared working buffer counted once when offloaded)."""
        working = sum(b.nbytes for b in self.buffers)
        return self.sink.nbytes + working + sum(c.nbytes for c in self.caches.values())

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


def owned_steps(num_steps: int, rank: int, num_ranks: int) -> list[int]:
    """Contiguous step group of DiT rank `rank` out of `num_ranks` (sizes differ by at most 1)."""
    if not 1 <= num_ranks <= num_steps:
        raise ValueError(f"DiT ranks must be between 1 and the number of steps ({num_steps}), got {num_ranks}")
    base, extra = divmod(num_steps, num_ranks)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


def make_schedule(steps: int, stream: StreamConfig) -> FlowMatchSchedule:
    return flow_match_schedule(steps, shift=stream.shift, num_train_timesteps=stream.num_train_timesteps)
