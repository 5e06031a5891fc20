"""Fused layer regions of the causal S2V DiT for streaming calls (`CausalS2VDiT.compile_blocks()`).

Eager PyTorch runs each layer as dozens of small elementwise kernels (float32 modulation, gates
and residuals, LayerNorms, RMS norms, RoPE, bf16 <-> fp32 casts, the fp8 activation quantiser).
Here a streaming layer is cut into regions that are pure functions of tensors, compiled once
with torch.compile (static shapes, no graph breaks) and shared by every layer (weights are
inputs, not constants):

    pre   norm1 + time modulation + q/k/v (+ RMS q/k norms) + RoPE of q and k
          -> KV-cache write and self-attention (eager: the window grows during the first clip)
    post  o-proj + gate + float32 residual + bf16 round + norm3 + text q-proj (+ RMS norm)
          -> text cross-attention (eager, the DiT's backend switch)
    ffn   text o-proj + residual + norm2 + modulation + FFN + gate + residual
    audio (layers in `audio_inject_layers`) AdaLN + q/k/v of the audio cross-attention
          -> attention (eager) -> o-proj + residual
    rotate  the sink keys' RoPE (inside the KV-cache policy)

The arithmetic is the eager layers' own: the regions call the layer math of `dit_blocks`
(modulation, norms, gates, residuals, AdaLN), `rope.rotate` and `fp8.scaled_linear`, as
`dit_blocks.DiTBlock` / `audio_injector` do (inductor may keep fused intermediates in float32). The
sink prefill and CPU parity runs keep the eager layers. Shapes: x `[1, L, dim]` (L = F*fsl),
e0 `[1, F, 6, dim]` float32, RoPE cos/sin `[L, 1, head_dim/2]`.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from liveavatar.compile_cache import compiled_region

from .attention import attention
from .audio_injector import ADALN_EPS
from .dit_blocks import (ATTN, FFN, ada_norm, bf16_layer_norm, gated_residual, layer_modulation, modulated_norm,
                         rms_norm)
from .fp8 import FP8Linear, scaled_linear
from .rope import rotate

log = logging.getLogger("liveavatar")

LinearArgs = tuple  # ("lin", weight, bias) | ("fp8" | "fp8emu", weight_fp8, inv_scale, bias)


def linear_args(layer: nn.Module) -> LinearArgs:
    """The tensors of a Linear / FP8Linear as a tuple a compiled region can take as input."""
    if isinstance(layer, FP8Linear):
        return ("fp8emu" if layer.emulate else "fp8", layer.weight_fp8, layer.weight_inv_scale, layer.bias)
    if isinstance(layer, nn.Linear):
        return ("lin", layer.weight, layer.bias)
    raise TypeError(f"fused DiT layers: unsupported linear type {type(layer).__name__}")


def run_linear(x: torch.Tensor, w: LinearArgs) -> torch.Tensor:
    """`x [..., in] -> [..., out]` in x's dtype, as nn.Linear / FP8Linear.forward compute it (the
    fp8 product is `fp8.scaled_linear`, with the plain quantiser: this runs inside compiled regions)."""
    if w[0] == "lin":
        return F.linear(x, w[1], w[2])
    return scaled_linear(x, w[1], w[2], w[3], emulate=w[0] == "fp8emu")


def _adjacent(ts: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """`torch.cat(ts, dim)` as a view when the tensors already lie back to back in one storage
    (contiguous, consecutive; `dim` the first dim larger than 1), else None."""
    first = ts[0]
    shape = list(first.shape)
    if math.prod(shape[:dim]) != 1:
        return None
    off = first.storage_offset()
    for t in ts:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.storage_offset() != off
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1:] != first.shape[dim + 1:]):
            return None
        off += t.numel()
    shape[dim] = sum(t.shape[dim] for t in ts)
    stride = [math.prod(shape[k + 1:]) for k in range(len(shape))]
    return first.as_strided(shape, stride, first.storage_offset())


def fuse_linears(layers: list[nn.Module]) -> LinearArgs | None:
    """One LinearArgs computing `cat([layer(x) for layer in layers], -1)` in a single GEMM, or None
    when the layers cannot share one (per-tensor fp8 scales differ, mixed kinds or dtypes).

    Each layer's tensors are re-pointed at views of the fused ones, so no memory is added and
    in-place edits of a layer's weight (LoRA merges) reach the fused GEMM too. Tensors that already
    lie back to back (a block packed by the layer stream, or fused before) give views of them.
    """
    args = [linear_args(layer) for layer in layers]
    kind = args[0][0]
    if any(a[0] != kind for a in args) or len({a[1].dtype for a in args}) != 1:
        return None
    has_bias = [a[-1] is not None for a in args]
    if any(has_bias) != all(has_bias):
        return None
    if kind != "lin" and any(a[2].dim() != 2 for a in args):  # per-tensor scales: one scale per GEMM
        return None
    views = [_adjacent([a[1] for a in args], 0)]
    views += [] if kind == "lin" else [_adjacent([a[2] for a in args], 1)]
    views += [_adjacent([a[-1] for a in args], 0)] if all(has_bias) else []
    if all(v is not None for v in views):
        return (kind, *views) + (() if all(has_bias) else (None,))
    bias = torch.cat([a[-1] for a in args]) if all(has_bias) else None
    sizes = [a[1].shape[0] for a in args]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    if kind == "lin":
        weight = torch.cat([a[1] for a in args])
        for layer, lo, hi in zip(layers, bounds, bounds[1:]):
            layer.weight = nn.Parameter(weight[lo:hi], requires_grad=False)
            if bias is not None:
                layer.bias = nn.Parameter(bias[lo:hi], requires_grad=False)
        return ("lin", weight, bias)
    weight = torch.cat([a[1] for a in args])
    scale = torch.cat([a[2] for a in args], dim=1)
    for layer, lo, hi in zip(layers, bounds, bounds[1:]):
        layer.weight_fp8 = weight[lo:hi]
        layer.weight_inv_scale = scale[:, lo:hi]
        if bias is not None:
            layer.bias = nn.Parameter(bias[lo:hi], requires_grad=False)
    return (kind, weight, scale, bias)


def _norm_weight(norm: nn.Module) -> torch.Tensor | None:
    return getattr(norm, "weight", None)


class FusedLayers:
    """Compiled regions for the layers of one CausalS2VDiT (see the module docstring).

    `compile=False` runs the same region functions eagerly (CPU checks of the arithmetic).
    """

    def __init__(self, model: nn.Module, compile: bool = True):
        self._model = weakref.ref(model)  # the model holds this object: no cycle, its weights go with it
        blk = model.blocks[model.layers.start]  # the first held layer (a layer slice holds a range)
        eps, heads, head_dim = blk.eps, blk.self_attn.num_heads, blk.self_attn.head_dim
        qk_eps = getattr(blk.self_attn.norm_q, "eps", eps)
        n3 = blk.norm3
        n3_eps = getattr(n3, "eps", eps)
        inj = [m for m in model.audio_injector.injector if hasattr(m, "norm_q")]  # held injectors
        audio_qk_eps = getattr(inj[0].norm_q, "eps", eps) if inj else eps

        def pre(x, e0, modulation, wqkv, nq, nk, cos, sin):
            act = x.dtype
            mod = layer_modulation(modulation, e0)
            h = modulated_norm(x, mod, ATTN, eps).to(act)
            if isinstance(wqkv[0], str):  # one fused GEMM (fuse_linears), split into q, k, v
                q, k, v = run_linear(h, wqkv).chunk(3, dim=-1)
            else:
                q, k, v = (run_linear(h, w) for w in wqkv)
            q = rms_norm(q, nq, qk_eps).unflatten(-1, (heads, head_dim))
            k = rms_norm(k, nk, qk_eps).unflatten(-1, (heads, head_dim))
            v = v.unflatten(-1, (heads, head_dim))
            return rotate(q, cos, sin, act), rotate(k, cos, sin, act), v

        def post(x, attn, e0, modulation, wo, n3w, n3b, wcq, ncq):
            act = x.dtype
            mod = layer_modulation(modulation, e0)
            r = gated_residual(x, run_linear(attn.flatten(2), wo), mod, ATTN)  # float32 residual
            c = bf16_layer_norm(r.to(torch.bfloat16), n3w, n3b, n3_eps, upcast=True)  # the reference's rounding
            cq = rms_norm(run_linear(c.to(act), wcq), ncq, qk_eps).unflatten(-1, (heads, head_dim))
            return r, cq

        def ffn(r, cattn, e0, modulation, wco, w0, w2, act_dtype: torch.dtype):
            mod = layer_modulation(modulation, e0)
            r = r + run_linear(cattn.flatten(2), wco)
            h = modulated_norm(r, mod, FFN, eps)
            y = run_linear(F.gelu(run_linear(h.to(act_dtype), w0), approximate="tanh"), w2)
            return gated_residual(r, y, mod, FFN).to(act_dtype)

        def audio_pre(x, g, tokens, wada, wq, wk, wv, nq, nk, frames: int):
            act = x.dtype
            xf = x.reshape(frames, -1, x.shape[-1])
            h = ada_norm(xf, run_linear(F.silu(g), wada), ADALN_EPS)
            q = rms_norm(run_linear(h.to(act), wq), nq, audio_qk_eps).unflatten(-1, (heads, head_dim))
            k = rms_norm(run_linear(tokens, wk), nk, audio_qk_eps).unflatten(-1, (heads, head_dim))
            v = run_linear(tokens, wv).unflatten(-1, (heads, head_dim))
            return q, k, v

        def audio_post(x, attn, wo):
            return x + run_linear(attn.flatten(2), wo).reshape(x.shape)

        self._qkv: dict[int, tuple] = {}  # layer -> (q, k, v modules, fused LinearArgs or None)
        self._eager = {"pre": pre, "post": post, "ffn": ffn, "audio_pre": audio_pre, "audio_post": audio_post,
                       "rotate": rotate}
        self.compiled = compile
        self.error: str | None = None
        for name, fn in self._eager.items():  # compile_cache: a warm start loads the traced regions
            setattr(self, name, self._guard(name, compiled_region(fn)) if compile else fn)

    @property
    def model(self) -> nn.Module:
        return self._model()

    def _guard(self, name: str, compiled: Callable) -> Callable:
        """`compiled`, falling back to the eager regions (with a warning) if compiling fails. The
        closure holds this object weakly (it is one of its attributes: no reference cycle)."""
        me = weakref.ref(self)

        def run(*args):
            fused = me()
            if not fused.compiled:
                return fused._eager[name](*args)
            try:
                return compiled(*args)
            except Exception as exc:  # e.g. no Triton / C++ compiler: keep running, eagerly
                fused.compiled = False
                fused.error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("compile_blocks: compiling region %r failed (%s); running the fused regions eagerly",
                            name, fused.error)
                return fused._eager[name](*args)

        return run

    def rotate_factors(self, x: torch.Tensor, factors, out_dtype: torch.dtype) -> torch.Tensor:
        """`rotate(x, factors, out_dtype)` in the signature the KV-cache policies use."""
        return self.rotate(x, factors.cos, factors.sin, out_dtype)

    def layer(self, blk: nn.Module, x: torch.Tensor, e0: torch.Tensor, rope, attend,
              text_kv: tuple[torch.Tensor, torch.Tensor], backend: str) -> torch.Tensor:
        """One transformer layer (= `blk(x, e0, attend, text_kv, backend)` with RoPE applied here:
        `attend(q_rot, k_rot, v)` must not rotate; `blk` a DiT block, or the layer stream's slot
        holding its weights). x `[1, L, dim]` -> `[1, L, dim]`."""
        sa, ca = blk.self_attn, blk.cross_attn
        q, k, v = self.pre(x, e0, blk.modulation, self._qkv_args(sa), _norm_weight(sa.norm_q),
                           _norm_weight(sa.norm_k), rope.cos, rope.sin)
        a = attend(q, k, v)
        n3 = blk.norm3
        r, cq = self.post(x, a, e0, blk.modulation, linear_args(sa.o), _norm_weight(n3), getattr(n3, "bias", None),
                          linear_args(ca.q), _norm_weight(ca.norm_q))
        c = attention(cq, text_kv[0], text_kv[1], backend)
        return self.ffn(r, c, e0, blk.modulation, linear_args(ca.o), linear_args(blk.ffn[0]),
                        linear_args(blk.ffn[2]), x.dtype)

    def forget(self, blocks: list[nn.Module]) -> None:
        """Drop the fused q|k|v arguments of `blocks` (their weights moved, e.g. to host memory)."""
        for blk in blocks:
            self._qkv.pop(id(blk.self_attn), None)

    def _qkv_args(self, sa: nn.Module) -> tuple:
        """q/k/v projections of a self-attention as one fused LinearArgs when they can share a
        GEMM (bf16, row-wise fp8), else the three LinearArgs. Fused once per layer; fused again
        if the projection modules were replaced (e.g. an fp8 conversion after compile_blocks)."""
        mods = (sa.q, sa.k, sa.v)
        got = self._qkv.get(id(sa))
        if got is None or any(a is not b for a, b in zip(got[0], mods)):
            got = self._qkv[id(sa)] = (mods, fuse_linears(list(mods)))
        return got[1] if got[1] is not None else tuple(linear_args(m) for m in mods)

    def inject(self, i: int, x: torch.Tensor, frames: int, audio_global: torch.Tensor,
               audio_tokens: torch.Tensor, backend: str) -> torch.Tensor:
        """`audio_injector.inject(...)`: x `[1, F*fsl, dim]`, audio_global `[F, dim]`, tokens `[F, n, dim]`."""
        injector = self.model.audio_injector
        j = injector.layer_to_index.get(i)
        if j is None:
            return x
        att, ada = injector.injector[j], injector.injector_adain_layers[j]
        q, k, v = self.audio_pre(x, audio_global, audio_tokens, linear_args(ada.linear), linear_args(att.q),
                                 linear_args(att.k), linear_args(att.v), _norm_weight(att.norm_q),
                                 _norm_weight(att.norm_k), frames)
        return self.audio_post(x, attention(q, k, v, backend), linear_args(att.o))


__all__ = ["FusedLayers", "fuse_linears", "linear_args", "run_linear"]
