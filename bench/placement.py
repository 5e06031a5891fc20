"""The bench's memory side, the product's way (issue 15): an emulated smaller card, the loading
preflight and the weight placement decision before the random DiT is built, the job's memory
estimate next to the measured peak, and the layer stream's bytes and bandwidth.

- `cap_device_memory`: occupy device memory with a filler tensor so that `torch.cuda.mem_get_info`
  reports `cap` GiB free (what the preflight sees), and cap the process's allocator there too
  (`torch.cuda.set_per_process_memory_fraction`). The filler is left out of the reported peak.
- `preflight`: `memory.place_layers` (the `--weights` mode) then `memory.load_estimate` checked
  against the free memory, as loading does: a run that cannot fit ends with the MemoryError
  naming the numbers, before any weight exists.
- `stream_fields`: bytes per block and copy bandwidth, with the FPS projected for PCIe 4.0 x16.
- `memory_mark` / `placement_fields`: the device memory at each phase (driver free, allocated,
  reserved) and the placement's expectation, so a row shows what loading took beyond it.
"""

from __future__ import annotations

import torch

GIB = 2**30
PCIE4_BYTES_PER_S = 25e9  # PCIe 4.0 x16, effective host-to-device
_filler: list[torch.Tensor] = []  # kept alive for the whole run
TRACE: list[dict] = []  # memory_mark's records (also in a failed run's JSON line)


def memory_mark(at: str, device: torch.device, **extra) -> None:
    """Record the device memory at point `at` (GiB, the filler left out): the driver's free
    bytes (`mem_get_info`, what a preflight sees before releasing the cache), the allocator's
    allocated and reserved bytes (reserved - allocated: its cache, freed blocks it keeps), and `extra`."""
    if device.type != "cuda":
        return
    filler = sum(t.numel() for t in _filler)
    free, _ = torch.cuda.mem_get_info(device)
    TRACE.append({"at": at, "free_gib": round(free / GIB, 3),
                  "allocated_gib": round((torch.cuda.memory_allocated(device) - filler) / GIB, 3),
                  "reserved_gib": round((torch.cuda.memory_reserved(device) - filler) / GIB, 3), **extra})


def placement_fields(cfg, residency, width: int, height: int, args, dtype: torch.dtype, fp8: bool) -> dict:
    """The placement's own expectation: resident blocks and the job's estimate as placed (weights
    counted, every KV layer paged when streaming), for the JSON line beside what happened."""
    from liveavatar.models.layer_stream import LayerResidency
    from liveavatar.pipeline.memory import estimate_memory

    kw = dict(steps_owned=args.steps, dtype=dtype, fp8=fp8, decode_here=args.scope == "end_to_end")
    res = None if residency is None else LayerResidency(residency.weights, 0, residency.buffers)
    est = estimate_memory(cfg, width, height, residency=res, **kw)
    return {"resident_layers_placed": cfg.num_layers if residency is None else residency.weights,
            "placement_estimate_gib": est.total / GIB}


def cap_device_memory(device: torch.device, cap_gib: float) -> int:
    """Leave `cap_gib` GiB free on `device` (filler tensor + allocator cap); returns the filler's bytes."""
    from bench.random_model import BenchUsageError

    if device.type != "cuda":
        raise BenchUsageError("--memory-cap-gb: needs a CUDA device")
    free, total = torch.cuda.mem_get_info(device)
    want = int(cap_gib * GIB)
    if want > free:
        raise BenchUsageError(f"--memory-cap-gb {cap_gib}: only {free / GIB:.1f} GiB are free on {device}")
    filler = torch.empty(free - want, dtype=torch.uint8, device=device)
    _filler.append(filler)
    free_now, _ = torch.cuda.mem_get_info(device)
    if free_now > want:  # the allocator rounded down: take the rest too
        _filler.append(torch.empty(free_now - want, dtype=torch.uint8, device=device))
    index = device.index if device.index is not None else torch.cuda.current_device()  # the cap needs an index
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved(device) + want) / total), index)
    return sum(t.numel() for t in _filler)


def preflight(args, cfg, width: int, height: int, device: torch.device, dtype: torch.dtype, fp8: bool):
    """The placement (`LayerResidency`, or None: every block resident) and the loading check,
    from the free memory now; raises MemoryError with the numbers when nothing fits."""
    from liveavatar.loading.placement import PlacementTarget, place_dit
    from liveavatar.models.layer_stream import LayerResidency
    from liveavatar.pipeline.memory import check_fits, load_estimate

    forced = getattr(args, "resident_layers", None)
    if forced is None:  # the product's decision (loading does the same)
        target = PlacementTarget(width, height, args.steps, decode_here=args.scope == "end_to_end")
        return place_dit(cfg, device, dtype, fp8, args.weights, target, args.stream_buffers)
    w, _, kv = forced.partition(",")  # explicit "W" or "W,KV" (tests, experiments)
    res = LayerResidency(int(w), int(kv or 0), args.stream_buffers)
    check_fits(device, load_estimate(cfg, dtype, fp8, res), "loading the DiT weights")
    return res


def job_estimate(cfg, dit, width: int, height: int, args, dtype: torch.dtype, fp8: bool, cache_plan) -> float:
    """GiB the memory estimate gives for the job as it was placed (weights, caches, working set)."""
    from liveavatar.models.layer_stream import LayerResidency
    from liveavatar.pipeline.memory import estimate_memory

    stream = dit.layer_stream
    kw = dict(steps_owned=args.steps, dtype=dtype, fp8=fp8, decode_here=args.scope == "end_to_end")
    if stream is not None:
        res = stream.residency
        kv = cache_plan.resident_kv_layers if cache_plan is not None else res.kv
        return estimate_memory(cfg, width, height, residency=LayerResidency(res.weights, kv, res.buffers),
                               **kw).total / GIB
    plan = cache_plan
    est = estimate_memory(cfg, width, height, sink_slot=bool(plan and plan.sink_slot),
                          kv_offload=bool(plan and plan.offload), **kw)
    if plan is not None and plan.prefetch:
        est.step_caches *= 2
    return est.total / GIB


def stream_fields(dit, res: dict, timed_blocks: int, block_ms: float, frames_per_block: int) -> dict:
    """h2d bytes per timed block, copy bandwidth and the PCIe 4.0 projection (None without streaming).

    projected_fps_pcie4: the block takes the longer of its measured time and its host-to-device
    bytes at 25 GB/s (copies overlap compute); pcie4_copy_bound_fps: the copies alone."""
    stream = dit.layer_stream
    out = {"resident_layers": stream.residency.weights if stream is not None else dit.cfg.num_layers,
           "h2d_bytes_per_block": 0, "d2h_bytes_per_block": 0, "copy_gbps": None,
           "projected_fps_pcie4": frames_per_block / (block_ms / 1000.0), "pcie4_copy_bound_fps": None}
    if stream is None:
        return out
    a, b = res.get("stream_warm_end"), res.get("stream_end")
    if a is not None and b is not None and res.get("block_ms"):
        n = max(1, len(res["block_ms"]))
        per = (b["h2d_bytes"] - a["h2d_bytes"]) / n
        out["h2d_bytes_per_block"] = int(per)
        out["d2h_bytes_per_block"] = int((b["d2h_bytes"] - a["d2h_bytes"]) / n)
        copy_s = per / PCIE4_BYTES_PER_S
        out["pcie4_copy_bound_fps"] = frames_per_block / copy_s if copy_s else None
        out["projected_fps_pcie4"] = frames_per_block / max(block_ms / 1000.0, copy_s)
    out["copy_gbps"] = stream.stats.copy_gbps()
    out["resident_kv_layers"] = res.get("resident_kv_layers")
    out["stream_buffers"] = stream.residency.buffers
    return out


__all__ = ["cap_device_memory", "preflight", "job_estimate", "stream_fields", "memory_mark", "placement_fields",
           "TRACE", "PCIE4_BYTES_PER_S"]
