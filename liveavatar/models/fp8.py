"""fp8 (e4m3) linear layers for the DiT: `torch._scaled_mm`, bf16 output, two scalings.

`scaling="tensor"`: the reference's scheme (spec §5):
- weight: quantised ONCE at conversion, one symmetric scale for the whole tensor
  (`s_w = min(448 / amax(|W|), 448)`, `W_q = clamp(W * s_w, ±448) -> float8_e4m3fn`); the bf16
  weight is freed, so every converted layer holds 1 byte per weight element.
- activation: quantised on every call with a fresh per-tensor scale computed the same way from
  the flattened input `[M, in_features]`.
- matmul: `torch._scaled_mm(x_q, W_q^T, scale_a=1/s_x, scale_b=1/s_w, bias, out_dtype=bf16,
  use_fast_accum=True)`; the result is cast back to the input dtype.

`scaling="row"` (opt-in; default is `DEFAULT_SCALING` = "tensor"): one scale per weight output channel
(`[1, out]`, quantised once) and one per activation row (token, `[M, 1]`, every call). Same
formula per row. Row-wise needs no global amax pass over the activation before the cast (one
read instead of two, fused into the producer by inductor), and its error is never larger than
per-tensor's (an outlier token only coarsens its own row). `_scaled_mm` runs CUTLASS's row-wise
kernel on Hopper. Alone, quantise + GEMM is 3-20 % faster at the DiT's shapes, but inside the
compiled DiT (where inductor already fuses the amax pass) the block was not faster on an H100
(16.29 vs 16.35 FPS), and PSNR vs bf16 was 48.9 vs 48.6 dB: bench/README.md.

Which layers: every `nn.Linear` whose qualified name contains none of `REFERENCE_EXCLUDE`
(the text/time embeddings, the time projection, the output head and the audio encoder's final
linear stay in bf16), and whose in/out features are multiples of 16 (a `_scaled_mm` constraint;
other layers stay bf16 and are listed in the returned summary).

Hardware: `_scaled_mm` on fp8 needs an sm89+ GPU (Ada, Hopper, Blackwell). On the CPU the
conversion is refused unless `allow_cpu=True` (tests): then PyTorch's CPU `_scaled_mm` is used
when it exists, else an emulation that dequantises to float32 (same quantisation math).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

log = logging.getLogger("liveavatar")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
AMAX_FLOOR = 1e-12
REFERENCE_EXCLUDE: tuple[str, ...] = (
    "text_embedding", "time_embedding", "time_projection", "head.head",
    "casual_audio_encoder.encoder.final_linear",
)
MIN_CAPABILITY = (8, 9)
SCALINGS = ("row", "tensor")
DEFAULT_SCALING = "tensor"  # the reference's; "row" measured no faster in the DiT (bench/README.md)


class FP8Unsupported(RuntimeError):
    """fp8 linears cannot run here (CPU, pre-sm89 GPU, or a PyTorch without `_scaled_mm`)."""


# ----------------------------------------------------------------------------- quantisation math
def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor e4m3 quantisation.

    x: any shape, any float dtype. Returns (x_q with x's shape in float8_e4m3fn, inv_scale: a
    0-d float32 tensor on x's device) with `x ≈ x_q.float() * inv_scale`. The scale is
    `448 / max(amax, 1e-12)`, capped at 448, so an all-zero tensor quantises to zeros.
    """
    amax = torch.linalg.vector_norm(x.detach(), ord=float("inf"), dtype=torch.float32)
    scale = (FP8_MAX / amax.clamp(min=AMAX_FLOOR)).clamp(max=FP8_MAX)
    q = (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.reciprocal()


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric e4m3 quantisation with one scale per row (last dim reduced).

    x `[..., K]` -> (x_q `[..., K]` float8_e4m3fn, inv_scale `[..., 1]` float32), same scale rule
    as `quantize_per_tensor` applied to each row.
    """
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = (FP8_MAX / amax.clamp(min=AMAX_FLOOR)).clamp(max=FP8_MAX)
    q = (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.reciprocal()


def quantize(x: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_row` (scaling "row") or `quantize_per_tensor` ("tensor")."""
    return quantize_per_row(x) if scaling == "row" else quantize_per_tensor(x)


def dequantize(q: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """float32 values represented by (q, inv_scale)."""
    return q.float() * inv_scale


_compiled_quantizers: dict[str, Callable] = {}
_compile_failed = False


def _activation_quantizer(x: torch.Tensor, scaling: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """The per-call quantiser: a torch.compile'd (fused, dynamic-shape) version on CUDA, as the
    reference does; plain PyTorch while tracing an outer compile, on CPU, or if compile failed."""
    global _compile_failed
    if x.device.type != "cuda" or _compile_failed or torch.compiler.is_compiling():
        return quantize(x, scaling)
    fn = _compiled_quantizers.get(scaling)
    if fn is None:
        fn = _compiled_quantizers[scaling] = torch.compile(
            quantize_per_row if scaling == "row" else quantize_per_tensor, dynamic=True)
    try:
        return fn(x)
    except Exception as exc:  # pragma: no cover - GPU only
        _compile_failed = True
        log.warning("fp8: compiling the activation quantiser failed (%s); using eager ops", exc)
        return quantize(x, scaling)


def emulated_scaled_mm(a_q: torch.Tensor, b_q_t: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """What `_scaled_mm` computes, in float32: (a_q * inv_a) @ (b_q_t * inv_b) + bias.
    a_q [M, K], b_q_t [K, N] (fp8) -> [M, N] in out_dtype."""
    out = dequantize(a_q, inv_a) @ dequantize(b_q_t, inv_b)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def scaled_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_inv_scale: torch.Tensor,
                  bias: torch.Tensor | None, emulate: bool = False,
                  quantizer: Callable[[torch.Tensor, str], tuple[torch.Tensor, torch.Tensor]] = quantize
                  ) -> torch.Tensor:
    """The fp8 linear: x `[..., in]` -> `[..., out]` in x's dtype (bf16 product).

    weight_fp8 `[out, in]` float8_e4m3fn; weight_inv_scale 0-d (per-tensor scaling) or `[1, out]`
    (row-wise: activations then get one scale per row); bias `[out]` or None. The activation is
    quantised by `quantizer` (`FP8Linear` passes the compiled one; the compiled DiT regions,
    models/compiled.py, trace this with the plain `quantize`), then `torch._scaled_mm` (or its
    float32 emulation) multiplies. FP8Linear.forward and the compiled regions share this function.
    """
    lead = x.shape[:-1]
    x_q, x_inv = quantizer(x.reshape(-1, x.shape[-1]), "row" if weight_inv_scale.dim() == 2 else "tensor")
    w_t = weight_fp8.t()  # [in, out], column-major as _scaled_mm wants
    if emulate:
        out = emulated_scaled_mm(x_q, w_t, x_inv, weight_inv_scale, bias, torch.bfloat16)
    else:
        out = torch._scaled_mm(x_q, w_t, scale_a=x_inv, scale_b=weight_inv_scale, bias=bias,
                               out_dtype=torch.bfloat16, use_fast_accum=True)
        if isinstance(out, tuple):  # very old PyTorch returned (out, amax)
            out = out[0]
    return out.reshape(*lead, out.shape[-1]).to(x.dtype)


# ----------------------------------------------------------------------------- the layer
class FP8Linear(nn.Module):
    """Drop-in replacement for an `nn.Linear` holding an e4m3 weight and its scale(s).

    Buffers: `weight_fp8` [out, in] float8_e4m3fn, `weight_inv_scale` float32: 0-d (scaling
    "tensor") or `[1, out]` (scaling "row"; activations then get one scale per row). Parameter:
    `bias` [out] (bf16) or None. `weight` is a meta tensor that only records the original shape
    and dtype (the bf16 values are gone). forward: x [..., in] -> [..., out] in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, weight_fp8: torch.Tensor,
                 weight_inv_scale: torch.Tensor, bias: torch.Tensor | None,
                 orig_dtype: torch.dtype = torch.bfloat16, emulate: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_fp8", weight_fp8)
        rowwise = weight_inv_scale.numel() > 1 or weight_inv_scale.dim() == 2
        self.scaling = "row" if rowwise else "tensor"
        self.register_buffer("weight_inv_scale", weight_inv_scale.reshape((1, out_features) if rowwise else ()).float())
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        else:
            self.bias = None
        self.weight = torch.empty((out_features, in_features), device="meta", dtype=orig_dtype)
        self.emulate = emulate

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, emulate: bool = False, scaling: str = "tensor") -> "FP8Linear":
        """scaling "tensor": one weight scale; "row": one per output channel (`[1, out]`)."""
        if scaling not in SCALINGS:
            raise ValueError(f"fp8 scaling: {scaling!r} is not one of {SCALINGS}")
        w = linear.weight
        q, inv = quantize(w, scaling)  # row: [out, 1] scales -> stored as [1, out]
        if scaling == "row":
            inv = inv.reshape(1, -1)
        return cls(linear.in_features, linear.out_features, q.contiguous(), inv, linear.bias,
                   orig_dtype=w.dtype, emulate=emulate)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, e4m3 per-{self.scaling}{', emulated' if self.emulate else ''}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():  # one dense layout for the (compiled, dynamic-shape) quantiser
            x = x.contiguous()
        return scaled_linear(x, self.weight_fp8, self.weight_inv_scale, self.bias, self.emulate,
                             _activation_quantizer)


# ----------------------------------------------------------------------------- conversion
def _linear_device(model: nn.Module) -> torch.device | None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return m.weight.device
    return None


def check_fp8_support(device: torch.device) -> None:
    """Raise FP8Unsupported naming the cause when fp8 `_scaled_mm` cannot run on `device`."""
    if not hasattr(torch, "_scaled_mm"):
        raise FP8Unsupported(f"fp8: this PyTorch ({torch.__version__}) has no torch._scaled_mm; "
                             "upgrade PyTorch or run without --fp8")
    if device.type != "cuda":
        raise FP8Unsupported(f"fp8: the DiT is on '{device}'; fp8 linears need a CUDA GPU with compute "
                             "capability 8.9 or newer (Ada, Hopper); run without --fp8 on this device")
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise FP8Unsupported(f"fp8: {name} is sm{cap[0]}{cap[1]}; fp8 matmuls need sm89+ (Ada, Hopper); "
                             "run without --fp8 (bf16) on this GPU")


def _cpu_scaled_mm_works(scaling: str = "tensor") -> bool:
    try:
        a = torch.ones(16, 16).to(FP8_DTYPE)
        one = torch.tensor(1.0)
        sa, sb = (torch.ones(16, 1), torch.ones(1, 16)) if scaling == "row" else (one, one)
        torch._scaled_mm(a, a.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        return True
    except Exception:
        return False


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(e in name for e in exclude)


def fp8_verdict(name: str, linear: nn.Module, exclude: Iterable[str] = REFERENCE_EXCLUDE) -> str:
    """What `convert_to_fp8` does with Linear `name`: "convert", "excluded" (name matches
    `exclude`) or "skipped" (in/out features not multiples of 16)."""
    if _excluded(name, tuple(exclude)):
        return "excluded"
    if linear.in_features % 16 or linear.out_features % 16:
        return "skipped"
    return "convert"


def fp8_linears(model: nn.Module, exclude: Iterable[str] = REFERENCE_EXCLUDE) -> list[str]:
    """Qualified names of the `nn.Linear` layers `convert_to_fp8` converts (verdict "convert"),
    in module order. Works on a meta-device model (no weight is read)."""
    exclude = tuple(exclude)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and fp8_verdict(name, m, exclude) == "convert"]


def fp8_weight_numel(model: nn.Module, exclude: Iterable[str] = REFERENCE_EXCLUDE) -> tuple[int, int]:
    """(elements of every parameter, elements of the weights `convert_to_fp8` turns into fp8) of
    an unconverted `model` (a meta-device build costs no memory): the weight bytes are
    `(total - fp8) * element size + fp8 * 1`."""
    modules = dict(model.named_modules())
    total = sum(p.numel() for p in model.parameters())
    return total, sum(modules[name].weight.numel() for name in fp8_linears(model, exclude))


def fp8_emulation_needed(device: torch.device, scaling: str, allow_cpu: bool = False) -> bool:
    """Whether fp8 linears on `device` must use the float32 emulation (CPU builds without
    `_scaled_mm`, tests); raises FP8Unsupported where fp8 cannot run at all."""
    if device.type == "cpu" and allow_cpu:
        return not _cpu_scaled_mm_works(scaling)
    check_fp8_support(device)
    return False


@torch.no_grad()
def convert_to_fp8(model: nn.Module, exclude: Iterable[str] = REFERENCE_EXCLUDE, *,
                   allow_cpu: bool = False, emulate: bool | None = None, scaling: str = DEFAULT_SCALING,
                   prefix: str = "") -> dict:
    """Replace the model's eligible `nn.Linear` layers by `FP8Linear`, in place.

    exclude: substrings of qualified module names to keep in bf16 (default: the reference's list).
    allow_cpu: permit a CPU model (numerics tests); otherwise CPU / pre-sm89 raise FP8Unsupported.
    emulate: force (True) or forbid (False) the float32 emulation; None = only where the real
        `_scaled_mm` is unavailable (CPU builds without it).
    scaling: "tensor" (the reference's, default) or "row" (per output channel / per token).
    prefix: the qualified name of `model` inside the DiT, when converting one part at a time (a
        layer as it is loaded): `exclude` is matched against the full names.
    Returns {"converted": int, "excluded": [names], "skipped": [names] (dims not multiples of
    16), "bytes_before": int, "bytes_after": int} (weight bytes of the touched layers).
    """
    exclude = tuple(exclude)
    if scaling not in SCALINGS:
        raise ValueError(f"fp8 scaling: {scaling!r} is not one of {SCALINGS}")
    device = _linear_device(model)
    if device is None:
        return {"converted": 0, "excluded": [], "skipped": [], "bytes_before": 0, "bytes_after": 0}
    if device.type == "meta":
        raise FP8Unsupported("fp8: the model's weights are on the meta device; load or materialise them first")
    needed = fp8_emulation_needed(device, scaling, allow_cpu)
    use_emulation = needed if emulate is None else bool(emulate)
    summary = {"converted": 0, "excluded": [], "skipped": [], "bytes_before": 0, "bytes_after": 0}
    targets: list[tuple[nn.Module, str, str, nn.Linear]] = []
    for name, module in model.named_modules(prefix=prefix):
        for child_name, child in module.named_children():
            if not isinstance(child, nn.Linear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            verdict = fp8_verdict(full, child, exclude)
            if verdict == "convert":
                targets.append((module, child_name, full, child))
            else:
                summary[verdict].append(full)
    targets.reverse()
    while targets:  # pop as we go so each bf16 weight is freed right after its conversion
        parent, child_name, full, lin = targets.pop()
        summary["bytes_before"] += lin.weight.numel() * lin.weight.element_size()
        new = FP8Linear.from_linear(lin, emulate=use_emulation, scaling=scaling)
        summary["bytes_after"] += new.weight_fp8.numel()
        setattr(parent, child_name, new)
        del lin, new
        summary["converted"] += 1
    if device.type == "cuda":
        torch.cuda.empty_cache()
    summary["scaling"] = scaling
    (log.debug if prefix else log.info)("fp8 (%s scales): %d linears converted (%.1f -> %.1f GiB), %d excluded, %d skipped (dims)",
             scaling, summary["converted"], summary["bytes_before"] / 2**30, summary["bytes_after"] / 2**30,
             len(summary["excluded"]), len(summary["skipped"]))
    return summary


__all__ = ["FP8Linear", "FP8Unsupported", "REFERENCE_EXCLUDE", "FP8_MAX", "convert_to_fp8", "check_fp8_support",
           "fp8_verdict", "fp8_linears", "fp8_weight_numel", "fp8_emulation_needed",
           "quantize_per_tensor", "quantize_per_row", "quantize", "SCALINGS", "DEFAULT_SCALING", "dequantize",
           "emulated_scaled_mm", "scaled_linear"]
