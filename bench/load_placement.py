"""The product's DiT loading under an emulated smaller card (issue 15): placement, then block by block.

    python -m bench.load_placement --memory-cap-gb 22 --fp8 [--weights auto] [--size 704*384]
    python -m bench.load_placement --tiny --device cpu --weights stream      # CPU plumbing check

Writes full-size random DiT weights (bf16, `benchlib.random_tensor` values) as a sharded
safetensors checkpoint (one shard per block, official key names) into `--dir` (reused when
present: about 30 GiB of disk), then occupies device memory so that only `--memory-cap-gb` GiB
stay free (`bench.placement.cap_device_memory`), and loads the checkpoint the way
`LiveAvatar.from_checkpoint` loads the DiT: `loading.placement.place_dit` (the `--weights` mode,
the loading preflight) then `official.build_dit_from_source` with that residency. Prints one JSON
line (appended to `--out`): the placement, the load estimate, the measured device peak while
loading (the filler excluded), the bytes resident on the device and in host memory, seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench import benchlib

GIB = 2**30


def write_random_checkpoint(cfg, folder: Path, seed: int, device: torch.device) -> Path:
    """A sharded safetensors DiT with random weights (one shard per block + one for the rest);
    returns its index file. Kept when the index exists already."""
    from safetensors.torch import save_file

    from liveavatar.models.dit import CausalS2VDiT

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return index
    folder.mkdir(parents=True, exist_ok=True)
    with benchlib.params_on_meta():
        shapes = {k: tuple(v.shape) for k, v in CausalS2VDiT(cfg).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for key in shapes:
        part = "block%02d" % int(key.split(".")[1]) if key.startswith("blocks.") else "rest"
        groups.setdefault(part, []).append(key)
    weight_map = {}
    for part, keys in groups.items():
        name = f"random-{part}.safetensors"
        sd = {k: benchlib.random_tensor(k, shapes[k], device, torch.bfloat16, seed, cfg.dim).cpu() for k in keys}
        save_file(sd, str(folder / name))
        weight_map.update({k: name for k in keys})
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def main(argv: list[str] | None = None) -> int:
    from bench.placement import cap_device_memory
    from liveavatar.config import DiTConfig
    from liveavatar.loading.official import build_dit_from_source
    from liveavatar.loading.placement import PlacementTarget, place_dit
    from liveavatar.loading.safetensors_io import open_tensor_source
    from liveavatar.options import WEIGHTS_MODES, resolve_fp8_scaling
    from liveavatar.pipeline.memory import load_estimate
    from liveavatar.sizes import parse_size

    p = argparse.ArgumentParser(prog="python -m bench.load_placement", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny bench DiT (CPU plumbing check)")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--weights", choices=WEIGHTS_MODES, default="auto")
    p.add_argument("--size", default="704*384")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--memory-cap-gb", type=float, default=None)
    p.add_argument("--dir", default="/tmp/liveavatar_random_dit", help="where the random checkpoint is written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.tiny:
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in benchlib.TINY_CONFIG.items()}
        cfg = DiTConfig(**kw)
    else:
        cfg = DiTConfig()
    folder = Path(args.dir) / ("tiny" if args.tiny else "full")
    t0 = time.perf_counter()
    index = write_random_checkpoint(cfg, folder, args.seed, device)
    write_s = time.perf_counter() - t0
    filler = cap_device_memory(device, args.memory_cap_gb) if args.memory_cap_gb else 0
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    benchlib.reset_peak_mem(device)
    fp8 = resolve_fp8_scaling(args.fp8)
    width, height = parse_size(args.size)
    t0 = time.perf_counter()
    res = place_dit(cfg, device, torch.bfloat16, bool(fp8), args.weights, PlacementTarget(width, height, args.steps))
    dit = build_dit_from_source(open_tensor_source(index), cfg, device, torch.bfloat16, fp8=fp8 or False,
                                fp8_allow_cpu=device.type == "cpu", residency=res)
    benchlib.sync(device)
    load_s = time.perf_counter() - t0
    stream = dit.layer_stream
    on_device = (torch.cuda.memory_allocated(device) - filler) if device.type == "cuda" else None
    peak = (torch.cuda.max_memory_allocated(device) - filler) / GIB if device.type == "cuda" else None
    row = {
        "command": "python -m bench.load_placement " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "device": benchlib.device_name(device), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "memory_cap_gb": args.memory_cap_gb, "free_gib_before": free / GIB if free is not None else None,
        "weights": args.weights, "fp8": fp8, "size": f"{width}x{height}", "steps": args.steps,
        "resident_layers": res.weights if res is not None else cfg.num_layers,
        "resident_kv_layers": res.kv if res is not None else None, "num_layers": cfg.num_layers,
        "load_estimate_gib": load_estimate(cfg, torch.bfloat16, bool(fp8), res).total / GIB,
        "load_peak_gib": peak, "device_weights_gib": on_device / GIB if on_device is not None else None,
        "host_streamed_gib": stream.host_bytes() / GIB if stream is not None else 0.0,
        "host_pinned": bool(stream is not None and stream.blocks[stream.streamed[0]]._stream_flat.is_pinned())
        if stream is not None and stream.streamed else None,
        "write_s": round(write_s, 1), "load_s": round(load_s, 1),
    }
    line = json.dumps(benchlib.rounded(row))
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
