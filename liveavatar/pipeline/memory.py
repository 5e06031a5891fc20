"""Memory preflight: estimate a job's GPU memory before loading, and refuse clearly.

Numbers are bytes. The estimate counts what stays resident (DiT weights, one KV cache per owned
denoising step, the shared sink cache, the text cross-attention state, the VAE) plus a working-set
allowance for activations and the streaming decoder. It is deliberately a little pessimistic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from liveavatar.config import DEFAULT_STREAM, DiTConfig, StreamConfig

GIB = 1024 ** 3


def dit_param_counts(cfg: DiTConfig) -> tuple[int, int]:
    """(all parameters, parameters in fp8-eligible Linear weights) of the DiT, from the config."""
    from liveavatar.models.dit import CausalS2VDiT
    from liveavatar.models.fp8 import fp8_weight_numel

    with torch.device("meta"):
        model = CausalS2VDiT(cfg)
    return fp8_weight_numel(model)


def dit_weight_bytes(cfg: DiTConfig, dtype: torch.dtype, fp8: bool,
                     param_counts: tuple[int, int] | None = None) -> int:
    """Bytes of the DiT weights in `dtype`, with 1 byte per fp8-eligible linear weight when `fp8`."""
    elt = torch.tensor([], dtype=dtype).element_size()
    total, linear = param_counts or dit_param_counts(cfg)
    return (total - linear) * elt + linear * (1 if fp8 else elt)


@dataclass
class MemoryEstimate:
    weights: int
    step_caches: int
    sink_cache: int
    text_state: int
    vae: int
    working: int

    @property
    def total(self) -> int:
        return self.weights + self.step_caches + self.sink_cache + self.text_state + self.vae + self.working

    def table(self) -> str:
        parts = [(k, getattr(self, k)) for k in ("weights", "step_caches", "sink_cache", "text_state", "vae", "working")]
        return ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts) + f" = {self.total / GIB:.1f} GiB"


def estimate_memory(cfg: DiTConfig, width: int, height: int, *, steps_owned: int = 4,
                    dtype: torch.dtype = torch.bfloat16, fp8: bool = False, decode_here: bool = True,
                    stream: StreamConfig = DEFAULT_STREAM, param_counts: tuple[int, int] | None = None,
                    sink_slot: bool = False, kv_offload: bool = False) -> MemoryEstimate:
    """Resident GPU bytes of one rank that owns `steps_owned` denoising steps at W x H.

    sink_slot: the step caches also reserve rows for the rotated sink (a speed option the
    sampler turns on only when it fits; +2.5 * fsl tokens per step cache).
    kv_offload: the step caches live in host memory and share one device buffer (one cache's
    rows on the GPU; see `host_cache_bytes` for the host side).
    """
    elt = torch.tensor([], dtype=dtype).element_size()
    weights = dit_weight_bytes(cfg, dtype, fp8, param_counts) if steps_owned else 0
    fsl = (height // 16) * (width // 16)
    clip_tokens = stream.latent_frames_per_clip * fsl
    kv = cfg.num_layers * 2 * cfg.dim * elt  # bytes per cached token over all layers (k + v)
    sink_tokens = fsl + fsl + fsl // 4 + fsl // 4
    resident = min(steps_owned, 1) if kv_offload else steps_owned
    step_caches = resident * (clip_tokens + (0 if kv_offload or not sink_slot else sink_tokens)) * kv
    sink_cache = sink_tokens * kv if steps_owned else 0
    text_state = cfg.num_layers * 2 * cfg.text_len * cfg.dim * elt if steps_owned else 0
    vae = int(0.3 * GIB) if decode_here else 0
    block_tokens = stream.frames_per_block_latent * fsl
    # FFN hidden + q/k/v/o of one block in flight, plus decoder feature maps at full resolution
    working = 4 * block_tokens * max(cfg.ffn_dim, 4 * cfg.dim) * elt if steps_owned else 0
    if decode_here:
        working += int(stream.frames_per_block * height * width * 96 * 2 * 4)
    return MemoryEstimate(weights, step_caches, sink_cache, text_state, vae, int(working + 0.5 * GIB))


def host_cache_bytes(cfg: DiTConfig, width: int, height: int, steps_owned: int,
                     dtype: torch.dtype = torch.bfloat16, stream: StreamConfig = DEFAULT_STREAM) -> int:
    """Host (CPU) bytes of `steps_owned` offloaded step caches at W x H."""
    elt = torch.tensor([], dtype=dtype).element_size()
    fsl = (height // 16) * (width // 16)
    return steps_owned * stream.latent_frames_per_clip * fsl * cfg.num_layers * 2 * cfg.dim * elt


def available_host_bytes() -> int | None:
    """Physical memory available to new allocations (Linux sysconf), or None where unknown."""
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_error(est: MemoryEstimate, free: int, total: int, device: object, what: str) -> MemoryError:
    """The MemoryError of a job that needs `est` where `free` of `total` bytes are free."""
    return MemoryError(
        f"{what} needs about {est.total / GIB:.1f} GiB on {device} ({est.table()}), but only "
        f"{free / GIB:.1f} of {total / GIB:.1f} GiB are free. Remedies: fp8 weights (halves the DiT), "
        f"KV caches in host RAM (--kv-offload on; automatic unless turned off), "
        f"a smaller size (e.g. 688*368 or 384*256), fewer denoising steps (3), or more GPUs in 'tpp' mode "
        f"(each GPU then holds only its own steps' caches)."
    )


def check_fits(device: torch.device, est: MemoryEstimate, what: str = "this job") -> None:
    """Raise MemoryError with the numbers and the remedies when `est` exceeds free GPU memory."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if est.total > free:
        raise memory_error(est, free, total, device, what)


def plan_kv_offload(resident: MemoryEstimate, offloaded: MemoryEstimate, host_need: int, *, free: int,
                    total: int, host_available: int | None, steps: int, kv_offload: bool | None,
                    kv_prefetch: bool | None, device: object = "cuda", what: str = "this job") -> tuple[bool, bool]:
    """Whether the step KV caches go to host memory, and whether the prefetch buffer fits.

    resident / offloaded: `estimate_memory` without / with `kv_offload`; host_need: bytes of the
    offloaded caches (`host_cache_bytes`); free / total: GPU bytes; host_available: free RAM
    (None: unknown). kv_offload None = only when the resident caches do not fit. kv_prefetch
    None = with the offload whenever its second step-cache buffer fits too (True: the same, asked
    for; False: never). Returns (kv_offload, kv_prefetch); raises MemoryError (numbers and
    remedies) when nothing fits.
    """
    if not kv_offload:
        if resident.total <= free:
            return False, False
        if kv_offload is False or steps < 2:
            raise memory_error(resident, free, total, device, what)
    if offloaded.total > free:
        raise memory_error(offloaded, free, total, device, what + " (KV caches offloaded to host memory)")
    if host_available is not None and host_need > host_available:
        raise MemoryError(f"{what}: the KV cache offload needs {host_need / GIB:.1f} GiB of host memory, "
                          f"{host_available / GIB:.1f} GiB are available. Remedies: a smaller size (384*256), fp8 "
                          "weights so the caches fit the GPU, or more GPUs in 'tpp' mode.")
    return True, bool(kv_prefetch is not False and offloaded.total + offloaded.step_caches <= free)
