"""Our model inside ComfyUI's model management (`comfy.model_management`).

- Before we load or run, ComfyUI frees only what our job needs: `free_memory(bytes, device)` for
  a load or a worker group (their weights live in other processes), and for an in-process model
  `load_models_gpu([patcher], memory_required=job bytes)`, which frees other models as needed and
  puts our DiT back on the GPU if ComfyUI had taken it.
- ComfyUI can take our VRAM back: the in-process model is registered as a loaded model through
  `LiveAvatarPatcher`, the part of ComfyUI's `ModelPatcher` interface that `LoadedModel` and
  `free_memory` use. When ComfyUI needs memory for another model (or `/free` unloads models), it
  calls `partially_unload` / `detach` and our DiT weights move to ComfyUI's offload device (the
  host); the next run reloads them. All or nothing: our DiT runs with every layer on one device.
- `fit_in_comfy`: size=auto / kv_dtype auto for a loaded model, on the memory ComfyUI could give.
- `status()`: what `/liveavatar/status` answers (which models are live, registered, where the
  DiT weights are).

Outside ComfyUI (tests, scripts) every function here does nothing.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger("liveavatar.nodes")


def _mm():
    """`comfy.model_management`, or None outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return None
    return mm


class LiveAvatarPatcher:
    """A loaded in-process `LiveAvatar`'s DiT as ComfyUI's model management sees it.

    `model` is the DiT module (ComfyUI keeps a weak reference and a finalizer on it); sizes are
    the DiT's bytes; loading and unloading move all of its weights (`LiveAvatar.place_dit`).
    """

    def __init__(self, live: Any, load_device: torch.device, offload_device: torch.device) -> None:
        self.live = live
        self.model = live.dit
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.parent = None
        self.size = int(live.dit_bytes)
        self.loaded = live.dit_device == self.load_device
        self.offloads = 0  # how many times ComfyUI took our weights back (status)

    # --- what comfy.model_management.LoadedModel / free_memory / load_models_gpu call
    def model_size(self) -> int:
        return self.size

    def loaded_size(self) -> int:
        return self.size if self.loaded else 0

    def current_loaded_device(self) -> torch.device:
        return self.load_device if self.loaded else self.offload_device

    def model_dtype(self) -> torch.dtype:
        return self.live.dtype

    def model_patches_to(self, _device_or_dtype: Any) -> None:
        """No patches (LoRA is merged at load)."""

    def model_patches_models(self) -> list:
        return []

    def lowvram_patch_counter(self) -> int:
        return 0

    def is_clone(self, other: Any) -> bool:
        return getattr(other, "model", None) is self.model

    def partially_load(self, device_to: torch.device, extra_memory: float = 0, force_patch_weights: bool = False) -> int:
        """Put every DiT weight on `device_to` (ComfyUI's budget is ignored: all or nothing);
        returns the bytes loaded."""
        if self.loaded:
            return 0
        self.live.place_dit(device_to)
        self.loaded = True
        log.info("LiveAvatar: DiT weights back on %s (%.1f GiB)", device_to, self.size / 2**30)
        return self.size

    def partially_unload(self, device_to: torch.device, memory_to_free: float = 0) -> int:
        """ComfyUI needs memory: every DiT weight goes to `device_to`; returns the bytes freed."""
        return self._offload(device_to)

    def detach(self, unpatch_all: bool = True) -> Any:
        """ComfyUI unloads the model: the weights go to the offload device. `unpatch_all=False`
        is `load_models_gpu` re-listing the same model (it detaches every clone first, ours
        included): nothing moves, as for ComfyUI's own ModelPatcher."""
        if unpatch_all:
            self._offload(self.offload_device)
        return self.model

    def _offload(self, device_to: torch.device) -> int:
        if not self.loaded or self.live is None:
            return 0
        self.live.place_dit(device_to)
        self.loaded = False
        self.offloads += 1
        log.info("LiveAvatar: ComfyUI took the GPU memory back; DiT weights moved to %s (%.1f GiB)",
                 device_to, self.size / 2**30)
        return self.size


def free_for(devices: tuple[str, ...], nbytes: int) -> None:
    """Ask ComfyUI to free `nbytes` on every device (its own models only; our load or a worker
    group's job). Not `unload_all_models`: only what is needed."""
    mm = _mm()
    if mm is None or nbytes <= 0:
        return
    for d in devices:
        dev = torch.device(d)
        if dev.type == "cpu":
            continue
        try:
            mm.free_memory(int(nbytes), dev)
        except (RuntimeError, AttributeError) as exc:  # a model that refuses to unload: go ahead
            log.warning("ComfyUI could not free %.1f GiB on %s (%s: %s)", nbytes / 2**30, dev, type(exc).__name__, exc)


def register(live: Any) -> LiveAvatarPatcher | None:
    """Register a freshly loaded in-process model with ComfyUI (None outside ComfyUI or without a DiT)."""
    mm = _mm()
    if mm is None or getattr(live, "dit", None) is None:
        return None
    patcher = LiveAvatarPatcher(live, live.device, mm.unet_offload_device())
    mm.load_models_gpu([patcher])
    return patcher


def ensure_loaded(patcher: LiveAvatarPatcher, job_bytes: int) -> None:
    """Before a run: ComfyUI frees what our job needs besides our weights (`job_bytes`) and what an
    offloaded DiT needs, then our DiT is (back) on its device."""
    mm = _mm()
    if mm is None:
        return
    mm.load_models_gpu([patcher], memory_required=int(job_bytes))
    if not patcher.loaded:  # e.g. ComfyUI in a no-VRAM mode decided not to load it: we need it
        patcher.partially_load(patcher.load_device)


def unregister(patcher: LiveAvatarPatcher | None) -> None:
    """Forget a closed model: out of ComfyUI's loaded models, no references kept."""
    mm = _mm()
    if patcher is None:
        return
    if mm is not None:
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            loaded = mm.current_loaded_models[i]
            if loaded.model is patcher:
                if loaded.model_finalizer is not None:
                    loaded.model_finalizer.detach()
                mm.current_loaded_models.pop(i)
    patcher.live = patcher.model = None
    patcher.loaded = False


def is_registered(patcher: LiveAvatarPatcher | None) -> bool:
    mm = _mm()
    return mm is not None and patcher is not None and any(m.model is patcher for m in mm.current_loaded_models)


def freeable(devices: tuple[str, ...], keep: LiveAvatarPatcher | None = None) -> list[int]:
    """Bytes a job could have on each device: free now plus what ComfyUI could free (its other
    loaded models on that device; not `keep`). A CPU device: the host's available memory.
    Outside ComfyUI: the free memory (`pipeline.fit.measure_free`)."""
    from liveavatar.pipeline.fit import measure_free

    free, _ = measure_free(devices)
    mm = _mm()
    if mm is None:
        return free
    out = []
    for d, f in zip(devices, free):
        dev = torch.device(d)
        if dev.type == "cpu":
            out.append(f)
            continue
        others = sum(m.model_loaded_memory() for m in mm.current_loaded_models
                     if m.device == dev and m.model is not None and m.model is not keep)
        out.append(int(mm.get_free_memory(dev)) + int(others))
    return out


def fit_in_comfy(handle: Any, *, size: tuple[int, int] | None, image_wh: tuple[int, int] | None = None,
                 size_mode: str = "area", steps: int = 4, kv_fp8: bool | None = False):
    """`pipeline.fit.fit_job` for a loaded model: its precision fixed, its DiT already resident,
    the memory ComfyUI could give (`freeable`) on its devices; KV offload auto. size None: size=auto."""
    from liveavatar.pipeline.fit import fit_job

    devices = handle.spec.placement.devices
    free = freeable(devices, keep=handle.patcher)
    return fit_job(handle.dit_config, free, size=size, image_wh=image_wh, size_mode=size_mode, steps=steps,
                   weights_fp8=bool(handle.spec.fp8), kv_fp8=kv_fp8, kv_offload=None, devices=list(devices),
                   weights_loaded=True)


def add_status_route(status: Callable[[], dict]) -> None:
    """GET /liveavatar/status: `status()` as JSON (the live models: `nodes.handle.status`). Registered once."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
    if routes is None or getattr(add_status_route, "done", False):
        return

    @routes.get("/liveavatar/status")
    async def _status(_request):
        return web.json_response(status())

    add_status_route.done = True


__all__ = ["LiveAvatarPatcher", "free_for", "freeable", "fit_in_comfy", "register", "ensure_loaded", "unregister", "is_registered",
           "add_status_route"]
