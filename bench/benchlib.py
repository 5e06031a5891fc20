"""Benchmark helpers shared by `python -m bench` (our DiT) and `bench/ref_harness.py` (the
reference DiT, run in its own process).

This module imports only torch and the standard library, so the reference harness can load it
by file path without importing the `liveavatar` package (the reference's package has the same
name). Everything here is model-agnostic: it works on parameter names, shapes and config numbers.

- `params_on_meta()` + `materialize_random_()`: build a model without allocating weights, then
  create every parameter directly on the target device with values drawn from a generator
  seeded by (seed, parameter name). Two models with the same parameter names and shapes (ours
  and the reference's, which share checkpoint key names) get identical weights on one device.
- `dit_block_flops()`: model FLOPs of one DiT call (see its docstring for what is counted).
- `Timer`, `median`, `matmul_peak_tflops`, `dynamo_graphs`, `peak_mem_gib`: measurement plumbing.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import zlib
from typing import Any, Iterator

import torch
from torch import nn

# ----------------------------------------------------------------------------- random weights


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Inside, every registered nn.Parameter is moved to the meta device (buffers and plain
    tensor attributes stay where they were created). Constructors that initialise weights then
    run on meta tensors, which costs nothing."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = dict(param.__dict__)
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def init_rule(name: str, shape: tuple[int, ...], dim_hint: int) -> tuple[float, float]:
    """(mean, std) of the random value of a parameter (sensible magnitudes so 40 bf16 layers
    stay finite): modulation tables N(0, 1/dim); 1-D norm weights 1 + 0.1 N; other 1-D 0.02 N;
    the audio layer weights 0.5 + 0.1 N (they are normalised by their sum); padding tokens
    0.5 N; embeddings 0.1 N; other tensors N(0, 1/fan_in)."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("modulation"):
        return 0.0, 1.0 / math.sqrt(max(1, shape[-1] or dim_hint))
    if name == "casual_audio_encoder.weights" or name.endswith("audio_encoder.weights"):
        return 0.5, 0.1
    if "padding_tokens" in name:
        return 0.0, 0.5
    if "cond_mask" in name or ("embedding" in name and len(shape) == 2 and shape[0] < 16):
        return 0.0, 0.1
    if len(shape) <= 1:
        if "norm" in name and leaf == "weight":
            return 1.0, 0.1
        return 0.0, 0.02
    fan_in = math.prod(shape[1:])
    return 0.0, 1.0 / math.sqrt(max(1, fan_in))


def _param_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


@torch.no_grad()
def random_tensor(name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                  seed: int, dim_hint: int = 1) -> torch.Tensor:
    """The value `materialize_random_` gives parameter `name` (deterministic per device type)."""
    gen = torch.Generator(device=device).manual_seed(_param_seed(seed, name))
    mean, std = init_rule(name, tuple(shape), dim_hint)
    t = torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)
    t.mul_(std)
    if mean:
        t.add_(mean)
    return t.to(dtype)


@torch.no_grad()
def materialize_random_(model: nn.Module, device: torch.device | str, dtype: torch.dtype,
                        seed: int = 0, dim_hint: int = 1, keep_fp32: tuple[str, ...] = (), prefix: str = "") -> dict:
    """Give every parameter of `model` (meta or not) a fresh random value on `device`, in place.

    Floating parameters get `dtype` (except names containing an entry of `keep_fp32`); values
    come from `random_tensor`, so they depend only on (seed, name, shape, device type). Buffers
    are moved to `device` keeping their dtype (meta buffers become zeros). prefix: `model`'s
    name inside a bigger model built part by part (the names, hence the values, are the full ones). Returns
    {"params": count, "bytes": total parameter bytes, "seconds": wall time}.
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    n = 0
    nbytes = 0
    for mod_name, module in model.named_modules(prefix=prefix):
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            want = param.dtype
            if want.is_floating_point:
                want = torch.float32 if any(k in full for k in keep_fp32) else dtype
                value = random_tensor(full, tuple(param.shape), device, want, seed, dim_hint)
            else:
                value = torch.zeros(tuple(param.shape), device=device, dtype=want)
            module._parameters[pname] = nn.Parameter(value, requires_grad=False)
            n += 1
            nbytes += value.numel() * value.element_size()
        for bname, buf in list(module._buffers.items()):
            if buf is None:
                continue
            if buf.device.type == "meta":
                module._buffers[bname] = torch.zeros(buf.shape, device=device, dtype=buf.dtype)
            else:
                module._buffers[bname] = buf.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"params": n, "bytes": nbytes, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def weights_checksum(model: nn.Module) -> dict[str, list[float]]:
    """{parameter name: [sum, sum of squares]} in float64 (to compare two models' weights)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach().double()
        out[name] = [float(t.sum()), float((t * t).sum())]
    return out


# ----------------------------------------------------------------------------- FLOPs


def sink_tokens(latent_hw: tuple[int, int], buckets: tuple[int, ...] = (1, 2, 16)) -> int:
    """Tokens of the sink: the reference frame (latent patches 2x2) plus the FramePack motion
    tokens (bucket i: `frames // 2**i` frames of `(h // (2 * 2**i)) * (w // (2 * 2**i))`
    tokens, i.e. the newest frame at patch 2, 2 frames at 4, 16 frames at 8; strided convs)."""
    h, w = latent_hw
    total = (h // 2) * (w // 2)  # reference frame
    for i, frames in enumerate(buckets):
        c = 2 ** i
        total += (frames // c) * (h // (2 * c)) * (w // (2 * c))
    return total


def dit_block_flops(cfg: Any, latent_hw: tuple[int, int], kv_tokens: int, sink_len: int,
                    frames: int = 3, text_len: int | None = None, audio_tokens_per_frame: int = 5) -> int:
    """Model FLOPs of one DiT call on one block (multiply-add = 2 FLOPs).

    Counted: per layer the self-attention q/k/v/o projections of the block tokens T, attention
    scores and weighted sum against `kv_tokens + sink_len` keys, text cross-attention q/o and
    its attention against `text_len` keys, the FFN; per audio-injected layer the q/o
    projections and the attention against the frame's audio tokens; the patch/pose embeddings
    and the head. Not counted (per-job or negligible): the text K/V projections (constant per
    prompt), the audio encoder convs, time embeddings, norms, RoPE, elementwise work.
    cfg: anything with dim, ffn_dim, num_layers, audio_inject_layers, text_len, in_dim, out_dim.
    """
    ph, pw = 2, 2
    fsl = (latent_hw[0] // ph) * (latent_hw[1] // pw)
    T = frames * fsl
    d, f = cfg.dim, cfg.ffn_dim
    L = cfg.text_len if text_len is None else text_len
    k_self = kv_tokens + sink_len
    per_layer = (8 * T * d * d            # self q, k, v, o
                 + 4 * T * k_self * d     # self QK^T + PV
                 + 4 * T * d * d          # cross q, o
                 + 4 * T * L * d          # cross QK^T + PV
                 + 4 * T * d * f)         # ffn up + down
    n_inj = len(cfg.audio_inject_layers)
    per_inject = 4 * T * d * d + 4 * T * audio_tokens_per_frame * d
    patch = cfg.in_dim * ph * pw
    embed = 2 * (2 * T * patch * d)       # patch embedding + pose (cond) encoder
    head = 2 * T * d * (cfg.out_dim * ph * pw)
    return cfg.num_layers * per_layer + n_inj * per_inject + embed + head


# ----------------------------------------------------------------------------- measurement


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


class Timer:
    """Marks on a device timeline: CUDA events on a GPU, perf_counter on the CPU.

    mark() records a point; after sync(), elapsed_ms(i, j) is the time between marks i and j.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[Any] = []

    def mark(self) -> int:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def elapsed_ms(self, i: int, j: int) -> float:
        a, b = self.marks[i], self.marks[j]
        if self.cuda:
            return float(a.elapsed_time(b))
        return (b - a) * 1000.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20, warmup: int = 3,
                       dtype: torch.dtype = torch.bfloat16) -> float:
    """Median TFLOP/s of an n x n x n matmul on random data (the MFU denominator)."""
    gen = torch.Generator(device=device).manual_seed(1234)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    sync(device)
    times = []
    for _ in range(iters):
        t = Timer(device)
        i = t.mark()
        torch.mm(a, b, out=out)
        j = t.mark()
        t.sync()
        times.append(t.elapsed_ms(i, j))
    del a, b, out
    return 2.0 * n**3 / (median(times) / 1000.0) / 1e12


def dynamo_graphs() -> int:
    """Graphs compiled so far by torch.compile in this process (torch._dynamo counters)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover
        return 0
    return int(counters["stats"]["unique_graphs"])


def compile_phases() -> dict[str, float]:
    """Seconds spent so far in each torch.compile phase of this process (dynamo's `dynamo_timed`
    totals, e.g. tracing, AOT autograd, inductor codegen or cache loads), the largest first; where
    a warm start spends its time-to-first-frame."""
    try:
        from torch._dynamo.utils import compile_times
        names, values = compile_times(repr="csv", aggregate=True)
    except Exception:  # pragma: no cover - older torch
        return {}
    phases = {}
    for name, value in zip(names, values):
        try:
            phases[name] = round(float(value), 3)
        except (TypeError, ValueError):
            continue
    return dict(sorted(phases.items(), key=lambda kv: -kv[1])[:12])


def reset_peak_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem_gib(device: torch.device) -> float:
    """Peak allocated memory of `device` in GiB (CUDA); on the CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:  # pragma: no cover
        return float("nan")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def num_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def rounded(value: Any, digits: int = 4) -> Any:
    """Round floats (also inside lists/dicts) for the JSON line; NaN becomes None."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, digits)
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    return value


# Tiny config for CPU runs of both benchmarks: the fixture's tiny causal S2V DiT (case 1).
TINY_CONFIG = {
    "dim": 128, "ffn_dim": 256, "num_heads": 4, "num_layers": 4,
    "audio_inject_layers": [0, 2, 3],
}
TINY_SIZE = "192*128"

# The keys every bench JSON line has (tests check them).
RESULT_KEYS = (
    "device", "torch", "num_gpus", "schedule", "size", "steps", "fp8", "compile", "attn", "scope",
    "fps", "ttff_s", "block_ms", "step_ms", "peak_mem_gb", "tflops", "mfu", "compile_s", "recompiles",
)
