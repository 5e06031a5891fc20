"""User options resolved once, at the edge (CLI, nodes, benchmarks), into typed values.

Every function here is cheap and loads nothing: the CLI and the loader node call them before any
weight is read, so a bad value fails with a message naming the option. Later layers (loading, the
pipeline, worker ranks) receive the resolved values and never decide them again.

- precision: `Precision` (weight dtype + fp8 scaling or None), from the CLI's `--dtype/--fp8/
  --fp8-scaling` or the node's `precision` string (`PRECISIONS`);
- fp8 scaling: `resolve_fp8_scaling` (the one place that knows the default scaling);
- attention backend: `resolve_attention` over `ATTENTION_BACKENDS`;
- KV cache placement and storage: `CachePolicy` (offload / prefetch: auto, on, off; fp8 storage);
- GPU lists: `parse_gpus` ("0,1" or "cuda:0,cuda:1", checked against the visible GPUs);
- numbers: `finite_float`, `lora_strength` (finite, in `LORA_STRENGTH_RANGE`), `seed` (0..`SEED_MAX`).
The output size is resolved by `liveavatar.sizes.resolve_size` into an `OutputSize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from liveavatar.models.attention import BACKENDS as ATTENTION_BACKENDS
from liveavatar.models.fp8 import DEFAULT_SCALING as DEFAULT_FP8_SCALING
from liveavatar.models.fp8 import SCALINGS as FP8_SCALINGS

AUTO_ON_OFF = ("auto", "on", "off")  # the choices of --kv-offload / --kv-prefetch
# worker-group layouts (`parallel.schedule`), the choices of --gpu-mode and of the loader's gpu_mode
GPU_MODES = ("auto", "single", "tpp", "layers")
KV_DTYPES = ("bf16", "fp8")  # storage of the KV caches (--kv-dtype, the nodes' kv_dtype); "auto": pipeline.fit
DEFAULT_KV_DTYPE = "bf16"  # fp8 KV is an option until its quality is measured negligible (bench/fp8_kv_quality.py)
SEED_MAX = 2**53 - 1  # the largest seed (exact in the browser's numbers, so the CLI and the nodes agree)
LORA_STRENGTH_RANGE = (0.0, 2.0)  # the LoRA scale a user may ask for (1.0: as distilled)
# Where the DiT's blocks live (--weights, the loader nodes' `weights`): auto (all on the GPU when
# they and the caches fit, else as many as fit, the rest streamed from pinned host memory),
# resident (all on the GPU), stream (as many as fit on the GPU with every KV layer paged).
WEIGHTS_MODES = ("auto", "resident", "stream")


def resolve_fp8_scaling(fp8: bool | str | None) -> str | None:
    """fp8 option -> the scaling name, or None when fp8 is off.

    fp8: False / None / "" / "none" (off), True (the default scaling, `DEFAULT_FP8_SCALING`), or a
    scaling name from `FP8_SCALINGS`. Raises ValueError naming `fp8` otherwise.
    """
    if fp8 is None or fp8 is False or (isinstance(fp8, str) and fp8.strip().lower() in ("", "none", "off")):
        return None
    if fp8 is True:
        return DEFAULT_FP8_SCALING
    if isinstance(fp8, str) and fp8 in FP8_SCALINGS:
        return fp8
    raise ValueError(f"fp8: {fp8!r} is not True, False or one of the scalings {FP8_SCALINGS}")


def resolve_attention(name: str) -> str:
    """The attention backend name, checked against `ATTENTION_BACKENDS` (ValueError naming `attn`)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attn: {name!r} is not an attention backend; choose one of {', '.join(ATTENTION_BACKENDS)}")
    return name


@dataclass(frozen=True)
class Precision:
    """Weights in `dtype` ("bf16", "fp16", "fp32"), with fp8 linears of `fp8` scaling (None: off)."""

    dtype: str = "bf16"
    fp8: str | None = None

    @property
    def label(self) -> str:
        return self.dtype + (f" + fp8 ({self.fp8})" if self.fp8 else "")


# The loader node's `precision` strings (fp8 = bf16 weights with fp8 linear layers).
PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bf16"),
    "fp8": Precision("bf16", DEFAULT_FP8_SCALING),
    "fp8_row": Precision("bf16", "row"),
    "fp16": Precision("fp16"),
    "fp32": Precision("fp32"),
}


def precision_from_flags(dtype: str, fp8: bool, fp8_scaling: str | None = None) -> Precision:
    """The CLI's `--dtype`, `--fp8`, `--fp8-scaling` (None: the default scaling) as a `Precision`."""
    return Precision(dtype, resolve_fp8_scaling((fp8_scaling or True) if fp8 else False))


def auto_on_off(choice: str) -> bool | None:
    """"auto" / "on" / "off" -> None / True / False."""
    try:
        return {"auto": None, "on": True, "off": False}[choice]
    except KeyError:
        raise ValueError(f"{choice!r} is not one of {', '.join(AUTO_ON_OFF)}") from None


@dataclass(frozen=True)
class CachePolicy:
    """Where the denoising steps' KV caches live (`liveavatar.pipeline.memory.plan_caches` decides
    the auto cases from the one memory estimate).

    offload: caches in host memory, one (or two, with prefetch) on the GPU at a time: True, False,
        or None (only when they do not fit the GPU).
    prefetch: with offload, page the next step's cache in while this one computes: True, False,
        or None (whenever its second buffer fits).
    fp8: keys and values stored as fp8 with a per-(token, head) scale (sink cache included):
        about half the cache bytes (`resolve_kv_dtype`; "auto" is decided by `pipeline.fit`).
    """

    offload: bool | None = None
    prefetch: bool | None = None
    fp8: bool = False

    @classmethod
    def from_choices(cls, offload: str = "auto", prefetch: str = "auto", kv_dtype: str = DEFAULT_KV_DTYPE) -> "CachePolicy":
        return cls(auto_on_off(offload), auto_on_off(prefetch), resolve_kv_dtype(kv_dtype))


def resolve_kv_dtype(name: str) -> bool:
    """KV cache storage "bf16" / "fp8" -> fp8 (True / False); ValueError naming `kv_dtype` otherwise.
    ("bf16" means the model's compute dtype; "auto" is resolved before this, by `pipeline.fit`.)"""
    if name not in KV_DTYPES:
        raise ValueError(f"kv_dtype: {name!r} is not one of {', '.join(KV_DTYPES)} (or auto, where sizes are fitted)")
    return name == "fp8"


def resolve_weights_mode(mode: str | None) -> str:
    """The `weights` option checked against `WEIGHTS_MODES` (None: "auto"); ValueError naming it."""
    mode = "auto" if mode is None else str(mode).strip().lower()
    if mode not in WEIGHTS_MODES:
        raise ValueError(f"weights: {mode!r} is not one of {', '.join(WEIGHTS_MODES)}")
    return mode


def finite_float(text: str) -> float:
    """A float that is finite (argparse type / node check): ValueError for nan, inf, garbage."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def lora_strength(value: str | float) -> float:
    """The LoRA scale: a finite number in `LORA_STRENGTH_RANGE` (ValueError naming `lora-strength`)."""
    lo, hi = LORA_STRENGTH_RANGE
    try:
        scale = finite_float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"lora-strength: {value!r} is not a finite number; give one from {lo} to {hi}, "
                         "e.g. 1.0") from exc
    if not lo <= scale <= hi:
        raise ValueError(f"lora-strength: {value!r} is outside {lo} .. {hi}; 1.0 is the strength the LoRA "
                         "was distilled for")
    return scale


def seed(value: str | int) -> int:
    """A noise seed: an integer from 0 to `SEED_MAX` (ValueError naming `seed`)."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"seed: {value!r} is not an integer; give one from 0 to {SEED_MAX}") from None
    if not 0 <= number <= SEED_MAX:
        raise ValueError(f"seed: {number} is outside 0 .. {SEED_MAX}")
    return number


def parse_gpus(text: str, cuda_count: int) -> tuple[str, ...]:
    """"0,1" / "cuda:0, cuda:1" / "cuda" -> ("cuda:0", "cuda:1"), every index checked against the
    `cuda_count` visible GPUs (CLI `--gpus`, the loader nodes' `devices`). ValueError naming `gpus`
    for an empty list, an entry that is not a GPU, a duplicate, or a GPU that does not exist (none
    at all without CUDA). A list of only "cpu" entries ("cpu,cpu") gives CPU ranks (gloo; tests and
    development), one per entry."""
    items = [p.strip().lower() for p in str(text).replace(";", ",").split(",") if p.strip()]
    if not items:
        raise ValueError("gpus: empty; list GPU indices like 0,1")
    if "cpu" in items:  # CPU ranks over gloo (tests, development): said explicitly, never a fallback
        if set(items) != {"cpu"}:
            raise ValueError(f"gpus: {text!r} mixes 'cpu' with GPUs; list GPUs only, or only cpu entries")
        return tuple(items)
    indices = []
    for item in items:  # every entry's spelling first, then whether the GPUs exist
        idx = "0" if item == "cuda" else item[5:] if item.startswith("cuda:") else item
        if not idx.isdigit():
            raise ValueError(f"gpus: {item!r} is not a device; list GPU indices like 0,1 (or cuda:0, cuda:1)")
        indices.append(int(idx))
    out = []
    for idx in indices:
        if idx >= cuda_count:
            seen = ", ".join(f"cuda:{i}" for i in range(cuda_count)) or "none (no CUDA GPU is visible)"
            raise ValueError(f"gpus: cuda:{idx} does not exist; visible GPUs: {seen}")
        out.append(f"cuda:{idx}")
    if len(set(out)) != len(out):
        raise ValueError(f"gpus: {text!r} lists a device twice")
    return tuple(out)


__all__ = [
    "ATTENTION_BACKENDS", "FP8_SCALINGS", "DEFAULT_FP8_SCALING", "AUTO_ON_OFF", "resolve_fp8_scaling",
    "resolve_attention", "Precision", "PRECISIONS", "precision_from_flags", "auto_on_off", "CachePolicy",
    "finite_float", "parse_gpus", "KV_DTYPES", "DEFAULT_KV_DTYPE", "resolve_kv_dtype",
    "SEED_MAX", "LORA_STRENGTH_RANGE", "lora_strength", "seed",
    "finite_float", "parse_gpus", "WEIGHTS_MODES", "resolve_weights_mode",
]
