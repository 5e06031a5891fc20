"""Micro-benchmark: fp8 linear variants at the DiT's block shapes (M = 3168 tokens at 704*384).

Times (CUDA events, median of 30) quantise + matmul for per-tensor scaling (the reference's
scheme: a global amax pass, then the cast) against row-wise activation scales (one pass) with
per-output-channel weight scales, plus bf16 F.linear and a fused q/k/v GEMM. Prints JSON lines.
    python bench/fp8_gemm_micro.py [--m 3168]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
MAX = 448.0


def q_tensor(x):
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float32)
    scale = (MAX / amax.clamp(min=1e-12)).clamp(max=MAX)
    return (x.float() * scale).clamp(-MAX, MAX).to(E4M3), scale.reciprocal()


def q_rows(x):
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (MAX / amax.clamp(min=1e-12)).clamp(max=MAX)
    return (x.float() * scale).clamp(-MAX, MAX).to(E4M3), scale.reciprocal()


def lin_tensor(x, w, ws):
    xq, xs = q_tensor(x)
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=True)


def lin_rows(x, w, ws_rows):
    xq, xs = q_rows(x)
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws_rows, out_dtype=torch.bfloat16, use_fast_accum=True)


def timeit(fn, iters=30):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=3168)
    args = p.parse_args()
    dev = torch.device("cuda")
    ct, cr = torch.compile(lin_tensor), torch.compile(lin_rows)
    for k, n in [(5120, 5120), (5120, 13824), (13824, 5120), (5120, 15360)]:
        x = torch.randn(args.m, k, device=dev, dtype=torch.bfloat16)
        wb = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
        w, ws = q_tensor(wb)
        wr, wsr = q_rows(wb)  # per output channel
        wsr = wsr.view(1, n)
        ref = F.linear(x.float(), wb.float())
        res = {"m": args.m, "k": k, "n": n}
        res["bf16_ms"] = timeit(lambda: F.linear(x, wb))
        res["fp8_tensor_ms"] = timeit(lambda: ct(x, w, ws))
        res["fp8_rows_ms"] = timeit(lambda: cr(x, wr, wsr))
        xq_t, xs_t = q_tensor(x)
        res["mm_only_tensor_ms"] = timeit(lambda: torch._scaled_mm(xq_t, w.t(), scale_a=xs_t, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=True))
        xq_r, xs_r = q_rows(x)
        res["mm_only_rows_ms"] = timeit(lambda: torch._scaled_mm(xq_r, wr.t(), scale_a=xs_r, scale_b=wsr, out_dtype=torch.bfloat16, use_fast_accum=True))
        for name, out in (("tensor", ct(x, w, ws)), ("rows", cr(x, wr, wsr))):
            res[f"rel_err_{name}"] = float((out.float() - ref).norm() / ref.norm())
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
