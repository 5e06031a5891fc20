"""Memory preflight: estimate a job's GPU memory before loading, and refuse clearly.

Numbers are bytes. The estimate counts what stays resident (DiT weights, one KV cache per owned
denoising step, the shared sink cache, the text cross-attention state, the VAE) plus a working-set
allowance for activations and the streaming decoder. It is deliberately a little pessimistic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from liveavatar.config import DEFAULT_STREAM, DiTConfig, StreamConfig
from liveavatar.options import CachePolicy

GIB = 1024 ** 3
OOM_REMEDY = ("out of memory on the device: stop other processes using it, or lower the need: a smaller "
              "size, fp8 weights, KV caches offloaded to the host, or more GPUs")  # the CLI's and the ranks'



def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: torch's `OutOfMemoryError` (CUDA), the CPU
    allocator's RuntimeError ("can't allocate memory"), or Python's `MemoryError`."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


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


# Kept free on top of every estimate (allocator fragmentation, small buffers, CUDA context growth).
RESERVE_BYTES = int(0.5 * GIB)
VAE_BYTES = int(0.3 * GIB)  # the Wan VAE's weights


@dataclass
class MemoryEstimate:
    """GPU bytes of one rank, by part; `working` holds activations plus `RESERVE_BYTES`."""

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


def fits(need: "MemoryEstimate | int", free: int) -> bool:
    """The one fit rule: an estimate (which carries its working set and `RESERVE_BYTES`), or a byte
    count plus `RESERVE_BYTES`, is at most the free device memory."""
    total = need.total if isinstance(need, MemoryEstimate) else int(need) + RESERVE_BYTES
    return total <= free


def _latent_hw(width: int, height: int, stream: StreamConfig) -> tuple[int, int]:
    return height // stream.vae_stride_hw, width // stream.vae_stride_hw


def _kv_bytes_per_token(cfg: DiTConfig, dtype: torch.dtype) -> int:
    """Bytes of one cached token over all layers (keys + values)."""
    return cfg.num_layers * 2 * cfg.dim * torch.tensor([], dtype=dtype).element_size()


def estimate_memory(cfg: DiTConfig, width: int, height: int, *, steps_owned: int = 4,
                    dtype: torch.dtype = torch.bfloat16, fp8: bool = False, decode_here: bool = True,
                    stream: StreamConfig = DEFAULT_STREAM, param_counts: tuple[int, int] | None = None,
                    sink_slot: bool = False, kv_offload: bool = False) -> MemoryEstimate:
    """Resident GPU bytes of one rank that owns `steps_owned` denoising steps at W x H pixels.

    sink_slot: the step caches also reserve rows for the rotated sink (a speed option, on only
    when it fits: `plan_caches`; +2.5 fsl tokens per step cache).
    kv_offload: the step caches live in host memory and share one device buffer (one cache's
    rows on the GPU; see `host_cache_bytes` for the host side).
    param_counts: (0, 0) for weights already resident (not counted).
    """
    from liveavatar.models.tokens import clip_tokens, frame_tokens, sink_tokens

    elt = torch.tensor([], dtype=dtype).element_size()
    weights = dit_weight_bytes(cfg, dtype, fp8, param_counts) if steps_owned else 0
    hw = _latent_hw(width, height, stream)
    kv = _kv_bytes_per_token(cfg, dtype)
    sink = sink_tokens(hw, cfg.patch_size, stream)
    resident = min(steps_owned, 1) if kv_offload else steps_owned
    step_caches = resident * (clip_tokens(hw, cfg.patch_size, stream) + (0 if kv_offload or not sink_slot else sink)) * kv
    sink_cache = sink * kv if steps_owned else 0
    text_state = cfg.num_layers * 2 * cfg.text_len * cfg.dim * elt if steps_owned else 0
    vae = VAE_BYTES if decode_here else 0
    block_tokens = stream.frames_per_block_latent * frame_tokens(hw, cfg.patch_size)
    # FFN hidden + q/k/v/o of one block in flight, plus decoder feature maps at full resolution
    working = 4 * block_tokens * max(cfg.ffn_dim, 4 * cfg.dim) * elt if steps_owned else 0
    if decode_here:
        working += int(stream.frames_per_block * height * width * 96 * 2 * 4)
    return MemoryEstimate(weights, step_caches, sink_cache, text_state, vae, int(working + RESERVE_BYTES))


def load_estimate(cfg: DiTConfig, dtype: torch.dtype, fp8: bool) -> MemoryEstimate:
    """GPU bytes while loading: the DiT weights (fp8: converted layer by layer while loading, so
    the peak is the fp8 size plus one bf16 layer, inside the reserve) and the VAE."""
    return MemoryEstimate(dit_weight_bytes(cfg, dtype, fp8), 0, 0, 0, VAE_BYTES, RESERVE_BYTES)


def host_cache_bytes(cfg: DiTConfig, width: int, height: int, steps_owned: int,
                     dtype: torch.dtype = torch.bfloat16, stream: StreamConfig = DEFAULT_STREAM) -> int:
    """Host (CPU) bytes of `steps_owned` offloaded step caches at W x H pixels."""
    from liveavatar.models.tokens import clip_tokens

    ring = clip_tokens(_latent_hw(width, height, stream), cfg.patch_size, stream)
    return steps_owned * ring * _kv_bytes_per_token(cfg, dtype)


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
    """Raise MemoryError with the numbers and the remedies when `est` does not fit (`fits`) the
    free memory of a CUDA `device` (nothing to check elsewhere)."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if not fits(est, free):
        raise memory_error(est, free, total, device, what)


@dataclass(frozen=True)
class CachePlan:
    """How one rank holds its step KV caches (decided by `plan_caches`, followed by `StepRunner`).

    offload: in host memory, paged through a device buffer; prefetch: a second device buffer so the
    next step's page-in overlaps this step's compute; sink_slot: resident caches with rows for the
    rotated sink (faster attention, +2.5 fsl tokens per cache).
    """

    offload: bool = False
    prefetch: bool = False
    sink_slot: bool = False


def plan_caches(cfg: DiTConfig, width: int, height: int, steps_owned: int, *, policy: "CachePolicy",
                free: int, total: int, host_available: int | None, dtype: torch.dtype = torch.bfloat16,
                stream: StreamConfig = DEFAULT_STREAM, decode_here: bool = True, device: object = "cuda",
                what: str = "this job") -> CachePlan:
    """The one cache decision of every rank (in-process or a worker), weights already resident.

    free / total: GPU bytes now; host_available: free RAM (None: unknown). policy.offload None:
    offload only when the resident caches do not fit; policy.prefetch None: with the offload
    whenever its second buffer fits too (True: the same, asked for; False: never). The sink slot
    is taken when every resident cache fits with it. Raises MemoryError (numbers and remedies)
    when nothing fits, also when the offloaded caches do not fit the host memory.
    """
    def est(**kw) -> MemoryEstimate:
        return estimate_memory(cfg, width, height, steps_owned=steps_owned, dtype=dtype, stream=stream,
                               decode_here=decode_here, param_counts=(0, 0), **kw)

    resident = est()
    if not policy.offload:
        if fits(resident, free):
            return CachePlan(sink_slot=steps_owned > 0 and fits(est(sink_slot=True), free))
        if policy.offload is False or steps_owned < 2:
            raise memory_error(resident, free, total, device, what)
    offloaded = est(kv_offload=True)
    if not fits(offloaded, free):
        raise memory_error(offloaded, free, total, device, what + " (KV caches offloaded to host memory)")
    host_need = host_cache_bytes(cfg, width, height, steps_owned, dtype, stream)
    if host_available is not None and host_need > host_available:
        raise MemoryError(f"{what}: the KV cache offload needs {host_need / GIB:.1f} GiB of host memory, "
                          f"{host_available / GIB:.1f} GiB are available. Remedies: a smaller size (384*256), fp8 "
                          "weights so the caches fit the GPU, or more GPUs in 'tpp' mode.")
    two_buffers = dataclasses.replace(offloaded, step_caches=2 * offloaded.step_caches)
    prefetch = policy.prefetch is not False and steps_owned > 1 and fits(two_buffers, free)
    return CachePlan(offload=True, prefetch=prefetch)
