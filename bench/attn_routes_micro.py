"""Attention routes at the DiT's exact shapes on one GPU: speed and accuracy of every kernel we can reach.

Shapes, from the code (liveavatar.config DiTConfig / StreamConfig, benchlib.sink_tokens) for --size
(default 704*384: fsl = 24*44 = 1056 tokens per latent frame), bf16, 40 heads of 128, layout [B, L, H, D]:
  self   q [1, 3 fsl] vs k/v [1, 12 fsl ring + sink] = 3168 x 15312 (steady state; full ring + sink slot)
  text   q [1, 3 fsl] vs k/v [1, text_len]           = 3168 x 512   (text cross-attention, every layer)
  audio  q [3, fsl]   vs k/v [3, num_audio_token+1]  = 3 x 1056 x 5 (audio injection, frames as batch)
Calls per 4-step block: self and text 40 layers x 4 steps; audio 12 injected layers x 4 steps.
Routes (each in try/except: a failure is that row's "error" and the run goes on):
  sdpa          attention(..., "sdpa"): SDPA, PyTorch's choice (the model's default)
  cudnn         attention(..., "cudnn"): SDPA limited to cuDNN attention
  fa4           attention(..., "fa4"): flash_attn.cute.flash_attn_func (flash-attn-4, CuTeDSL)
  fa4_fwd       flash_attn.cute.interface._flash_attn_fwd (no autograd.Function wrapper: less host time)
  sdpa_fa2      SDPA limited to FLASH_ATTENTION: torch's built-in FlashAttention 2 (before FA4 is activated)
  fa4_sdpa      activate_flash_attention_impl("FA4") + SDPA FLASH (torch's route), restored after the route
  fa4_compiled  torch.compile(fullgraph=True) of attention(..., "fa4"): the custom op path (one graph per shape)
  fa4_128x176, fa4_128x192   _flash_attn_fwd(tile_mn=...): FA3's C++ tile for hdim 128 non-causal is 128x176
  flash         attention(..., "flash"): flash_attn_interface (FA3) or flash_attn (FA2), if importable
  fa3_sdpa      torch.nn.attention.activate_flash_attention_impl("FA3") + SDPA FLASH (needs flash_attn_interface)
Per (route, shape): first_call_s (JIT compile + first run), rel_l2 = max over 2 fresh input sets of
||out - ref|| / ||ref|| (ref: fp32 attention, TF32 off), ms = median of CUDA events around each call of
--iters back-to-back calls rotating over input sets (> 4x the L2 per rotation; small shapes: ~max(host, GPU)),
host_ms = CPU time per call, graph_ms = GPU time per call from CUDA-graph replays (a second pass, text and
audio shapes only: no launch gaps). tflops = 4 B H Lq Lk D / ms. block_ms: sum over shapes of
calls per block x time (graph_ms where measured, else ms): the attention share of one DiT block.
Needs the flash-attn-4 wheels for the fa4 routes (bench/attn_routes_device.sh installs them).
Run: python bench/attn_routes_micro.py [--routes a,b] [--shapes self,text,audio] [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: liveavatar
from attn_fp8_micro import reference_fp32, watchdog  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from bench import benchlib  # noqa: E402
from liveavatar.config import DEFAULT_STREAM, DiTConfig  # noqa: E402
from liveavatar.models.attention import attention  # noqa: E402

ROUTES = ("sdpa", "cudnn", "fa4", "fa4_fwd", "sdpa_fa2", "fa4_sdpa", "fa4_compiled", "fa4_128x176", "fa4_128x192",
          "flash", "fa3_sdpa")  # the default order: what matters most first (a step timeout ends the run)
PACKAGES = ("torch", "flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-cu13",
            "quack-kernels", "apache-tvm-ffi", "torch-c-dlpack-ext", "nvidia-cudnn-cu13", "cuda-bindings", "triton")
L2_BYTES = 60 * 2**20


def dit_shapes(size: str, steps: int) -> dict[str, dict]:
    """{name: dict(b, lq, lk, calls)}: the three attention calls of a streaming block, from the configs."""
    cfg, s = DiTConfig(), DEFAULT_STREAM
    a, b = (int(x) for x in size.split("*"))
    hw = (b // s.vae_stride_hw, a // s.vae_stride_hw)
    fsl = (hw[0] // 2) * (hw[1] // 2)
    frames = s.frames_per_block_latent
    layers = cfg.num_layers * steps
    return {
        "self": dict(b=1, lq=frames * fsl, lk=s.latent_frames_per_clip * fsl + benchlib.sink_tokens(hw), calls=layers),
        "text": dict(b=1, lq=frames * fsl, lk=cfg.text_len, calls=layers),
        "audio": dict(b=frames, lq=fsl, lk=cfg.num_audio_token + 1, calls=len(cfg.audio_inject_layers) * steps),
    }


def sdpa_only(backend: SDPBackend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


@contextlib.contextmanager
def flash_impl(name: str):
    """SDPA's FLASH_ATTENTION backend routed to torch's FA3/FA4 implementation, restored on exit."""
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl
    activate_flash_attention_impl(name)
    try:
        yield
    finally:
        restore_flash_attention_impl()


def fa4_fwd(**kw):
    from flash_attn.cute.interface import _flash_attn_fwd
    return lambda q, k, v: _flash_attn_fwd(q, k, v, **kw)[0]


def route(name: str):
    """(context manager around the route, the callable q, k, v -> out), built inside the context."""
    if name in ("sdpa", "cudnn", "flash", "fa4"):
        return contextlib.nullcontext(), lambda: (lambda q, k, v: attention(q, k, v, name))
    if name == "sdpa_fa2":
        return contextlib.nullcontext(), lambda: sdpa_only(SDPBackend.FLASH_ATTENTION)
    if name in ("fa3_sdpa", "fa4_sdpa"):
        return flash_impl(name[:3].upper()), lambda: sdpa_only(SDPBackend.FLASH_ATTENTION)
    if name == "fa4_fwd":
        return contextlib.nullcontext(), lambda: fa4_fwd()
    if name.startswith("fa4_") and "x" in name:
        m, n = (int(x) for x in name[4:].split("x"))
        return contextlib.nullcontext(), lambda: fa4_fwd(tile_mn=(m, n))
    if name == "fa4_compiled":
        return contextlib.nullcontext(), lambda: torch.compile(lambda q, k, v: attention(q, k, v, "fa4"),
                                                               fullgraph=True, dynamic=False)
    raise ValueError(f"unknown route {name!r}; choose from {ROUTES}")


class Inputs:
    """Rotating bf16 input sets for one shape (enough sets to exceed 4x the L2) and their fp32 references."""

    def __init__(self, shp: dict, heads: int, head_dim: int, logit_std: float, seed: int, chunk: int,
                 dev: torch.device):
        g = torch.Generator(device=dev).manual_seed(seed)
        b, lq, lk = shp["b"], shp["lq"], shp["lk"]
        set_bytes = b * (lq + 2 * lk) * heads * head_dim * 2
        n = max(2, min(8, math.ceil(4 * L2_BYTES / set_bytes)))
        qk_sd = math.sqrt(logit_std)  # q.k / sqrt(D) then has std logit_std
        rand = lambda L, sd: (torch.randn(b, L, heads, head_dim, generator=g, device=dev) * sd).to(torch.bfloat16)  # noqa: E731
        self.sets = [(rand(lq, qk_sd), rand(lk, qk_sd), rand(lk, 1.0)) for _ in range(n)]
        self.refs = [reference_fp32(*self.sets[i], chunk) for i in (0, n - 1)]  # checked on two fresh sets
        self.flops = 4.0 * b * heads * lq * lk * head_dim


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def time_eager(fn, inp: Inputs, warmup: int, iters: int, dev: torch.device) -> tuple[float, float]:
    """(median GPU ms per call, host ms per call): events around each call, back to back, rotating sets."""
    sets = inp.sets
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    benchlib.sync(dev)
    timer = benchlib.Timer(dev)
    t0 = time.perf_counter()
    for i in range(iters):
        timer.mark(); fn(*sets[i % len(sets)]); timer.mark()  # noqa: E702
    host = (time.perf_counter() - t0) * 1e3 / iters
    timer.sync()
    return statistics.median(timer.elapsed_ms(2 * i, 2 * i + 1) for i in range(iters)), host


def time_graph(fn, inp: Inputs, reps: int, replays: int) -> float:
    """GPU ms per call: `reps` calls (rotating sets) captured in one CUDA graph, median over `replays`."""
    sets = inp.sets
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs recommends
        for i in range(3):
            fn(*sets[i % len(sets)])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(*sets[i % len(sets)])
    graph.replay()
    torch.cuda.synchronize()
    timer = benchlib.Timer(torch.device("cuda"))
    for _ in range(replays):
        timer.mark(); graph.replay(); timer.mark()  # noqa: E702
    timer.sync()
    return statistics.median(timer.elapsed_ms(2 * i, 2 * i + 1) / reps for i in range(replays))


def print_table(rows: list[dict], shapes: dict | None = None) -> None:
    f = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    print("\n| route | shape | ms | graph ms | host ms | TFLOP/s | rel L2 vs fp32 | first call s | error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['route']} | {r['shape']} | {f(r['ms'], 4)} | {f(r.get('graph_ms'), 4)} | {f(r['host_ms'], 3)} "
              f"| {f(r['tflops'], 0)} | {f(r['rel_l2'], 5)} | {f(r['first_call_s'], 1)} | {(r['error'] or '')[:150]} |")
    if shapes:
        print("\n| route | attention ms per block (" + " + ".join(f"{n} x{s['calls']}" for n, s in shapes.items()) + ") |")
        print("| --- | --- |")
        for name, ms in block_ms(rows, shapes).items():
            print(f"| {name} | {f(ms, 1)} |")
    print(flush=True)


def block_ms(rows: list[dict], shapes: dict) -> dict[str, float | None]:
    """Per route: sum over shapes of calls per block x (graph_ms if measured, else ms); None if a shape failed."""
    out: dict[str, float | None] = {}
    for r in rows:
        t = r.get("graph_ms") or r["ms"]
        prev = out.get(r["route"], 0.0)
        out[r["route"]] = None if t is None or prev is None else prev + shapes[r["shape"]]["calls"] * t
    return out


def header(dev: torch.device) -> dict:
    head = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": benchlib.device_name(dev),
            "torch_cudnn": torch.backends.cudnn.version()}
    if dev.type == "cuda":
        head["cc"] = list(torch.cuda.get_device_capability(dev))
    for pkg in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            head[pkg] = importlib.metadata.version(pkg)
    with contextlib.suppress(Exception):
        from torch.nn.attention import list_flash_attention_impls
        head["flash_impls"] = list_flash_attention_impls()
    return head


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--routes", default=",".join(ROUTES), help="comma-separated, run in this order")
    p.add_argument("--shapes", default="self,text,audio")
    p.add_argument("--size", default="704*384")
    for flag, default in (("steps", 4), ("warmup", 5), ("iters", 30), ("graph-reps", 20), ("graph-replays", 10),
                          ("chunk", 512), ("seed", 0)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--graph-shapes", default="text,audio", help="shapes also timed from CUDA graph replays ('' = none)")
    p.add_argument("--logit-std", type=float, default=3.0, help="std of q.k/sqrt(D) on the random data")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per step before the process exits")
    p.add_argument("--out", default=None, help="also append the JSON lines here")
    p.add_argument("--ok-file", default=None, help="touched when route fa4 ran the self shape within rel L2 1e-2")
    p.add_argument("--dry-run", action="store_true", help="plumbing check on the CPU: shapes / 32, 4 heads of 32")
    args = p.parse_args()
    dev = torch.device("cpu" if args.dry_run else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: this benchmark needs a GPU (--dry-run: CPU plumbing check)"}),
              flush=True)
        return 2
    cfg, all_shapes = DiTConfig(), dit_shapes(args.size, args.steps)
    heads, head_dim = (4, 32) if args.dry_run else (cfg.num_heads, cfg.head_dim)
    shapes = {n: all_shapes[n] for n in args.shapes.split(",") if n}
    if args.dry_run:
        shapes = {n: dict(s, lq=max(1, s["lq"] // 32), lk=max(5, s["lk"] // 32)) for n, s in shapes.items()}
    rows: list[dict] = []
    sink = open(args.out, "a") if args.out else None

    def emit(d: dict) -> None:
        line = json.dumps(d)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n"); sink.flush()  # noqa: E702

    table = lambda rs: print_table(rs, shapes)  # noqa: E731
    watchdog("setup", args.timeout, rows, table)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference
    emit({"header": header(dev), "shapes": shapes, "args": vars(args)})
    inputs = {n: Inputs(s, heads, head_dim, args.logit_std, args.seed + i, args.chunk, dev)
              for i, (n, s) in enumerate(shapes.items())}
    choice = {}  # the kernel plain SDPA (our default backend) picks at each shape
    for n, inp in inputs.items():
        try:
            choice[n] = SDPBackend(torch._fused_sdp_choice(*(x.transpose(1, 2) for x in inp.sets[0]))).name
        except Exception as exc:  # noqa: BLE001 -- a private helper: report, do not stop
            choice[n] = f"{type(exc).__name__}: {exc}"[:200]
    emit({"sdpa_choice": choice})
    fns: dict[tuple[str, str], object] = {}  # (route, shape) -> fn that ran, for the graph pass

    for name in [r for r in args.routes.split(",") if r]:
        ctx, make = route(name)
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(ctx)
            fn, route_error = make(), None
        except Exception as exc:  # noqa: BLE001 -- the route is unavailable: every shape says why
            stack.close()
            fn, route_error = None, f"{type(exc).__name__}: {exc}"[:1000]
        with stack:
            for sname, inp in inputs.items():
                watchdog(f"{name}/{sname}", args.timeout, rows, table)
                row = dict(route=name, shape=sname, **shapes[sname], ms=None, host_ms=None, graph_ms=None, tflops=None,
                           rel_l2=None, max_abs=None, first_call_s=None, error=route_error)
                if fn is not None:
                    try:
                        t0 = time.perf_counter()
                        out = fn(*inp.sets[0])
                        benchlib.sync(dev)
                        row["first_call_s"] = time.perf_counter() - t0
                        errs = [rel_l2(out, inp.refs[0]), rel_l2(fn(*inp.sets[-1]), inp.refs[1])]
                        row["rel_l2"] = max(errs) if all(math.isfinite(e) for e in errs) else float("nan")
                        row["max_abs"] = (out.float() - inp.refs[0]).abs().max().item()
                        del out
                        row["ms"], row["host_ms"] = time_eager(fn, inp, args.warmup, args.iters, dev)
                        row["tflops"] = inp.flops / row["ms"] / 1e9
                        fns[(name, sname)] = fn
                    except Exception as exc:  # noqa: BLE001 -- report and go on
                        row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
                        with contextlib.suppress(Exception):
                            benchlib.sync(dev)
                rows.append(row)
                emit(row)
                if (args.ok_file and name == "fa4" and sname == "self" and row["error"] is None
                        and row["rel_l2"] is not None and row["rel_l2"] < 1e-2):
                    Path(args.ok_file).touch()  # now: later steps may still time out
        if dev.type == "cuda":
            with contextlib.suppress(Exception):  # a sticky CUDA error is already in the rows
                torch.cuda.empty_cache()

    # graph pass: routes whose activation was restored are re-activated around their capture
    for (name, sname), fn in fns.items():
        if sname not in args.graph_shapes.split(",") or dev.type != "cuda":
            continue
        watchdog(f"graph {name}/{sname}", args.timeout, rows, table)
        row = next(r for r in rows if r["route"] == name and r["shape"] == sname)
        ctx, _make = route(name)
        try:
            with ctx:
                row["graph_ms"] = time_graph(fn, inputs[sname], args.graph_reps, args.graph_replays)
            emit({"route": name, "shape": sname, "graph_ms": row["graph_ms"]})
        except Exception as exc:  # noqa: BLE001
            row["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
            emit({"route": name, "shape": sname, "graph_error": row["graph_error"]})
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
    watchdog(None)
    emit({"block_ms": block_ms(rows, shapes)})
    if sink:
        sink.close()
    print_table(rows, shapes)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
