"""Attention micro-benchmark at the DiT's self-attention shape: is an fp8 attention backend worth it?

Shape, in the model's layout (q/k/v [B, S, H, D], "NHD"): B=1, H=40, D=128, q_len=3168, kv_len=15312,
non-causal, no mask, scale 1/sqrt(D), bf16. Data: q, k ~ N(0, 1) * sqrt(logit_std), v ~ N(0, 1), so
a logit q.k/sqrt(D) has std logit_std (default 3: a peaked softmax, the hard case for fp8 P).
Variants (each in try/except: a failure becomes the row's "error" and later rows still run):
  cudnn_bf16  SDPA limited to cuDNN attention (the model's default: speed and accuracy baseline)
  flash_bf16  SDPA limited to FlashAttention
  cudnn_fp8   cuDNN fp8 (e4m3) attention via the cuDNN frontend graph API (pygraph.sdpa_fp8)
  sage        sageattention.sageattn(..., tensor_layout="NHD") (int8 QK, fp16 PV; Triton)
Run (GPU):  pip install --no-deps --target /tmp/site nvidia_cudnn_frontend-1.32.0-cp312-*.whl \\
                sageattention-1.0.6-py3-none-any.whl
            PYTHONPATH=/tmp/site python bench/attn_fp8_micro.py [--variants cudnn_bf16,cudnn_fp8]
Prints a header JSON line, one JSON line per variant as it finishes, then a markdown table.
ms: median GPU time of one call (CUDA events around each of --iters calls queued back to back);
tflops = 4*B*H*q_len*kv_len*D / ms. cudnn_fp8: ms = graph execution on pre-quantized inputs, quant_ms =
amax + cast of q, k, v (quant_q_ms: q alone, the cost if the KV cache were kept in fp8), total_ms = the
whole bf16-in/bf16-out call. host_ms: CPU time per call (> ms: launch-bound). rel_l2 / max_abs: bf16
output vs an fp32 reference (query chunks of --chunk rows, TF32 off); rel_l2_vs_cudnn: vs cudnn_bf16.
A watchdog ends the run after --timeout s in one step.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import os
import statistics
import threading
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

E4M3, FP8_MAX = torch.float8_e4m3fn, 448.0
_SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
_GRAPHS: dict = {}   # (shapes, strides, dtypes, device) -> built graph + its constant buffers
_HANDLES: dict = {}  # device index -> cudnn.Handle


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3 quantization on the GPU, no host sync: (x8, descale [1,1,1,1] fp32), x ~= x8 * descale.
    scale = 448/amax rounded down to a power of two: the multiply in x's dtype is exact and descale = 1/scale
    exactly; the largest |x| lands in (224, 448] (e4m3's relative step is the same at any scale)."""
    lo, hi = torch.aminmax(x)
    amax = torch.maximum(lo.float().abs(), hi.float().abs()).clamp_(min=1e-12)
    scale = torch.exp2(torch.floor(torch.log2(FP8_MAX / amax)))
    return (x * scale.to(x.dtype)).to(E4M3), scale.reciprocal().reshape(1, 1, 1, 1)


def _fp8_graph(q8, k8, v8, o, handle) -> dict:
    """The sdpa_fp8 graph for these [B, H, S, D] views (token-major storage), built once per key."""
    import cudnn
    key = tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in (q8, k8, v8, o)) + (q8.device.index,)
    if key in _GRAPHS:
        return _GRAPHS[key]
    dt, dev = cudnn.data_type, q8.device
    g = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT,
                      compute_data_type=dt.FLOAT, handle=handle)
    t = {n: g.tensor(name=n, dim=list(x.shape), stride=list(x.stride()), data_type=dt.FP8_E4M3)
         for n, x in (("q", q8), ("k", k8), ("v", v8))}
    for n in _SCALARS:
        t[n] = g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT)
    o_t, _stats, amax_s, amax_o = g.sdpa_fp8(**{n: t[n] for n in ("q", "k", "v", *_SCALARS)},
                                             generate_stats=False, attn_scale=1.0 / math.sqrt(q8.shape[-1]))
    o_t.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride())).set_data_type(
        dt.BFLOAT16 if o.dtype == torch.bfloat16 else dt.FP8_E4M3)
    for a in (amax_s, amax_o):  # declared outputs, as in cudnn-frontend's fp8 tests and benchmark
        a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
    t.update(o=o_t, amax_s=amax_s, amax_o=amax_o)
    g.validate(); g.build_operation_graph()  # noqa: E702
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support(); g.build_plans()  # noqa: E702
    full = lambda v: torch.full((1, 1, 1, 1), v, dtype=torch.float32, device=dev)  # noqa: E731
    bufs = {"scale_s": full(FP8_MAX), "descale_s": full(1.0 / FP8_MAX), "one": full(1.0),
            "amax_s": full(0.0), "amax_o": full(0.0)}
    ws = torch.empty(max(1, g.get_workspace_size()), dtype=torch.uint8, device=dev)
    _GRAPHS[key] = entry = {"graph": g, "t": t, "bufs": bufs, "ws": ws}
    return entry


def cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv, out_bf16: bool | None = None):
    """cuDNN fp8 attention on quantized [B, S, H, D] inputs -> (o [B, Sq, H, Dv], o_descale or None).
    P in [0, 1]: scale_s = 448, descale_s = 1/448. O is a convex combination of V's rows, so amax(O) <=
    amax(V): scale_o = 1/descale_v never saturates and o_descale = descale_v (no pass over a bf16 result).
    With a bf16 O (Blackwell only) scale_o = 1 and o is final."""
    import cudnn
    dev = q8.device
    if out_bf16 is None:  # cudnn-frontend's check: a HALF/BFLOAT16 O needs cc >= 10 and cuDNN >= 9.13
        out_bf16 = torch.cuda.get_device_capability(dev)[0] >= 10 and cudnn.backend_version() >= 91300
    o = torch.empty(*q8.shape[:3], v8.shape[-1], dtype=torch.bfloat16 if out_bf16 else E4M3, device=dev)
    if dev.index not in _HANDLES:  # one cuDNN handle per device, on torch's current stream at every call
        with torch.cuda.device(dev):
            _HANDLES[dev.index] = cudnn.create_handle()
    handle = _HANDLES[dev.index]
    cudnn.set_stream(handle, torch.cuda.current_stream(dev).cuda_stream)
    views = [x.transpose(1, 2) for x in (q8, k8, v8, o)]  # [B, H, S, D], strides of the NHD storage
    e = _fp8_graph(*views, handle)
    t, b = e["t"], e["bufs"]
    data = dict(zip(("q", "k", "v", "o"), views), descale_q=dq, descale_k=dk, descale_v=dv,
                descale_s=b["descale_s"], scale_s=b["scale_s"], amax_s=b["amax_s"], amax_o=b["amax_o"],
                scale_o=b["one"] if out_bf16 else dv.reciprocal())
    e["graph"].execute({t[n]: x for n, x in data.items()}, e["ws"], handle=handle)
    return o, (None if out_bf16 else dv)


def cudnn_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Drop-in for attention(): bf16 q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype."""
    (q8, dq), (k8, dk), (v8, dv) = quantize_fp8(q), quantize_fp8(k), quantize_fp8(v)
    o, o_descale = cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv)
    return o.to(q.dtype) if o_descale is None else o.to(q.dtype) * o_descale.to(q.dtype)  # pow2: exact


def sdpa_only(backend: SDPBackend):
    def run(q, k, v):  # as liveavatar.models.attention._sdpa_only
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def reference_fp32(q, k, v, chunk: int) -> torch.Tensor:
    """fp32 softmax(q k^T / sqrt(D)) v in query chunks (TF32 off) -> [B, Lq, H, D] fp32."""
    qf, kf, vf = (x.float().transpose(1, 2).contiguous() for x in (q, k, v))
    out = torch.empty_like(qf)
    for i in range(0, qf.shape[2], chunk):
        s = torch.matmul(qf[:, :, i:i + chunk], kf.transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))
        out[:, :, i:i + chunk] = torch.matmul(torch.softmax(s, dim=-1), vf)
    return out.transpose(1, 2)


def bench(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(median GPU ms per call, host ms per call): events around each call, calls queued back to back."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    t0 = time.perf_counter()
    for a, b in ev:
        a.record(); fn(); b.record()  # noqa: E702
    host = (time.perf_counter() - t0) * 1e3 / iters
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev), host


def print_table(rows):
    f = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    print("\n| variant | ms | TFLOP/s | quant ms | total ms | rel L2 vs fp32 | max abs | rel L2 vs cudnn_bf16 | error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {f(r['ms'], 3)} | {f(r['tflops'], 0)} | {f(r['quant_ms'], 3)} | {f(r['total_ms'], 3)} "
              f"| {f(r['rel_l2'], 5)} | {f(r['max_abs'], 4)} | {f(r['rel_l2_vs_cudnn'], 5)} | {(r['error'] or '')[:120]} |")
    print(flush=True)


_DOG: dict = {}


def watchdog(step: str | None, seconds: float = 0.0, rows: list | None = None, table=None):
    """Arm (step) or disarm (None) a per-step watchdog: past `seconds` it prints a JSON error line and
    the table (`table(rows)`, default print_table), then os._exit(3); faulthandler kills the process
    60 s later if the GIL is never freed."""
    if _DOG.get("timer"):
        _DOG.pop("timer").cancel()
    faulthandler.cancel_dump_traceback_later()

    def fire():
        print(json.dumps({"variant": step, "error": f"timeout: still running after {seconds:.0f} s"}), flush=True)
        (table or print_table)(rows)
        os._exit(3)
    if step is not None:
        _DOG["timer"] = threading.Timer(seconds, fire)
        _DOG["timer"].daemon = True
        _DOG["timer"].start()
        faulthandler.dump_traceback_later(seconds + 60, exit=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="cudnn_bf16,flash_bf16,cudnn_fp8,sage", help="comma-separated, run in this order")
    for flag, default in (("b", 1), ("heads", 40), ("head-dim", 128), ("q-len", 3168), ("kv-len", 15312),
                          ("warmup", 5), ("iters", 20), ("chunk", 512), ("seed", 0)):
        p.add_argument(f"--{flag}", type=int, default=default)  # chunk: query rows per fp32 reference chunk
    p.add_argument("--logit-std", type=float, default=3.0, help="std of q.k/sqrt(D) on the random data")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds allowed for each step before the process exits")
    args = p.parse_args()
    rows: list = []
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: this benchmark needs a GPU"}), flush=True)
        return
    watchdog("setup", args.timeout, rows)
    torch.set_float32_matmul_precision("highest")
    dev = torch.device("cuda")
    head = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(dev),
            "cc": list(torch.cuda.get_device_capability(dev)), "torch_cudnn": torch.backends.cudnn.version()}
    try:
        import cudnn
        head.update(cudnn_frontend=cudnn.__version__, cudnn_backend=cudnn.backend_version())
    except Exception as exc:  # noqa: BLE001 -- reported; the cudnn_fp8 row will fail with the same error
        head["cudnn_frontend_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps({"header": head, "args": vars(args)}), flush=True)

    B, H, D, Sq, Skv = args.b, args.heads, args.head_dim, args.q_len, args.kv_len
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    rand = lambda s, sd: (torch.randn(B, s, H, D, generator=gen, device=dev) * sd).to(torch.bfloat16)  # noqa: E731
    q, k, v = rand(Sq, math.sqrt(args.logit_std)), rand(Skv, math.sqrt(args.logit_std)), rand(Skv, 1.0)
    ref, flops, baseline = reference_fp32(q, k, v, args.chunk), 4.0 * B * H * Sq * Skv * D, None
    rel_l2 = lambda out, r: ((out.float() - r).norm() / r.norm()).item()  # noqa: E731

    for name in [n.strip() for n in args.variants.split(",") if n.strip()]:
        watchdog(name, args.timeout, rows)
        row = dict(variant=name, ms=None, tflops=None, rel_l2=None, max_abs=None, quant_ms=None, error=None,
                   total_ms=None, quant_q_ms=None, host_ms=None, first_call_s=None, rel_l2_vs_cudnn=None)
        try:
            full = None  # the bf16-in/bf16-out call, when the timed call is only part of it
            if name in ("cudnn_bf16", "flash_bf16"):
                fn = sdpa_only(SDPBackend.CUDNN_ATTENTION if name == "cudnn_bf16" else SDPBackend.FLASH_ATTENTION)
                attn = lambda: fn(q, k, v)  # noqa: E731
            elif name == "cudnn_fp8":
                (q8, dq), (k8, dk), (v8, dv) = [quantize_fp8(x) for x in (q, k, v)]
                attn = lambda: cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv)  # noqa: E731
                full = lambda: cudnn_fp8_attention(q, k, v)  # noqa: E731
            elif name == "sage":
                from sageattention import sageattn
                k_sage = k.clone()  # sageattn(smooth_k=True) subtracts the key mean from k in place
                attn = lambda: sageattn(q, k_sage, v, tensor_layout="NHD", is_causal=False)  # noqa: E731
            else:
                raise ValueError(f"unknown variant {name!r}")
            t0 = time.perf_counter()
            out = (full or attn)()  # first call: graph build / JIT compile; its output is the one checked
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            row["rel_l2"], row["max_abs"] = rel_l2(out, ref), (out.float() - ref).abs().max().item()
            if name == "cudnn_bf16":
                baseline = out
            if baseline is not None:
                row["rel_l2_vs_cudnn"] = rel_l2(out, baseline.float())
            del out
            row["ms"], row["host_ms"] = bench(attn, args.warmup, args.iters)
            row["tflops"] = flops / row["ms"] / 1e9
            row["total_ms"] = row["ms"] if full is None else bench(full, args.warmup, args.iters)[0]
            if name == "cudnn_fp8":
                row["quant_ms"] = bench(lambda: [quantize_fp8(x) for x in (q, k, v)], args.warmup, args.iters)[0]
                row["quant_q_ms"] = bench(lambda: quantize_fp8(q), args.warmup, args.iters)[0]
        except Exception as exc:  # noqa: BLE001 -- report and go on
            row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            try:
                torch.cuda.synchronize()
            except Exception as exc2:  # noqa: BLE001 -- a sticky CUDA error: later rows will say so too
                row["error"] += f" | then: {type(exc2).__name__}: {exc2}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
        with contextlib.suppress(Exception):  # a sticky CUDA error is already in the row
            torch.cuda.empty_cache()
    watchdog(None)
    print_table(rows)


if __name__ == "__main__":
    main()
