"""Sampling nodes: frames + audio for native video nodes, or a streamed mp4 for long runs.

- `LiveAvatarSampler` collects every decoded block and returns native IMAGE frames, the AUDIO they
  were generated from and the fps, ready for Create Video -> Save Video. Memory grows with the
  video length (about 3 MB per 704x384 frame), so use it for short clips.
- `LiveAvatarSaveMP4` writes each block to an mp4 (H.264 + AAC) in the output folder as soon as
  it is decoded: memory stays flat for any length, and an interrupted run leaves a playable file.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import InputImpl, io, ui

from liveavatar.config import DEFAULT_STREAM
from liveavatar.options import SEED_MAX

from .convert import frames_to_image, samples_to_audio
from .errors import LiveAvatarInputError
from .run import run_generation
from .types import (CATEGORY_OUTPUT, CATEGORY_SAMPLING, LiveAvatarAudio, LiveAvatarImage, LiveAvatarModel,
                    LiveAvatarText)

NUM_CLIP_MAX = 100000
FPS = DEFAULT_STREAM.fps  # the model's frame rate (StreamConfig.fps)
SAMPLE_RATE = DEFAULT_STREAM.sample_rate


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


def _check_inputs(node: str, model, text, audio, reference) -> None:
    from liveavatar.pipeline.payloads import AudioPayload, ImagePayload

    for name, value, kind in (("audio", audio, AudioPayload), ("reference", reference, ImagePayload)):
        if not isinstance(value, kind):
            raise LiveAvatarInputError(node, name, f"got {type(value).__name__}; connect the LiveAvatar "
                                       f"{'Audio Encode' if name == 'audio' else 'Reference Image'} node")
    in_process = getattr(model, "mode", "single") == "single"
    if text is None or (in_process and getattr(text, "ndim", None) != 2):
        raise LiveAvatarInputError(node, "text", "expected text conditioning [L, D]; connect LiveAvatar Text Encode")


class LiveAvatarSampler(io.ComfyNode):
    NAME = "LiveAvatar Sampler"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarSampler",
            display_name=cls.NAME,
            category=CATEGORY_SAMPLING,
            description="Generates the talking-avatar video block by block (live preview of each block) and "
                        "returns the frames and their audio for Create Video. For long videos use "
                        "LiveAvatar Save MP4 (streaming), which keeps memory flat.",
            inputs=_sampling_inputs(),
            outputs=[
                io.Image.Output(display_name="frames", tooltip="Video frames [N, H, W, 3]."),
                io.Audio.Output(display_name="audio", tooltip="The audio of exactly these frames (16 kHz mono)."),
                io.Float.Output(display_name="fps", tooltip=f"Frame rate ({FPS})."),
            ],
        )

    @classmethod
    def execute(cls, model, text, audio, reference, seed: int, steps: int, num_clip: int) -> io.NodeOutput:
        _check_inputs(cls.NAME, model, text, audio, reference)
        frames, samples = [], []
        fps = [FPS]

        def keep(block) -> None:
            frames.append(block.frames.to("cpu"))
            samples.append(block.audio.to("cpu"))
            fps[0] = int(getattr(block, "fps", FPS))

        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        report = run_generation(model, text, audio, reference, seed=seed, steps=steps, num_clip=num_clip,
                                on_block=keep, node_id=node_id)
        if not frames:
            raise LiveAvatarInputError(cls.NAME, "audio", "no frames were generated; the audio is too short")
        return io.NodeOutput(frames_to_image(frames), samples_to_audio(samples, SAMPLE_RATE), float(fps[0]),
                             ui=ui.PreviewText(report.text()))


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
            ],
            outputs=[
                io.Video.Output(display_name="video", tooltip="The written mp4 (for Get Video Components etc.)."),
                io.String.Output(display_name="filename", tooltip="Path of the mp4 relative to the output folder."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, text, audio, reference, seed: int, steps: int, num_clip: int,
                filename_prefix: str) -> io.NodeOutput:
        from liveavatar.media.video_writer import VideoWriter

        _check_inputs(cls.NAME, model, text, audio, reference)
        width, height = int(reference.width), int(reference.height)
        try:
            folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
                filename_prefix, folder_paths.get_output_directory(), width, height)
        except Exception as exc:
            raise LiveAvatarInputError(cls.NAME, "filename_prefix", str(exc)) from exc
        file = f"{name}_{counter:05}_.mp4"
        path = os.path.join(folder, file)
        writer = VideoWriter(path, width, height, fps=FPS, audio_rate=SAMPLE_RATE)

        def write(block) -> None:
            writer.write_frames(block.frames)
            writer.write_audio(block.audio)

        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        try:
            report = run_generation(model, text, audio, reference, seed=seed, steps=steps, num_clip=num_clip,
                                    on_block=write, node_id=node_id)
        finally:
            writer.close()
        rel = os.path.join(subfolder, file) if subfolder else file
        video = ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]).as_dict()
        return io.NodeOutput(InputImpl.VideoFromFile(path), rel,
                             ui={**video, **ui.PreviewText(report.text()).as_dict()})


__all__ = ["LiveAvatarSampler", "LiveAvatarSaveMP4"]
