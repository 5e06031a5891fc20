"""Where the DiT's blocks go, decided once before any weight is read (issue 15).

`place_dit` turns the `weights` mode ("auto" | "resident" | "stream", `options.WEIGHTS_MODES`)
into a `LayerResidency` (or None: every block on the device) from the free memory of the target
device, for the job the model is loaded for (`PlacementTarget`: output size and owned steps), then
runs the loading preflight (`memory.load_estimate` with that residency) so that a model that
cannot even be loaded stops here with the numbers. Loading (`official.build_dit_from_source`)
follows the decision block by block: resident blocks on the device, streamed ones packed into
pinned host memory as they arrive.

On a CPU device nothing is measured: "stream" keeps the first half of the blocks "resident" and
streams the rest (the same code path and bookkeeping as on a GPU; tests), the other modes keep
every block resident.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import DiTConfig
from ..models.layer_stream import LayerResidency
from ..options import resolve_weights_mode

log = logging.getLogger(__name__)

DEFAULT_BUFFERS = 3  # device slots of the layer stream (prefetch depth + 1)


@dataclass(frozen=True)
class PlacementTarget:
    """The job a model is placed for: `width` x `height` pixels, `steps` denoising steps owned by
    this device, decoded here (`decode_here`), beside `other_bytes` of other components on the
    device (set by the loaders). The loader nodes do not know the size yet: they place for the
    reference's default 704*384 with 4 steps."""

    width: int = 704
    height: int = 384
    steps: int = 4
    decode_here: bool = True
    other_bytes: int = 0  # device bytes of what stays loaded beside the DiT and the VAE (the wav2vec2 encoder)


def place_dit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, fp8: bool, mode: str = "auto",
              target: PlacementTarget = PlacementTarget(), buffers: int = DEFAULT_BUFFERS,
              layers: range | None = None) -> LayerResidency | None:
    """The DiT's placement for `target` on `device` (None: every block resident), checked against
    the loading preflight. Raises MemoryError (numbers and remedies) when nothing fits, ValueError
    for an unknown mode. Logs the decision once. `layers`: a layer slice of a sharded worker rank:
    always resident (streaming is whole-model only), only the slice's weights checked."""
    from ..pipeline.memory import (GIB, block_bytes, check_fits, device_free, fits, load_estimate, memory_error,
                                   place_layers)

    mode = resolve_weights_mode(mode)
    if layers is not None:
        if mode == "stream":
            raise ValueError("weights: 'stream' is whole-model only; a layer slice keeps its layers resident")
        check_fits(device, load_estimate(cfg, dtype, fp8, layers=layers),
                   f"loading the DiT weights (layers {layers.start}-{layers.stop - 1})")
        return None
    if device.type != "cuda":
        res = LayerResidency(cfg.num_layers // 2, 0, buffers) if mode == "stream" else None
    else:
        free, total = device_free(device)
        free -= target.other_bytes  # loaded beside the DiT for the whole job
        beside = f" beside the audio encoder ({target.other_bytes / GIB:.2f} GiB)" if target.other_bytes else ""
        res = place_layers(cfg, target.width, target.height, target.steps, free, total, mode=mode, dtype=dtype,
                           fp8=fp8, decode_here=target.decode_here, buffers=buffers, device=device,
                           what=f"generating at {target.width}x{target.height} with {target.steps} steps{beside}")
        load = load_estimate(cfg, dtype, fp8, res)
        if not fits(load, free):
            raise memory_error(load, free, total, device, "loading the DiT weights" + beside)
    if res is None:
        log.info("DiT placement (weights=%s): all %d layers resident on %s", mode, cfg.num_layers, device)
    else:
        streamed = (cfg.num_layers - res.weights) * block_bytes(cfg, dtype, fp8)
        job = f"for {target.width}x{target.height}, {target.steps} steps" if device.type == "cuda" else "CPU: half"
        log.info("DiT placement (weights=%s, %s): %s; %.2f GiB (%d bytes) streamed from %s host memory", mode, job,
                 res.describe(cfg.num_layers), streamed / GIB, streamed, "pinned" if device.type == "cuda" else "CPU")
    return res


__all__ = ["PlacementTarget", "place_dit", "DEFAULT_BUFFERS"]
