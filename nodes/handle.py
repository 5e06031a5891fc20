"""The live model behind a LIVEAVATAR_MODEL socket, and the cache that keeps it alive.

`LiveAvatarHandle` wraps one backend with the library's call shape:

- in-process: `liveavatar.pipeline.LiveAvatar` on one device (mode "single");
- a worker group from `parallel/` over several GPUs (mode "tpp", or "auto" with several devices).

Both expose `encode_prompt`, `encode_audio`, `prepare_image` and the block iterator `generate`.
The loader nodes go through `get_or_open(spec)`: while the loader inputs (and the files' sizes and
modification times) are unchanged, every queue item gets the same live handle, so weights load
once and worker processes stay up. A new spec closes the previous handle first (one model at a
time), so switching checkpoints does not hold two 14B models.

Importable without ComfyUI; `comfy.model_management` is used only when it is importable.

The backend contract (what the nodes call) and the payloads that travel between the nodes are
written as types in `liveavatar.pipeline.payloads` (`Backend`, `TextPayload`, `AudioPayload`,
`ImagePayload`); both backends satisfy them.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from . import comfy_memory
from .errors import LiveAvatarInputError

log = logging.getLogger("liveavatar.nodes")

from liveavatar.options import PRECISIONS as _PRECISIONS
from liveavatar.options import GPU_MODES, Precision, parse_gpus
from liveavatar.sizes import DEFAULT_MODE as DEFAULT_SIZE_MODE

MODES = GPU_MODES  # auto, single, tpp, layers (the worker-group layouts: parallel.schedule)
PRECISIONS = tuple(_PRECISIONS)  # the loader's choices: bf16, fp8 (bf16 + fp8 linears, tensor scaling), fp8_row, ...


@dataclass(frozen=True)
class Placement:
    """Where the model runs: `mode` "single" (one device, in-process), "tpp" or "layers" (worker
    group: each GPU owns denoising steps, or a slice of the DiT's layers).

    `requested` is the loader's gpu_mode ("auto" lets the worker group pick its layout, e.g. 4 DiT
    ranks + 1 decode rank, or fewer GPUs when they do not all fit).
    """

    mode: str
    devices: tuple[str, ...]
    requested: str = "auto"


def _default_device() -> str:
    """ComfyUI's torch device when running inside ComfyUI, else cuda:0 / cpu."""
    try:
        import comfy.model_management as mm

        dev = mm.get_torch_device()
        if dev.type == "cuda":
            return f"cuda:{dev.index or 0}"
        return str(dev.type)
    except Exception:  # outside ComfyUI (tests, scripts)
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_placement(devices: str, mode: str, *, node: str = "LiveAvatar Model Loader",
                    cuda_count: int | None = None, default_device: str | None = None) -> Placement:
    """Turn the loader's `devices` text and `gpu_mode` into a checked `Placement`.

    devices: "auto" (ComfyUI's device; with mode "tpp" every visible GPU), "cpu", "cuda",
    "cuda:1", or a comma list: "0,1,2,3,4" or "cuda:0, cuda:1".
    mode: "auto" (a worker group when several devices are listed, its layout picked from the free
    memory; else single), "single", "tpp", "layers".
    """
    if mode not in MODES:
        raise LiveAvatarInputError(node, "gpu_mode", f"{mode!r} is not one of {', '.join(MODES)}")
    count = _cuda_count() if cuda_count is None else cuda_count
    text = (devices or "auto").strip().lower()
    if text == "auto":
        if mode in ("tpp", "layers"):
            if count < 2:
                raise LiveAvatarInputError(node, "devices", f"gpu_mode '{mode}' needs at least 2 GPUs, "
                                           f"{count} visible; use gpu_mode 'single'")
            devs = tuple(f"cuda:{i}" for i in range(count))
        else:
            devs = (default_device or _default_device(),)
    else:
        items = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
        if not items:
            raise LiveAvatarInputError(node, "devices", "empty; write 'auto', 'cpu', 'cuda:0' or '0,1,2,3,4'")
        if "cpu" in items:
            if set(items) != {"cpu"}:
                raise LiveAvatarInputError(node, "devices", "'cpu' cannot be combined with GPUs")
            devs = tuple(items)  # "cpu": this process; "cpu,cpu": CPU worker ranks (gloo; tests, development)
        else:
            try:
                devs = parse_gpus(",".join(items), count)
            except ValueError as exc:
                raise LiveAvatarInputError(node, "devices", str(exc).removeprefix("gpus: ")) from None
    chosen = mode if mode != "auto" else ("tpp" if len(devs) > 1 else "single")
    if chosen == "single" and len(devs) != 1:
        raise LiveAvatarInputError(node, "devices", f"gpu_mode 'single' runs on one device, got "
                                   f"{len(devs)} ({', '.join(devs)}); use gpu_mode 'tpp' or 'auto'")
    if chosen in ("tpp", "layers") and len(devs) < 2:
        raise LiveAvatarInputError(node, "gpu_mode", f"'{chosen}' needs at least 2 GPUs, devices gives "
                                   f"{', '.join(devs)}; list GPUs like '0,1,2,3,4' or use 'single'")
    return Placement(chosen, devs, mode)


def precision_options(precision: str, node: str = "LiveAvatar Model Loader") -> Precision:
    """Loader `precision` -> the library's `Precision` (dtype, fp8 scaling or None)."""
    if precision not in PRECISIONS:
        raise LiveAvatarInputError(node, "precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    return _PRECISIONS[precision]


@dataclass(frozen=True)
class LoadSpec:
    """Everything that decides which model is loaded, where, and how (the cache key).

    kind: "checkpoint" (`paths["ckpt_dir"]`) or "files" (`paths` dit/t5/vae/wav2vec).
    lora: path or None; stamps: (path, size, mtime) of every file involved.
    """

    kind: str
    paths: tuple[tuple[str, str], ...]
    lora: str | None
    lora_strength: float
    dtype: str
    fp8: str | None  # the fp8 scaling, None: off
    attn: str
    compile: bool
    placement: Placement
    stamps: tuple[tuple[str, int, float], ...] = field(default=(), compare=True)
    weights: str = "auto"  # DiT placement in-process (`options.WEIGHTS_MODES`); worker groups: resident

    def library_kwargs(self, device: str) -> dict[str, Any]:
        kw: dict[str, Any] = dict(self.paths)
        kw.update(lora=self.lora, lora_strength=self.lora_strength, device=device, dtype=self.dtype,
                  fp8=self.fp8, attn=self.attn, compile=self.compile)
        return kw

    def describe(self) -> str:
        where = ", ".join(self.placement.devices)
        src = dict(self.paths).get("ckpt_dir") or dict(self.paths).get("dit", "?")
        extra = f" + fp8 {self.fp8}" if self.fp8 else ""
        return (f"{os.path.basename(str(src).rstrip('/'))} ({self.dtype}{extra}, attn {self.attn}, "
                f"{self.placement.mode} on {where})")


def file_stamps(paths: list[str]) -> tuple[tuple[str, int, float], ...]:
    """(path, size, mtime) of files, and of every file directly inside directories."""
    out = []
    for p in paths:
        if p is None:
            continue
        targets = [p]
        if os.path.isdir(p):
            targets = sorted(os.path.join(p, n) for n in os.listdir(p))
        for t in targets:
            try:
                st = os.stat(t)
            except OSError:
                continue
            out.append((t, int(st.st_size), float(st.st_mtime)))
    return tuple(out)


class LiveAvatarHandle:
    """A loaded Live Avatar, in-process or as a worker group, with the library's call shape."""

    def __init__(self, backend: Any, spec: LoadSpec) -> None:
        self.backend = backend
        self.spec = spec
        self.closed = False
        self._refs: dict[int, tuple[weakref.ref, Any]] = {}
        self.patcher = None  # the in-process model as ComfyUI's model management sees it (comfy_memory)

    @property
    def mode(self) -> str:
        return self.spec.placement.mode

    @property
    def text_dim(self) -> int | None:
        """Channels of the text conditioning the DiT expects (None when unknown)."""
        for path in ("text_dim", "config.text_dim", "dit.config.text_dim", "dit.cfg.text_dim"):
            obj: Any = self.backend
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, int):
                return obj
        return None

    @property
    def dit_config(self) -> Any:
        """The DiT's config (a worker group's ranks hold it: the 14B config)."""
        from liveavatar.config import DiTConfig

        dit = getattr(self.backend, "dit", None)
        return dit.cfg if dit is not None else DiTConfig()

    def _live(self) -> Any:
        if self.closed or self.backend is None:
            raise RuntimeError("this LiveAvatar model was unloaded (another model was loaded after it); "
                               "queue the workflow again so the loader runs")
        return self.backend

    def encode_prompt(self, prompt: str):
        return self._live().encode_prompt(prompt)

    def encode_audio(self, audio: Any):
        return self._live().encode_audio(audio)

    def encode_audio_states(self, states: Any, audio: Any):
        """Native wav2vec2 hidden states `[n_states, T, C]` (50/s) + the 16 kHz audio -> conditioning."""
        backend = self._live()
        fn = getattr(backend, "audio_conditioning_from_states", None)
        if fn is None:
            raise LiveAvatarInputError(
                "LiveAvatar Audio Encode", "audio_encoder_output",
                "this version of the library cannot take ComfyUI's AUDIO_ENCODER_OUTPUT yet; "
                "leave it unconnected (the model's own wav2vec2 encodes the audio)")
        return fn(states, audio)

    def prepare_image(self, image: Any, size: Any, size_mode: str = DEFAULT_SIZE_MODE):
        """`size`: an `OutputSize` resolved by the caller, or a size text resolved with `size_mode`."""
        return self._live().prepare_image(image, size, size_mode=size_mode)

    def generate(self, context: Any, audio: Any, image: Any, **kwargs: Any) -> Iterator[Any]:
        backend = self._live()
        self._make_room(backend, image, kwargs)
        if "reference" not in kwargs and callable(getattr(backend, "encode_reference", None)):
            kwargs["reference"] = self._reference_latents(backend, image)
        return backend.generate(context, audio, image, **kwargs)

    def _make_room(self, backend: Any, image: Any, kwargs: dict) -> None:
        """Before a job: ComfyUI frees what the job needs (its caches and activations; for an
        in-process model also our DiT weights if ComfyUI had moved them to the host)."""
        from liveavatar.pipeline.memory import estimate_memory

        need = estimate_memory(self.dit_config, image.width, image.height, steps_owned=int(kwargs.get("steps", 4)),
                               param_counts=(0, 0), kv_fp8=bool(kwargs.get("kv_fp8")),
                               kv_offload=bool(kwargs.get("kv_offload"))).total
        if self.patcher is not None:
            comfy_memory.ensure_loaded(self.patcher, need)
        else:
            comfy_memory.free_for(self.spec.placement.devices, need)

    def _reference_latents(self, backend: Any, image: Any) -> Any:
        """VAE latents of the reference image, encoded once per ImageConditioning object.

        ComfyUI keeps the Reference Image node's output between queue items, so a new seed or
        prompt skips this encode (73 frames through the VAE). Copies are handed out: a job may
        not change the cached tensors.
        """
        key = id(image)
        hit = self._refs.get(key)
        if hit is None or hit[0]() is not image:
            if len(self._refs) >= 4:
                self._refs.clear()
            hit = (weakref.ref(image), backend.encode_reference(image))
            self._refs[key] = hit
        lat = hit[1]
        return dataclasses.replace(lat, **{f.name: getattr(lat, f.name).clone()
                                           for f in dataclasses.fields(lat)})

    def close(self) -> None:
        """Stop worker processes / drop weights. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._refs.clear()
        comfy_memory.unregister(self.patcher)
        self.patcher = None
        backend, self.backend = self.backend, None
        closer = getattr(backend, "close", None)
        if callable(closer):
            try:
                closer()
            except Exception as exc:  # never let cleanup hide the real work
                log.warning("closing the previous LiveAvatar model failed: %s", exc)
        del backend
        gc.collect()
        _empty_cache()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "live"
        return f"LiveAvatarHandle({self.spec.describe()}, {state})"


def _empty_cache() -> None:
    try:
        import comfy.model_management as mm

        mm.soft_empty_cache()
        return
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _load_bytes(spec: LoadSpec) -> int:
    """GPU bytes of loading `spec` on each of its devices (`memory.load_estimate`: the DiT in its
    precision + the VAE), from the checkpoint's config (single files: the 14B config)."""
    from liveavatar.config import DiTConfig
    from liveavatar.pipeline.memory import load_estimate
    from liveavatar.pipeline.model import resolve_dtype

    cfg = DiTConfig()
    paths = dict(spec.paths)
    try:
        if spec.kind == "checkpoint":
            from liveavatar.loading.official import find_official_checkpoint

            cfg = find_official_checkpoint(paths["ckpt_dir"], lora=spec.lora if spec.lora != "none" else None).config
        elif paths.get("config"):
            cfg = DiTConfig.from_json(paths["config"])
    except (OSError, ValueError):  # the loader reports a broken checkpoint itself, with its message
        pass
    return load_estimate(cfg, resolve_dtype(spec.dtype), bool(spec.fp8)).total


def _open_in_process(spec: LoadSpec):
    from liveavatar.pipeline import LiveAvatar

    kw = spec.library_kwargs(spec.placement.devices[0])
    kw["weights"] = spec.weights
    if spec.kind == "checkpoint":
        ckpt = kw.pop("ckpt_dir")
        return LiveAvatar.from_checkpoint(ckpt, **kw)
    return LiveAvatar.from_files(**kw)


def _open_worker_group(spec: LoadSpec):
    try:
        import parallel
    except ImportError as exc:
        raise RuntimeError(f"gpu_mode 'tpp' needs the pack's parallel/ package ({exc})") from exc
    opener: Callable[..., Any] | None = getattr(parallel, "open_worker_group", None)
    if opener is None:
        raise LiveAvatarInputError("LiveAvatar Model Loader", "gpu_mode",
                                   "multi-GPU worker groups are not available in this install "
                                   "(parallel.open_worker_group missing); use gpu_mode 'single'")
    kw = spec.library_kwargs(spec.placement.devices[0])
    kw.pop("device")
    return opener(kind=spec.kind, devices=list(spec.placement.devices), mode=spec.placement.requested, **kw)


_lock = threading.Lock()
_live: dict[LoadSpec, LiveAvatarHandle] = {}


def get_or_open(spec: LoadSpec, opener: Callable[[LoadSpec], Any] | None = None) -> LiveAvatarHandle:
    """The live handle for `spec`: reused when already open, else the old one closes and this loads."""
    with _lock:
        handle = _live.get(spec)
        if handle is not None and not handle.closed:
            return handle
        for old in list(_live.values()):
            old.close()
        _live.clear()
        if any(d != "cpu" for d in spec.placement.devices):  # ComfyUI frees what our load needs
            comfy_memory.free_for(spec.placement.devices, _load_bytes(spec))
        if opener is None:
            opener = _open_in_process if spec.placement.mode == "single" else _open_worker_group
        log.info("LiveAvatar: loading %s", spec.describe())
        # ComfyUI runs nodes under torch.inference_mode(); weights made there would be inference
        # tensors (no version counter, no in-place updates outside inference mode). Load as
        # ordinary tensors: generation still runs under inference mode.
        import torch

        with torch.inference_mode(False):
            backend = opener(spec)
        handle = LiveAvatarHandle(backend, spec)
        if spec.placement.mode == "single":  # ComfyUI may take this model's VRAM back when it needs it
            handle.patcher = comfy_memory.register(backend)
        _live[spec] = handle
        return handle


def status() -> dict:
    """The live models for `/liveavatar/status`: spec, devices, whether ComfyUI's model management
    has the model registered, whether the DiT weights are loaded on their device, where they are."""
    with _lock:
        models = []
        for handle in _live.values():
            p, backend = handle.patcher, handle.backend
            dit_device = getattr(backend, "dit_device", None)
            models.append({"model": handle.spec.describe(), "mode": handle.mode, "closed": handle.closed,
                           "devices": list(handle.spec.placement.devices),
                           "registered": comfy_memory.is_registered(p),
                           "loaded": None if p is None else p.loaded,
                           "offloads": None if p is None else p.offloads,
                           "dit_bytes": None if p is None else p.size,
                           "dit_device": None if dit_device is None else str(dit_device)})
        return {"models": models}


def close_all() -> None:
    """Close every cached handle (tests, shutdown)."""
    with _lock:
        for h in list(_live.values()):
            h.close()
        _live.clear()


__all__ = [
    "MODES", "PRECISIONS", "Placement", "parse_placement", "precision_options", "LoadSpec",
    "file_stamps", "LiveAvatarHandle", "get_or_open", "close_all", "status",
]
