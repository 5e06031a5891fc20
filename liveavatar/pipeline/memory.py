"""Memory preflight: estimate a job's GPU memory before loading, and refuse clearly.

Numbers are bytes. The estimate counts what stays resident (DiT weights, one KV cache per owned
denoising step, the shared sink cache, the text cross-attention state, the VAE) plus a working-set
allowance for activations and the streaming decoder. It is deliberately a little pessimistic.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from liveavatar.config import DEFAULT_STREAM, DiTConfig, StreamConfig
from liveavatar.models.layer_stream import LayerResidency
from liveavatar.options import WEIGHTS_MODES, CachePolicy
from liveavatar.pipeline.allocator import allocation_bytes, device_free, expandable_segments  # noqa: F401 (re-exported)

GIB = 1024 ** 3
OOM_REMEDY = ("out of memory on the device: stop other processes using it, or lower the need: a smaller "
              "size, fp8 weights, KV caches offloaded to the host, or more GPUs")  # the CLI's and the ranks'



def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: torch's `OutOfMemoryError` (CUDA), the CPU
    allocator's RuntimeError ("can't allocate memory"), or Python's `MemoryError`."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


@functools.lru_cache(maxsize=8)
def dit_param_counts(cfg: DiTConfig, layers: range | None = None) -> tuple[int, int]:
    """(all parameters, parameters in fp8-eligible Linear weights) of the DiT, from the config
    (`layers`: of that layer slice only)."""
    from liveavatar.models.dit import CausalS2VDiT
    from liveavatar.models.fp8 import fp8_weight_numel

    with torch.device("meta"):
        model = CausalS2VDiT(cfg, layers=layers)
    return fp8_weight_numel(model)


@functools.lru_cache(maxsize=8)
def block_param_counts(cfg: DiTConfig) -> tuple[int, int]:
    """(parameters, fp8-eligible Linear weight elements) of ONE DiT block (the unit the layer
    stream moves; the audio injectors stay resident)."""
    from liveavatar.models.dit_blocks import DiTBlock
    from liveavatar.models.fp8 import fp8_weight_numel

    with torch.device("meta"):
        block = DiTBlock(cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.qk_norm, cfg.cross_attn_norm, cfg.eps)
    return fp8_weight_numel(block)


def dit_weight_bytes(cfg: DiTConfig, dtype: torch.dtype, fp8: bool,
                     param_counts: tuple[int, int] | None = None, layers: range | None = None) -> int:
    """Bytes of the DiT weights in `dtype`, with 1 byte per fp8-eligible linear weight when `fp8`."""
    elt = torch.tensor([], dtype=dtype).element_size()
    total, linear = param_counts or dit_param_counts(cfg, layers)
    return (total - linear) * elt + linear * (1 if fp8 else elt)


# Kept free on top of every estimate (allocator fragmentation, small buffers, CUDA context growth).
RESERVE_BYTES = int(0.5 * GIB)
VAE_BYTES = int(0.3 * GIB)  # the Wan VAE's weights
# With layer streaming or paged KV the peak exceeded the modeled working set by about 20-27
# block-sized activations ([block tokens, dim], model dtype) on one H200 (2026-12-03, fp8 + compile,
# 4 steps: +0.30 GiB at 384*256, +0.62 GiB at 704*384, which ate RESERVE_BYTES and left the
# decode thrashing at the cap); counted so that the placement leaves that room.
PAGED_WORKING_ACTIVATIONS = 32


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


def _kv_bytes_per_token(cfg: DiTConfig, dtype: torch.dtype, layers: range | None = None, kv_fp8: bool = False) -> int:
    """Bytes of one cached token over all layers (or the slice `layers`), keys + values; kv_fp8: 1
    byte per value plus a 2-byte scale per head (`models.kv_cache.kv_row_width`)."""
    n = cfg.num_layers if layers is None else len(layers)
    if kv_fp8:
        from liveavatar.models.kv_cache import kv_row_width

        return n * 2 * cfg.num_heads * kv_row_width(cfg.dim // cfg.num_heads, True)
    return n * 2 * cfg.dim * torch.tensor([], dtype=dtype).element_size()


def kv_layer_bytes(cfg: DiTConfig, width: int, height: int, dtype: torch.dtype = torch.bfloat16,
                   stream: StreamConfig = DEFAULT_STREAM, kv_fp8: bool = False) -> int:
    """Bytes of one layer of one step cache (its ring of keys and values) at W x H pixels: what
    the layer stream copies per paged layer and step."""
    from liveavatar.models.tokens import clip_tokens

    ring = clip_tokens(_latent_hw(width, height, stream), cfg.patch_size, stream)
    return ring * _kv_bytes_per_token(cfg, dtype, kv_fp8=kv_fp8) // cfg.num_layers


def block_bytes(cfg: DiTConfig, dtype: torch.dtype, fp8: bool) -> int:
    """Bytes of one DiT block's weights as the layer stream holds them (fp8 linears: 1 byte each)."""
    return dit_weight_bytes(cfg, dtype, fp8, block_param_counts(cfg))


@functools.lru_cache(maxsize=16)
def _packed_block_bytes(cfg: DiTConfig, dtype: torch.dtype, fp8: bool) -> int:
    """Bytes of one DiT block packed into one buffer as loading leaves it (`block_packing.pack_on_device`
    / `pack_to_host`): its tensors (fp8 linears: 1-byte weight, a float32 scale per output channel
    at most, the bias in bf16), each padded to `PACK_ALIGN` bytes at most."""
    from liveavatar.models.dit_blocks import DiTBlock
    from liveavatar.models.fp8 import fp8_linears
    from liveavatar.models.block_packing import PACK_ALIGN as pad

    with torch.device("meta"):
        block = DiTBlock(cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.qk_norm, cfg.cross_attn_norm, cfg.eps)
    elt = torch.tensor([], dtype=dtype).element_size()
    converted = set(fp8_linears(block)) if fp8 else set()
    total = 0
    for name, mod in block.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if name in converted and pname == "weight":
                total += p.numel() + 4 * p.shape[0] + 2 * pad  # weight_fp8, weight_inv_scale (row: [1, out])
            else:
                total += p.numel() * (2 if name in converted else elt) + pad  # fp8 biases stay bf16
    return total


def block_rounding_bytes(cfg: DiTConfig, dtype: torch.dtype, fp8: bool, expandable: bool | None = None) -> int:
    """What one resident DiT block holds on the device beyond `block_bytes`: its fp8 scales and
    the packing alignment, and the allocator's rounding of its one buffer (`allocation_bytes`;
    under 2 MiB. Tensor by tensor it would be 9 MiB per fp8 14B block with default segments,
    hence the packing)."""
    return allocation_bytes(_packed_block_bytes(cfg, dtype, fp8), expandable) - block_bytes(cfg, dtype, fp8)


def estimate_memory(cfg: DiTConfig, width: int, height: int, *, steps_owned: int = 4,
                    dtype: torch.dtype = torch.bfloat16, fp8: bool = False, decode_here: bool = True,
                    stream: StreamConfig = DEFAULT_STREAM, param_counts: tuple[int, int] | None = None,
                    sink_slot: bool = False, kv_offload: bool = False, kv_fp8: bool = False,
                    residency: LayerResidency | None = None, layers: range | None = None) -> MemoryEstimate:
    """Resident GPU bytes of one rank that owns `steps_owned` denoising steps at W x H pixels.

    layers: the rank holds only this DiT layer slice (weights, caches and text state of those
    layers; a layer-sharded worker group).
    sink_slot: the step caches also reserve rows for the rotated sink (a speed option, on only
    when it fits: `plan_caches`; +2.5 fsl tokens per step cache).
    kv_offload: the step caches live in host memory and share one device buffer (one cache's
    rows on the GPU; see `host_cache_bytes` for the host side).
    kv_fp8: step and sink caches stored as fp8 (about half the bytes).
    param_counts: (0, 0) for weights already resident (not counted).
    residency: layer streaming (models/layer_stream.py): weights = the resident blocks (and the
    rest of the DiT) plus `buffers` block slots when any block is streamed; step caches = the
    resident layers of every owned step plus `buffers` layer slots when any layer is paged
    (`sink_slot` and `kv_offload` do not apply).
    """
    from liveavatar.models.tokens import clip_tokens, frame_tokens, sink_tokens

    elt = torch.tensor([], dtype=dtype).element_size()
    weights = device_weight_bytes(cfg, dtype, fp8, residency, layers, param_counts) if steps_owned else 0
    hw = _latent_hw(width, height, stream)
    kv = _kv_bytes_per_token(cfg, dtype, layers, kv_fp8)
    sink = sink_tokens(hw, cfg.patch_size, stream)
    resident = min(steps_owned, 1) if kv_offload else steps_owned
    step_caches = resident * (clip_tokens(hw, cfg.patch_size, stream) + (0 if kv_offload or not sink_slot else sink)) * kv
    if residency is not None and steps_owned:
        n = cfg.num_layers
        paged = steps_owned * (n - residency.kv)
        step_caches = (steps_owned * residency.kv + min(residency.buffers, paged)) * kv_layer_bytes(
            cfg, width, height, dtype, stream, kv_fp8)
    sink_cache = sink * kv if steps_owned else 0
    text_state = _kv_bytes_per_token(cfg, dtype, layers) * cfg.text_len if steps_owned else 0  # text K/V: model dtype
    vae = VAE_BYTES if decode_here else 0
    block_tokens = stream.frames_per_block_latent * frame_tokens(hw, cfg.patch_size)
    # FFN hidden + q/k/v/o of one block in flight, plus decoder feature maps at full resolution
    working = 4 * block_tokens * max(cfg.ffn_dim, 4 * cfg.dim) * elt if steps_owned else 0
    if residency is not None and steps_owned and min(residency.weights, residency.kv) < cfg.num_layers:
        # streamed blocks or paged cache layers: measured, not modeled
        working += PAGED_WORKING_ACTIVATIONS * block_tokens * cfg.dim * elt
    if kv_fp8 and steps_owned:  # one layer's window + sink keys and values dequantized for attention
        working += 2 * (clip_tokens(hw, cfg.patch_size, stream) + sink) * cfg.dim * elt
    if decode_here:
        working += int(stream.frames_per_block * height * width * 96 * 2 * 4)
    return MemoryEstimate(weights, step_caches, sink_cache, text_state, vae, int(working + RESERVE_BYTES))


def load_estimate(cfg: DiTConfig, dtype: torch.dtype, fp8: bool,
                  residency: LayerResidency | None = None, layers: range | None = None) -> MemoryEstimate:
    """GPU bytes while loading: the DiT weights (of the slice `layers`; fp8: converted layer by
    layer while loading, so the peak is the fp8 size plus one bf16 layer, inside the reserve) and
    the VAE. residency: only the resident blocks and the stream's slots (the others go to host
    memory as they load)."""
    return MemoryEstimate(device_weight_bytes(cfg, dtype, fp8, residency, layers), 0, 0, 0, VAE_BYTES, RESERVE_BYTES)


def device_weight_bytes(cfg: DiTConfig, dtype: torch.dtype, fp8: bool, residency: LayerResidency | None = None,
                        layers: range | None = None, param_counts: tuple[int, int] | None = None) -> int:
    """Device bytes of the DiT weights as placed: every weight (of the slice `layers`) in `dtype`
    (fp8 linears: 1 byte), less the blocks `residency` streams from host memory, plus the
    stream's `buffers` block slots, plus the allocator's rounding of every resident block (one
    packed buffer each, `block_rounding_bytes`) and of every slot. param_counts (0, 0): weights
    already resident (measured, not counted): 0."""
    weights = dit_weight_bytes(cfg, dtype, fp8, param_counts, layers)
    if not weights:
        return 0
    resident = len(layers) if layers is not None else cfg.num_layers
    if residency is not None:
        streamed = cfg.num_layers - residency.weights
        slots = min(residency.buffers, streamed)
        one = block_bytes(cfg, dtype, fp8)
        weights -= (streamed - slots) * one
        weights += slots * (allocation_bytes(one) - one)
        resident = residency.weights
    return weights + resident * block_rounding_bytes(cfg, dtype, fp8)


def place_layers(cfg: DiTConfig, width: int, height: int, steps_owned: int, free: int, total: int, *,
                 mode: str = "auto", dtype: torch.dtype = torch.bfloat16, fp8: bool = False,
                 decode_here: bool = True, stream: StreamConfig = DEFAULT_STREAM, buffers: int = 3,
                 device: object = "cuda", what: str = "this job") -> LayerResidency | None:
    """The weight placement decision before loading, for a job at W x H owning `steps_owned` steps.

    mode "resident": None (every block on the GPU; the caches are placed at job time by
    `plan_caches`); "stream": `fit_residency`; "auto": None when the weights and every step cache
    fit the GPU, else `fit_residency`. Raises MemoryError (numbers and remedies) when streaming
    every layer does not fit either; the loading preflight (`load_estimate`) is separate.
    """
    if mode not in WEIGHTS_MODES:
        raise ValueError(f"weights: {mode!r} is not one of {', '.join(WEIGHTS_MODES)}")
    kw = dict(dtype=dtype, fp8=fp8, decode_here=decode_here, stream=stream)
    if mode == "resident" or (mode == "auto" and fits(estimate_memory(cfg, width, height, steps_owned=steps_owned,
                                                                      **kw), free)):
        return None
    res = fit_residency(cfg, width, height, steps_owned, free, buffers=buffers, **kw)
    if res is None:
        est = estimate_memory(cfg, width, height, steps_owned=steps_owned, residency=LayerResidency(0, 0, buffers),
                              **kw)
        raise memory_error(est, free, total, device, what + " (every DiT layer and KV layer streamed)")
    return res


def fit_residency(cfg: DiTConfig, width: int, height: int, steps_owned: int, free: int, *,
                  dtype: torch.dtype = torch.bfloat16, fp8: bool = False, decode_here: bool = True,
                  stream: StreamConfig = DEFAULT_STREAM, buffers: int = 3,
                  weights: int | None = None) -> LayerResidency | None:
    """The layer streaming placement that fits `free` bytes, or None when even streaming every
    layer does not.

    Blocks first: the most resident blocks with every step-cache layer paged (a streamed block is
    copied once per step, 4x its size per block, a paged cache layer about once: so blocks stay
    before caches do), then the most resident cache layers next to them. weights: blocks already
    placed (loaded with that residency): only the cache layers are fitted, the weights not counted.
    """
    n = cfg.num_layers
    counts = (0, 0) if weights is not None else None

    def ok(w: int, kv: int) -> bool:
        res = LayerResidency(w, kv, buffers)
        return fits(estimate_memory(cfg, width, height, steps_owned=steps_owned, dtype=dtype, fp8=fp8,
                                    decode_here=decode_here, stream=stream, param_counts=counts,
                                    residency=res), free)

    def largest(pred) -> int | None:
        return max((k for k in range(n + 1) if pred(k)), default=None)

    if weights is None:
        weights = largest(lambda w: ok(w, 0))
        if weights is None:
            return None
    elif not ok(weights, 0):
        return None
    return LayerResidency(weights, largest(lambda kv: ok(weights, kv)), buffers)


def refit_residency(cfg: DiTConfig, width: int, height: int, steps_owned: int, free: int,
                    residency: LayerResidency, *, dtype: torch.dtype = torch.bfloat16, fp8: bool = False,
                    decode_here: bool = True, stream: StreamConfig = DEFAULT_STREAM) -> tuple[LayerResidency | None, int]:
    """The re-fit after loading: `free` bytes measured with the weights of `residency` in place;
    returns (the residency with the fewest of its resident blocks moved to host streaming for
    which the caches fit, `fit_residency`; the free bytes it counts on). A demoted block releases
    its device bytes (`block_bytes` + `block_rounding_bytes`) less a new stream slot while fewer
    than `buffers` exist. (None, the free bytes with every block streamed) when nothing fits."""
    n, b = cfg.num_layers, residency.buffers
    one = block_bytes(cfg, dtype, fp8)
    released, slot = one + block_rounding_bytes(cfg, dtype, fp8), allocation_bytes(one)
    have = min(b, n - residency.weights)
    room = free
    for k in range(residency.weights + 1):
        room = free + k * released - (min(b, n - residency.weights + k) - have) * slot
        fit = fit_residency(cfg, width, height, steps_owned, room, dtype=dtype, decode_here=decode_here,
                            stream=stream, buffers=b, weights=residency.weights - k)
        if fit is not None:
            return fit, room
    return None, room


def host_cache_bytes(cfg: DiTConfig, width: int, height: int, steps_owned: int,
                     dtype: torch.dtype = torch.bfloat16, stream: StreamConfig = DEFAULT_STREAM,
                     layers: range | None = None, kv_fp8: bool = False) -> int:
    """Host (CPU) bytes of `steps_owned` offloaded step caches (of the slice `layers`) at W x H pixels."""
    from liveavatar.models.tokens import clip_tokens

    ring = clip_tokens(_latent_hw(width, height, stream), cfg.patch_size, stream)
    return steps_owned * ring * _kv_bytes_per_token(cfg, dtype, layers, kv_fp8)


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
    free, total = device_free(device)
    if not fits(est, free):
        raise memory_error(est, free, total, device, what)


@dataclass(frozen=True)
class CachePlan:
    """How one rank holds its step KV caches (decided by `plan_caches`, followed by `StepRunner`).

    offload: in host memory, paged through a device buffer; prefetch: a second device buffer so the
    next step's page-in overlaps this step's compute; sink_slot: resident caches with rows for the
    rotated sink (faster attention, +2.5 fsl tokens per cache); fp8: step and sink caches stored
    as fp8 (`CachePolicy.fp8`, passed through).
    """

    offload: bool = False
    prefetch: bool = False
    sink_slot: bool = False
    resident_kv_layers: int | None = None  # per-layer paging by the DiT's layer stream: layers kept
    fp8: bool = False


def plan_caches(cfg: DiTConfig, width: int, height: int, steps_owned: int, *, policy: "CachePolicy",
                free: int, total: int, host_available: int | None, dtype: torch.dtype = torch.bfloat16,
                stream: StreamConfig = DEFAULT_STREAM, decode_here: bool = True, device: object = "cuda",
                what: str = "this job", layers: range | None = None) -> CachePlan:
    """The one cache decision of every rank (in-process or a worker), weights already resident.

    free / total: GPU bytes now; host_available: free RAM (None: unknown). policy.offload None:
    offload only when the resident caches do not fit; policy.prefetch None: with the offload
    whenever its second buffer fits too (True: the same, asked for; False: never). The sink slot
    is taken when every resident cache fits with it. Raises MemoryError (numbers and remedies)
    when nothing fits, also when the offloaded caches do not fit the host memory. layers: the
    rank holds this DiT layer slice.
    """
    def est(**kw) -> MemoryEstimate:
        return estimate_memory(cfg, width, height, steps_owned=steps_owned, dtype=dtype, stream=stream,
                               decode_here=decode_here, param_counts=(0, 0), layers=layers, kv_fp8=policy.fp8, **kw)

    resident = est()
    if not policy.offload:
        if fits(resident, free):
            return CachePlan(sink_slot=steps_owned > 0 and fits(est(sink_slot=True), free), fp8=policy.fp8)
        if policy.offload is False or steps_owned < 2:
            raise memory_error(resident, free, total, device, what)
    offloaded = est(kv_offload=True)
    if not fits(offloaded, free):
        raise memory_error(offloaded, free, total, device, what + " (KV caches offloaded to host memory)")
    host_need = host_cache_bytes(cfg, width, height, steps_owned, dtype, stream, layers, kv_fp8=policy.fp8)
    if host_available is not None and host_need > host_available:
        raise MemoryError(f"{what}: the KV cache offload needs {host_need / GIB:.1f} GiB of host memory, "
                          f"{host_available / GIB:.1f} GiB are available. Remedies: a smaller size (384*256), fp8 "
                          "weights so the caches fit the GPU, or more GPUs in 'tpp' mode.")
    two_buffers = dataclasses.replace(offloaded, step_caches=2 * offloaded.step_caches)
    prefetch = policy.prefetch is not False and steps_owned > 1 and fits(two_buffers, free)
    return CachePlan(offload=True, prefetch=prefetch, fp8=policy.fp8)
