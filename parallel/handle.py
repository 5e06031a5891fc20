"""`open_worker_group`: a worker group with the same call shape as an in-process `LiveAvatar`.

Every DiT rank encodes its own conditioning (as the reference does), so the encode methods here
return light descriptors (the prompt string, the 16 kHz audio with its frame count, the PIL image
with its resolved size) and `generate` ships them to the group as one job. Blocks stream back as
`DecodedBlock`s while the ranks work.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from liveavatar.config import DEFAULT_STREAM
from liveavatar.pipeline.payloads import AudioRef, ImageRef, PoseRef, PromptRef  # noqa: F401 (re-exported)
from liveavatar.sizes import DEFAULT_MODE as DEFAULT_SIZE_MODE
from liveavatar.sizes import OutputSize

log = logging.getLogger("liveavatar.parallel")


def schedule_for(mode: str, devices: list[str], steps: int, need: Any, num_layers: int | None = None) -> Any:
    """The Schedule for a user's gpu mode: auto (memory-driven), single, tpp (K = min(devices,
    steps) DiT ranks, plus a decode rank when a device is left over), or layers (every device
    holds a slice of the DiT's `num_layers` layers, checked here before any process starts)."""
    from parallel.schedule import make_schedule, visible_devices

    if mode in ("auto", ""):
        infos = [d for d in visible_devices() if d.device in devices] if devices else None
        return make_schedule("auto", steps, device_infos=infos, need=need)
    if mode == "single":
        return make_schedule("single", steps, devices=devices[:1])
    if mode == "tpp":
        if len(devices) < 2:
            raise ValueError("devices: gpu_mode 'tpp' needs at least 2 devices (e.g. '0,1')")
        dit_ranks = min(len(devices), steps)
        separate = len(devices) > steps  # one spare GPU decodes, as the reference's 5th GPU
        return make_schedule("tpp", steps, num_ranks=dit_ranks, separate_decode=separate,
                             devices=devices[:dit_ranks + int(separate)])
    if mode == "layers":
        if len(devices) < 2:
            raise ValueError("devices: gpu_mode 'layers' needs at least 2 devices (e.g. '0,1')")
        return make_schedule("layers", steps, num_ranks=len(devices), devices=devices, num_layers=num_layers)
    raise ValueError(f"mode: {mode!r} is not one of auto, single, tpp, layers")


class GroupModel:
    """Drives a `parallel.group.GroupManager`; a `liveavatar.pipeline.payloads.Backend`, as
    `LiveAvatar`, whose encode steps return the light payloads (`PromptRef`, `AudioRef`,
    `ImageRef`, `PoseRef`) the ranks encode for themselves."""

    def __init__(self, engine_config: dict, devices: list[str], mode: str, steps: int = 4,
                 config_overrides: dict | None = None):
        from parallel.group import GroupManager

        self.engine_config = engine_config
        self.devices = devices
        self.mode = mode
        self.steps = steps
        self.overrides = dict(config_overrides or {})
        self.manager = GroupManager()
        self.stream = DEFAULT_STREAM  # the ranks' LiveAvatar models stream with the default constants

    def _config(self, steps: int, width: int, height: int) -> Any:
        from parallel.group import GroupConfig

        need = None
        num_layers = None
        if self.mode == "layers":  # the split is checked before any process starts
            from parallel.engine import dit_num_layers

            num_layers = dit_num_layers(self.engine_config)
        try:
            from liveavatar.config import DiTConfig
            from parallel.engine import memory_need

            if "ckpt_dir" in self.engine_config:
                from liveavatar.pipeline.model import resolve_dtype

                cfg = DiTConfig.from_json(self.engine_config["ckpt_dir"])
                need = memory_need(cfg, width, height, dtype=resolve_dtype(self.engine_config.get("dtype", "bf16")),
                                   fp8=bool(self.engine_config.get("fp8")))
        except Exception as exc:  # the estimate only guides 'auto'; never block a job on it
            log.debug("memory estimate unavailable: %s", exc)
        sched = schedule_for(self.mode, self.devices, steps, need, num_layers)
        log.info("worker group schedule: %s", getattr(sched, "reason", sched))
        return GroupConfig(schedule=sched, engine="parallel.engine:LiveAvatarEngine",
                           engine_config=self.engine_config, **self.overrides)

    # --- the LiveAvatar call shape
    def encode_prompt(self, prompt: str) -> PromptRef:
        if not isinstance(prompt, str):
            raise ValueError("prompt: worker groups take the prompt text (each rank runs umT5 itself)")
        return PromptRef(prompt)

    def encode_audio(self, audio: Any) -> AudioRef:
        from liveavatar.media.audio import num_video_frames

        n = num_video_frames(audio, fps=self.stream.fps)
        if n < 1:
            raise ValueError(f"audio: {audio.duration_s:.3f} s is shorter than one video frame")
        return AudioRef(audio, n)

    def prepare_image(self, image: Any, size: "OutputSize | str", size_mode: str = DEFAULT_SIZE_MODE) -> ImageRef:
        """size: an `OutputSize` resolved by the caller, or a size text resolved here with `size_mode`."""
        from liveavatar.sizes import resolve_size

        return ImageRef(image, resolve_size(image.size, size, size_mode))

    def encode_pose(self, path: Any, image: ImageRef, num_frames: int) -> PoseRef:
        """The pose video for `generate(pose_cond=...)`: every DiT rank encodes it when the job
        starts (same latents as `LiveAvatar.encode_pose`; nothing big crosses the channel)."""
        from pathlib import Path

        p = Path(path).expanduser().resolve()
        if not p.is_file():
            raise ValueError(f"pose video: no file at {p}")
        return PoseRef(str(p))

    def generate(self, context: Any, audio: AudioRef, image: ImageRef, *, seed: int = 0, steps: int = 4,
                 num_clip: int | None = None, progress: Callable[[dict], None] | None = None,
                 cancel: Callable[[], bool] | None = None, sink_refresh: bool = True,
                 pose_cond: Any = None, kv_offload: bool | None = None, kv_prefetch: bool | None = None,
                 kv_fp8: bool = False,
                 **_: Any) -> Iterator[Any]:
        from liveavatar.options import CachePolicy
        from parallel.engine import make_job

        prompt = context.prompt if isinstance(context, PromptRef) else context
        if not isinstance(prompt, str):
            raise ValueError("text: worker groups need the prompt text, not precomputed embeddings")
        pose_video = pose_cond.path if isinstance(pose_cond, PoseRef) else None
        job = make_job(image.image, audio.audio, prompt, size=image.size, seed=seed, steps=steps,
                       num_clip=num_clip, sink_refresh=sink_refresh, pose_cond=None if pose_video else pose_cond,
                       pose_video=pose_video, cache=CachePolicy(kv_offload, kv_prefetch, bool(kv_fp8)))
        from liveavatar.pipeline.conditioning import GenerationCancelled

        cfg = self._config(steps, image.width, image.height)
        handle = self.manager.get(cfg).submit(job)
        for item in handle.frames(cancel):
            blk = item.frames
            if progress is not None:
                progress({"event": "block", "block": blk.index, "total_blocks": blk.total_blocks,
                          "frames": blk.frames.shape[0], "timings": getattr(blk, "timings", {})})
            yield blk
        if handle.result is not None and handle.result.status == "cancelled":
            raise GenerationCancelled("generation cancelled (worker group stopped the job)")

    def close(self) -> None:
        self.manager.close()


def open_worker_group(kind: str, devices: list[str], mode: str = "auto", **kwargs: Any) -> GroupModel:
    """Start (lazily, on the first job) a worker group for a checkpoint folder or single files.

    kind: "checkpoint" (kwargs: ckpt_dir, lora, ...) or "files" (dit, t5, vae, wav2vec,
    tokenizer_dir, lora, ...). devices: e.g. ["cuda:0", "cuda:1"]. mode: auto / single / tpp / layers.
    Other kwargs: lora_strength, dtype, fp8, attn, compile (as `LiveAvatar.from_checkpoint`).
    """
    common = {k: kwargs.pop(k) for k in ("lora_strength", "dtype", "fp8", "attn", "compile") if k in kwargs}
    kwargs.pop("device", None)
    if kind == "checkpoint":
        engine_config = {"ckpt_dir": str(kwargs.pop("ckpt_dir")), "lora": kwargs.pop("lora", None), **common}
    elif kind == "files":
        files = {k: (str(v) if v is not None else None) for k, v in kwargs.items()}
        engine_config = {"files": files, **common}
    else:
        raise ValueError(f"kind: {kind!r} is not 'checkpoint' or 'files'")
    devices = [d if str(d).startswith(("cuda", "cpu")) else f"cuda:{d}" for d in devices]
    return GroupModel(engine_config, devices, mode)
