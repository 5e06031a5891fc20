"""What fits the chosen GPUs, decided once before loading: `size=auto` and the `auto` memory options.

`fit_job` takes the requested choices (each fixed, or None = auto), the free memory of every
GPU the job may use (bytes, e.g. `torch.cuda.mem_get_info` per device) and the DiT config, and
returns a `Fit`: the output size and the resolved options (fp8 weights, fp8 KV caches, KV
offload, resident DiT layers, the layout), with the per-rank estimates and a one-line reason.
When nothing fits it raises `NoFitError` (a MemoryError) with the estimate, the free memory and
the cheapest options that would fit. Every estimate is `memory.estimate_memory`; the fit rule is
`memory.fits`. The callers (CLI, nodes) pass the result down resolved; nothing below decides again.

Search order:
- sizes: `size=auto` tries the reference's size list (`StreamConfig.sizes`), largest area first,
  each resolved for the reference image (mode area: the image's aspect ratio; the same rule as
  `sizes.resolve_size`); the first size for which some allowed combination fits wins; with
  streamed DiT blocks allowed (`resident_layers="auto"`), the sizes are first tried with every
  block resident, and streamed blocks only when no size fits so (an asked size may stream);
- options at one size: the combinations of the auto options, cheapest first by `OPTION_COSTS`
  (fp8 weights are faster on the GPUs that support them, where alone they can be auto; KV
  offload costs host-device copies; fp8 KV a small quality loss; streamed layers a copy per step);
- layout over G GPUs: `tpp_layout` (min(steps, G) DiT ranks owning contiguous step groups, a
  separate decode rank when a GPU is left): the layout with the least memory per rank.
  `parallel.schedule.auto_schedule` still picks the fastest layout among those that fit.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from liveavatar.config import DEFAULT_STREAM, DiTConfig, StreamConfig
from liveavatar.models.layer_stream import LayerResidency
from liveavatar.pipeline.memory import (GIB, MemoryEstimate, block_bytes, dit_param_counts, estimate_memory, fits,
                                        host_cache_bytes)

log = logging.getLogger("liveavatar")

# Relative cost of each auto option when it is turned on (lower is tried first). Streaming: per
# quarter of the layers not resident (a copy of those layers for every step).
OPTION_COSTS = {"weights_fp8": 1, "kv_offload": 2, "kv_fp8": 3, "streaming_quarter": 4}
STREAMING_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.125)  # resident-layer fractions tried by resident_layers="auto"

STREAM_BUFFERS = 3  # device slots of the layer stream (models/layer_stream.py) in every streamed estimate


class NoFitError(MemoryError):
    """Nothing fits: the message has the estimate, the free memory and the cheapest fitting options."""


@dataclass(frozen=True)
class RankShare:
    """One rank of a layout: how many denoising steps it owns, whether it decodes."""

    steps: int
    decodes: bool


def tpp_layout(num_gpus: int, steps: int) -> tuple[RankShare, ...]:
    """The layout with the least memory per rank on `num_gpus` GPUs: min(steps, G) DiT ranks with
    contiguous step groups (earlier ranks take the extra steps), decode on its own rank when a
    GPU is left over, else on the last DiT rank (as `parallel.schedule`)."""
    k = max(1, min(steps, num_gpus))
    counts = [steps // k + (1 if i < steps % k else 0) for i in range(k)]
    separate = num_gpus > k
    ranks = [RankShare(c, decodes=not separate and i == k - 1) for i, c in enumerate(counts)]
    return tuple(ranks + ([RankShare(0, True)] if separate else []))


@dataclass(frozen=True)
class Options:
    """Memory options of a job (all resolved): fp8 linear weights, fp8 KV caches, KV caches in host
    memory, DiT layers resident on the GPU (None: all of them)."""

    weights_fp8: bool = False
    kv_fp8: bool = False
    kv_offload: bool = False
    resident_layers: int | None = None

    def flags(self, num_layers: int) -> str:
        """The CLI flags of these options (for messages)."""
        out = ["--fp8" if self.weights_fp8 else "", "--kv-dtype fp8" if self.kv_fp8 else "",
               "--kv-offload on" if self.kv_offload else ""]
        if self.resident_layers is not None and self.resident_layers < num_layers:
            out.append(f"--weights stream ({self.resident_layers} of {num_layers} layers resident)")
        return " ".join(o for o in out if o) or "no memory options"


@dataclass(frozen=True)
class Fit:
    """The decision: output size (W, H pixels; `size_key`: the list entry it came from, None when
    the size was given), options, layout, per-rank estimates and free bytes, and why."""

    width: int
    height: int
    size_key: str | None
    options: Options
    layout: tuple[RankShare, ...]
    estimates: tuple[MemoryEstimate, ...]
    free: tuple[int, ...]
    reason: str = field(default="", compare=False)


def size_candidates(image_wh: tuple[int, int] | None, mode: str = "area",
                    stream: StreamConfig = DEFAULT_STREAM) -> list[tuple[str, int, int]]:
    """(key, W, H) of the reference's sizes, largest area first, each resolved for an image of
    `image_wh` in `mode` (area: aspect kept, `sizes.area_fit`; exact or no image: the key itself);
    sizes that resolve to the same W x H are listed once."""
    from liveavatar.sizes import area_fit

    out, seen = [], set()
    for key in stream.sizes:
        w, h = (int(v) for v in key.split("*"))
        if mode == "area" and image_wh is not None:
            w, h = area_fit(int(image_wh[0]), int(image_wh[1]), w * h, stream.size_multiple)
        if (w, h) not in seen:
            seen.add((w, h))
            out.append((key, w, h))
    return sorted(out, key=lambda kwh: -kwh[1] * kwh[2])


def _resident_choices(cfg: DiTConfig, resident_layers: int | str | None) -> list[int | None]:
    if resident_layers is None or resident_layers == cfg.num_layers:
        return [None]
    if resident_layers == "auto":
        return [None] + sorted({max(1, int(cfg.num_layers * f)) for f in STREAMING_FRACTIONS[1:]}, reverse=True)
    if not 0 < int(resident_layers) <= cfg.num_layers:
        raise ValueError(f"resident_layers: {resident_layers} is not in 1..{cfg.num_layers} (or auto)")
    return [int(resident_layers)]


def _cost(opt: Options, cfg: DiTConfig) -> float:
    c = OPTION_COSTS
    cost = c["weights_fp8"] * opt.weights_fp8 + c["kv_offload"] * opt.kv_offload + c["kv_fp8"] * opt.kv_fp8
    if opt.resident_layers is not None:
        cost += c["streaming_quarter"] * 4 * (1 - opt.resident_layers / cfg.num_layers)
    return cost


def option_combinations(cfg: DiTConfig, *, weights_fp8: bool | None, kv_fp8: bool | None,
                        kv_offload: bool | None, resident_layers: int | str | None) -> list[Options]:
    """Every combination the requested choices allow (None = both ways), cheapest first."""
    both = (False, True)
    combos = [Options(w, k, o, r) for w, k, o, r in itertools.product(
        both if weights_fp8 is None else (weights_fp8,), both if kv_fp8 is None else (kv_fp8,),
        both if kv_offload is None else (kv_offload,), _resident_choices(cfg, resident_layers))]
    return sorted(combos, key=lambda o: _cost(o, cfg))


def rank_estimates(cfg: DiTConfig, width: int, height: int, opt: Options, layout: Sequence[RankShare], *,
                   dtype: torch.dtype = torch.bfloat16, stream: StreamConfig = DEFAULT_STREAM,
                   param_counts: tuple[int, int] | None = None) -> tuple[MemoryEstimate, ...]:
    """`estimate_memory` of every rank of `layout` with options `opt` (a decode-only rank: the VAE)."""
    extra = {}
    if opt.resident_layers is not None and opt.resident_layers < cfg.num_layers:
        # streamed blocks, every KV layer paged (the least memory; the job keeps more KV layers
        # resident when they fit: pipeline.job.plan_rank_caches)
        extra["residency"] = LayerResidency(opt.resident_layers, 0, STREAM_BUFFERS)
    return tuple(estimate_memory(cfg, width, height, steps_owned=r.steps, dtype=dtype, fp8=opt.weights_fp8,
                                 decode_here=r.decodes, stream=stream, param_counts=param_counts,
                                 kv_offload=opt.kv_offload and r.steps > 1, kv_fp8=opt.kv_fp8, **extra)
                 for r in layout)


def _host_ok(cfg, width, height, opt: Options, layout, host_free, dtype, stream) -> bool:
    """Host RAM for what the options keep there: offloaded step caches, or, when blocks are
    streamed (every KV layer paged, as `rank_estimates` counts), every step cache and the
    streamed blocks (pinned)."""
    streamed = opt.resident_layers is not None and opt.resident_layers < cfg.num_layers
    if host_free is None or not (opt.kv_offload or streamed):
        return True
    need = sum(host_cache_bytes(cfg, width, height, r.steps, dtype, stream, kv_fp8=opt.kv_fp8)
               for r in layout if r.steps > (0 if streamed else 1))
    if streamed:
        need += (cfg.num_layers - opt.resident_layers) * block_bytes(cfg, dtype, opt.weights_fp8) * sum(
            1 for r in layout if r.steps)
    return need <= host_free


def fit_job(cfg: DiTConfig, free: Sequence[int], *, size: tuple[int, int] | None = None,
            image_wh: tuple[int, int] | None = None, size_mode: str = "area", steps: int = 4,
            weights_fp8: bool | None = False, kv_fp8: bool | None = False,
            kv_offload: bool | None = None, resident_layers: int | str | None = None,
            host_free: int | None = None, dtype: torch.dtype = torch.bfloat16,
            stream: StreamConfig = DEFAULT_STREAM, devices: Sequence[str] | None = None,
            fp8_possible: bool = True, weights_loaded: bool = False, beside_dit: int = 0) -> Fit:
    """The size and memory options of a job on GPUs with `free` bytes each (one entry per GPU).

    size: (W, H) already resolved, or None for `size=auto` (the reference's list for `image_wh`
    in `size_mode`). weights_fp8 / kv_fp8 / kv_offload: True / False, or None (auto; fp8 weights
    only where the GPUs run fp8 GEMMs, `fp8_weights_choice`).
    resident_layers: DiT layers kept on the GPU (None: all; a count; "auto"). host_free: RAM for
    offloaded caches (None: unknown). devices: names for messages. fp8_possible: the GPUs run fp8
    GEMMs (`fp8_capable`), so the NoFitError may suggest fp8 weights. weights_loaded: the DiT is
    already on the GPUs (`free` is what is left besides it): its weights are not counted.
    beside_dit: device bytes every DiT rank holds beside the DiT for the whole job (the wav2vec2
    encoder, `AudioFeatureExtractor.device_bytes`), taken off those GPUs' free memory. Raises NoFitError.
    """
    if not free:
        raise ValueError("free: no GPU given")
    names = list(devices) if devices is not None else [f"GPU {i}" for i in range(len(free))]
    layout = tpp_layout(len(free), steps)
    if beside_dit:  # the audio encoder on each DiT rank's GPU
        dit_gpu = [i < len(layout) and layout[i].steps > 0 for i in range(len(free))]
        free = [f - beside_dit if d else f for f, d in zip(free, dit_gpu)]
        names = [f"{n} (less {beside_dit / GIB:.2f} GiB for the audio encoder)" if d else n
                 for n, d in zip(names, dit_gpu)]
    counts = (0, 0) if weights_loaded else dit_param_counts(cfg)
    sizes = [(None, *size)] if size is not None else size_candidates(image_wh, size_mode, stream)
    combos = option_combinations(cfg, weights_fp8=weights_fp8, kv_fp8=kv_fp8, kv_offload=kv_offload,
                                 resident_layers=resident_layers)

    def try_fit(width: int, height: int, candidates: Sequence[Options]) -> tuple[Options, tuple] | None:
        for opt in candidates:
            est = rank_estimates(cfg, width, height, opt, layout, dtype=dtype, stream=stream, param_counts=counts)
            if all(fits(e, f) for e, f in zip(est, free)) and _host_ok(cfg, width, height, opt, layout,
                                                                         host_free, dtype, stream):
                return opt, est
        return None

    # size=auto: every DiT block resident when some size fits that way (streamed blocks cost a copy
    # per step: a 24 GB card would get 1024x704 at a few FPS); streaming for an asked size, or
    # when no size fits resident
    passes = [combos]
    if size is None and any(o.resident_layers is not None for o in combos):
        passes = [[o for o in combos if o.resident_layers is None], combos]
    for key, w, h, candidates in ((k, w, h, c) for c in passes for k, w, h in sizes):
        got = try_fit(w, h, candidates)
        if got is not None:
            opt, est = got
            worst = max(range(len(est)), key=lambda i: est[i].total / max(free[i], 1))
            why = ("size auto: the largest of the reference's sizes that fits" if size is None
                   else f"size {w}x{h} as asked")
            reason = (f"{why}: {w}x{h} with {opt.flags(cfg.num_layers)} on {len(free)} GPU(s) "
                      f"({_layout_text(layout)}); tightest rank {names[worst]} needs "
                      f"{est[worst].total / GIB:.1f} GiB of {free[worst] / GIB:.1f} GiB free "
                      f"({est[worst].table()})")
            log.info("%s", reason)
            return Fit(w, h, key, opt, layout, est, tuple(int(f) for f in free), reason)
    raise NoFitError(_no_fit_message(cfg, free, names, layout, sizes, combos, counts, size is None,
                                     fp8_possible, host_free, dtype, stream))


def _layout_text(layout: Sequence[RankShare]) -> str:
    if len(layout) == 1:
        return "one rank"
    dit = [r for r in layout if r.steps]
    return (f"tpp: {len(dit)} DiT rank(s) owning {'/'.join(str(r.steps) for r in dit)} steps"
            + (" + a decode rank" if len(layout) > len(dit) else ""))


def _no_fit_message(cfg, free, names, layout, sizes, combos, counts, auto_size, fp8_allowed, host_free,
                    dtype, stream) -> str:
    """The estimate (the cheapest allowed combination at the smallest size tried), the free memory,
    and the cheapest options of any kind that would fit (at the asked size, else the smallest)."""
    _, w, h = sizes[-1]
    est = rank_estimates(cfg, w, h, combos[-1], layout, dtype=dtype, stream=stream, param_counts=counts)
    worst = max(range(len(est)), key=lambda i: est[i].total - free[i])
    every = option_combinations(cfg, weights_fp8=None if fp8_allowed else False, kv_fp8=None, kv_offload=None,
                                resident_layers="auto")
    hint = "nothing: free GPU memory, or use more GPUs"
    for key, sw, sh in [(sizes[0][0], sizes[0][1], sizes[0][2])] + sorted(
            size_candidates(None, "exact", stream), key=lambda kwh: kwh[1] * kwh[2]):
        for opt in every:
            e = rank_estimates(cfg, sw, sh, opt, layout, dtype=dtype, stream=stream, param_counts=counts)
            if all(fits(x, f) for x, f in zip(e, free)) and _host_ok(cfg, sw, sh, opt, layout, host_free,
                                                                        dtype, stream):
                hint = f"{opt.flags(cfg.num_layers)} at {sw}*{sh} (about {max(x.total for x in e) / GIB:.1f} GiB per GPU)"
                break
        else:
            continue
        break
    what = "no size of the reference's list fits" if auto_size else f"{w}x{h} does not fit"
    return (f"{what} with the options allowed: {w}x{h} with {combos[-1].flags(cfg.num_layers)} needs about "
            f"{est[worst].total / GIB:.1f} GiB on {names[worst]} ({est[worst].table()}), which has "
            f"{free[worst] / GIB:.1f} GiB free ({len(free)} GPU(s), {_layout_text(layout)}). "
            f"Cheapest options that would fit: {hint}.")


def fp8_capable(devices: Sequence[str]) -> bool:
    """Every device runs fp8 GEMMs (CUDA sm 8.9+: Ada, Hopper, Blackwell)."""
    return all(str(d).startswith("cuda") and torch.cuda.is_available()
               and torch.cuda.get_device_capability(torch.device(d)) >= (8, 9) for d in devices)


def fp8_weights_choice(requested: str, devices: Sequence[str]) -> bool | None:
    """The fp8-weights choice "auto" / "on" / "off" -> None / True / False; auto is False where a
    device cannot run fp8 GEMMs (`fp8_capable`)."""
    from liveavatar.options import auto_on_off

    choice = auto_on_off(requested)
    return False if choice is None and not fp8_capable(devices) else choice


def measure_free(devices: Sequence[str]) -> tuple[list[int], int | None]:
    """(free bytes of every device, free host RAM or None): `memory.device_free` per GPU; a CPU
    device counts the host's available memory."""
    from liveavatar.pipeline.memory import available_host_bytes, device_free

    host = available_host_bytes()
    free = []
    for d in devices:
        dev = torch.device(d)
        free.append(device_free(dev)[0] if dev.type == "cuda" else int(host or 0))
    return free, host


__all__ = ["fp8_capable", "fp8_weights_choice", "measure_free","Fit", "NoFitError", "Options", "RankShare", "fit_job", "option_combinations", "rank_estimates",
           "size_candidates", "tpp_layout", "OPTION_COSTS"]
