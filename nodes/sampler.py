"""Sampling nodes: a streamed mp4 as a native VIDEO (plus frames on request), or an mp4 in the output folder.

- `LiveAvatarSampler` streams every decoded block into a fragmented mp4 in ComfyUI's temp folder and
  returns it as a native VIDEO (file-backed: Save Video remuxes it, no frame in RAM, any length).
  With `keep_frames` on it also returns the frames as IMAGE, their AUDIO and the fps, for Create
  Video or image nodes on short clips (`video_out.plan_frames`: estimate vs `ram_limit_gb`).
- `LiveAvatarSaveMP4` writes each block to an mp4 (H.264 + AAC) in the output folder as soon as
  it is decoded: memory stays flat for any length, and an interrupted run leaves a playable file.
"""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import InputImpl, io, ui

from liveavatar.config import DEFAULT_STREAM
from liveavatar.options import DEFAULT_KV_DTYPE, KV_DTYPES, SEED_MAX

from .errors import LiveAvatarInputError
from .run import RunReport, run_generation, show_text
from .types import (CATEGORY_OUTPUT, CATEGORY_SAMPLING, LiveAvatarAudio, LiveAvatarImage, LiveAvatarModel,
                    LiveAvatarText)
from .video_out import FrameCollector, linked_outputs, plan_frames, temp_video_path

logger = logging.getLogger("liveavatar")

NUM_CLIP_MAX = 100000
FPS = DEFAULT_STREAM.fps  # the model's frame rate (StreamConfig.fps)
SAMPLE_RATE = DEFAULT_STREAM.sample_rate
RAM_LIMIT_GB = 8.0  # IMAGE frames of about 100 s at 704x384 (12 bytes per pixel)


def _sampling_inputs() -> list[io.Input]:
    return [
        LiveAvatarModel.Input("model", tooltip="The model from a LiveAvatar Model Loader."),
        LiveAvatarText.Input("text", tooltip="Prompt conditioning (LiveAvatar Text Encode)."),
        LiveAvatarAudio.Input("audio", tooltip="Driving audio (LiveAvatar Audio Encode); its length sets "
                                               "the video length."),
        LiveAvatarImage.Input("reference", tooltip="Reference image (LiveAvatar Reference Image); sets "
                                                   "identity and output size."),
        io.Int.Input("seed", default=0, min=0, max=SEED_MAX, step=1, control_after_generate=True,
                     tooltip="Noise seed: the same seed, inputs and step count give the same video."),
        io.Int.Input("steps", default=4, min=3, max=5, step=1,
                     tooltip="Denoising steps per block. 4 is what the LoRA was distilled for; 3 is faster, "
                             "5 slightly sharper."),
        io.Int.Input("num_clip", default=0, min=0, max=NUM_CLIP_MAX, step=1,
                     tooltip="Stop after this many 48-frame clips (1.92 s each); 0 = until the audio ends."),
    ]


def _kv_input() -> io.Input:
    """Last input of both nodes (optional: workflows saved before it keep their widget order)."""
    return io.Combo.Input("kv_dtype", options=[*KV_DTYPES, "auto"], default=DEFAULT_KV_DTYPE, optional=True,
                          tooltip="KV cache storage. bf16: the model dtype (default). fp8: one scale per token "
                                  "and head, about half the cache memory (small quality loss). auto: fp8 only "
                                  "when bf16 caches do not fit the memory ComfyUI can give.")


def _kv_fp8(node: str, model, reference, kv_dtype: str, steps: int) -> bool:
    """The sampler's kv_dtype resolved at the edge (auto: `pipeline.fit` at the reference's size)."""
    from liveavatar.options import resolve_kv_dtype

    if kv_dtype != "auto":
        try:
            return resolve_kv_dtype(kv_dtype)
        except ValueError as exc:
            raise LiveAvatarInputError(node, "kv_dtype", str(exc)) from None
    from liveavatar.pipeline.fit import NoFitError

    from .comfy_memory import fit_in_comfy

    try:
        fit = fit_in_comfy(model, size=(int(reference.width), int(reference.height)), steps=int(steps), kv_fp8=None)
    except NoFitError as exc:
        raise LiveAvatarInputError(node, "kv_dtype", str(exc)) from exc
    return fit.options.kv_fp8


def _check_inputs(node: str, model, text, audio, reference) -> None:
    from liveavatar.pipeline.payloads import AudioPayload, ImagePayload

    for name, value, kind in (("audio", audio, AudioPayload), ("reference", reference, ImagePayload)):
        if not isinstance(value, kind):
            raise LiveAvatarInputError(node, name, f"got {type(value).__name__}; connect the LiveAvatar "
                                       f"{'Audio Encode' if name == 'audio' else 'Reference Image'} node")
    in_process = getattr(model, "mode", "single") == "single"
    if text is None or (in_process and getattr(text, "ndim", None) != 2):
        raise LiveAvatarInputError(node, "text", "expected text conditioning [L, D]; connect LiveAvatar Text Encode")


def _stream_to_mp4(path: str, model, text, audio, reference, *, seed: int, steps: int, num_clip: int,
                   node_id: str | None, also=None, kv_fp8: bool = False) -> RunReport:
    """Generate and write every block to the mp4 at `path` as it is decoded (then hand it to `also`);
    the file is closed (playable) however the run ends."""
    from liveavatar.media.video_writer import VideoWriter

    writer = VideoWriter(path, int(reference.width), int(reference.height), fps=FPS, audio_rate=SAMPLE_RATE)

    def write(block) -> None:
        writer.write_frames(block.frames)
        writer.write_audio(block.audio)
        if also is not None:
            also(block)

    try:
        return run_generation(model, text, audio, reference, seed=seed, steps=steps, num_clip=num_clip,
                              on_block=write, node_id=node_id, kv_fp8=kv_fp8)
    finally:
        writer.close()


def _planned_frames(audio, num_clip: int) -> int:
    """Frames this job writes (the library's block plan: audio length, lead-in, num_clip cap)."""
    from liveavatar.pipeline.plan import make_plan

    plan = make_plan(int(audio.num_frames), DEFAULT_STREAM, num_clip=(int(num_clip) or None),
                     lead_in_frames=getattr(audio, "lead_in_frames", None))
    return plan.num_frames


class LiveAvatarSampler(io.ComfyNode):
    NAME = "LiveAvatar Sampler"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarSampler",
            display_name=cls.NAME,
            category=CATEGORY_SAMPLING,
            description="Generates the talking-avatar video block by block (live preview of each block), "
                        "streaming it into an mp4 returned as a VIDEO (for Save Video: flat memory, any "
                        "length). keep_frames also returns the frames and their audio for Create Video "
                        "(short clips: they are held in RAM).",
            inputs=[
                *_sampling_inputs(),
                io.Boolean.Input("keep_frames", default=False,
                                 tooltip="Also return the frames (IMAGE) and their audio, held in RAM (12 bytes "
                                         "per pixel: about 3.2 GB per 1000 frames at 704x384). Off: only the "
                                         "video output, whose frames stay on disk."),
                io.Float.Input("ram_limit_gb", default=RAM_LIMIT_GB, min=0.0, max=4096.0, step=0.5,
                               tooltip="With keep_frames: the most RAM the frames may take (GB). A longer "
                                       "job keeps no frames and warns, with the estimate; if the frames "
                                       "output is connected it is refused before generating."),
                _kv_input(),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="Video frames [N, H, W, 3] (keep_frames only)."),
                io.Audio.Output(display_name="audio", tooltip="The audio of exactly these frames (16 kHz mono; "
                                                              "keep_frames only)."),
                io.Float.Output(display_name="fps", tooltip=f"Frame rate ({FPS})."),
                io.Video.Output(display_name="video", tooltip="The streamed mp4 (H.264 + AAC, in ComfyUI's temp "
                                                              "folder) for Save Video: never held in RAM."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, text, audio, reference, seed: int, steps: int, num_clip: int,
                keep_frames: bool = False, ram_limit_gb: float = RAM_LIMIT_GB,
                kv_dtype: str = DEFAULT_KV_DTYPE) -> io.NodeOutput:
        _check_inputs(cls.NAME, model, text, audio, reference)
        kv_fp8 = _kv_fp8(cls.NAME, model, reference, kv_dtype, steps)
        hidden = cls.hidden
        node_id = getattr(hidden, "unique_id", None)
        width, height = int(reference.width), int(reference.height)
        frames = _planned_frames(audio, num_clip)
        samples = frames * SAMPLE_RATE // FPS
        plan = plan_frames(cls.NAME, bool(keep_frames), ram_limit_gb, frames, width, height, samples,
                           linked_outputs(getattr(hidden, "prompt", None), node_id))
        path = temp_video_path("LiveAvatar/sampler", width, height)
        logger.info("%s: streaming %d frames to %s (playable while it grows)", cls.NAME, frames, path)
        if plan.warning:
            logger.warning("%s: %s", cls.NAME, plan.warning)
        show_text("\n".join(filter(None, [f"writing {path}", plan.warning])), node_id)
        collector = FrameCollector(plan, width, height, samples, SAMPLE_RATE)
        report = _stream_to_mp4(path, model, text, audio, reference, seed=seed, steps=steps, num_clip=num_clip,
                                node_id=node_id, also=collector.add, kv_fp8=kv_fp8)
        if report.frames == 0:
            raise LiveAvatarInputError(cls.NAME, "audio", "no frames were generated; the audio is too short")
        image, samples = collector.outputs()
        shown = "\n".join(filter(None, [report.text(), plan.summary() if plan.keep else plan.warning]))
        if shown != report.text():
            show_text(shown, node_id)
        return io.NodeOutput(image, samples, float(report.fps), InputImpl.VideoFromFile(path),
                             ui=ui.PreviewText(shown))


class LiveAvatarSaveMP4(io.ComfyNode):
    NAME = "LiveAvatar Save MP4 (streaming)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarSaveMP4",
            display_name=cls.NAME,
            category=CATEGORY_OUTPUT,
            description="Generates the video and writes every block to an mp4 (H.264 + AAC) in the output folder "
                        "as soon as it is decoded: flat memory for any length; an interrupted run leaves a "
                        "playable file with the blocks done so far.",
            inputs=[
                *_sampling_inputs(),
                io.String.Input("filename_prefix", default="LiveAvatar/avatar",
                                tooltip="File name prefix inside the output folder (sub-folders allowed)."),
                _kv_input(),
            ],
            outputs=[
                io.Video.Output(display_name="video", tooltip="The written mp4 (for Get Video Components etc.)."),
                io.String.Output(display_name="filename", tooltip="Path of the mp4 relative to the output folder."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, text, audio, reference, seed: int, steps: int, num_clip: int,
                filename_prefix: str, kv_dtype: str = DEFAULT_KV_DTYPE) -> io.NodeOutput:
        _check_inputs(cls.NAME, model, text, audio, reference)
        kv_fp8 = _kv_fp8(cls.NAME, model, reference, kv_dtype, steps)
        width, height = int(reference.width), int(reference.height)
        try:
            folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
                filename_prefix, folder_paths.get_output_directory(), width, height)
        except Exception as exc:
            raise LiveAvatarInputError(cls.NAME, "filename_prefix", str(exc)) from exc
        file = f"{name}_{counter:05}_.mp4"
        path = os.path.join(folder, file)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        report = _stream_to_mp4(path, model, text, audio, reference, seed=seed, steps=steps, num_clip=num_clip,
                                node_id=node_id, kv_fp8=kv_fp8)
        rel = os.path.join(subfolder, file) if subfolder else file
        video = ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]).as_dict()
        return io.NodeOutput(InputImpl.VideoFromFile(path), rel,
                             ui={**video, **ui.PreviewText(report.text()).as_dict()})


__all__ = ["LiveAvatarSampler", "LiveAvatarSaveMP4"]
