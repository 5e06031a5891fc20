"""Conditioning nodes: prompt text, driving audio, reference image."""

from __future__ import annotations

from comfy_api.latest import io, ui

from liveavatar.config import DEFAULT_STREAM
from liveavatar.sizes import DEFAULT_MODE as DEFAULT_SIZE_MODE
from liveavatar.sizes import MODES as SIZE_MODES

from .convert import encoder_output_states, first_image, native_audio, text_from_conditioning
from .errors import LiveAvatarInputError
from .run import show_text
from .types import CATEGORY_CONDITIONING, LiveAvatarAudio, LiveAvatarImage, LiveAvatarModel, LiveAvatarText

DEFAULT_PROMPT = ("A person speaks naturally to the camera with clear lip movements, subtle head motion "
                  "and natural facial expressions, soft studio lighting, sharp focus.")
DEFAULT_SIZE = "704*384"


def _model_input() -> io.Input:
    return LiveAvatarModel.Input("model", tooltip="The model from a LiveAvatar Model Loader.")


class LiveAvatarTextEncode(io.ComfyNode):
    NAME = "LiveAvatar Text Encode"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarTextEncode",
            display_name=cls.NAME,
            category=CATEGORY_CONDITIONING,
            description="Encodes the prompt with the model's umT5. If a native CONDITIONING is connected "
                        "(Load CLIP type 'wan' + CLIP Text Encode) it is used instead and the prompt is ignored.",
            inputs=[
                _model_input(),
                io.String.Input("prompt", multiline=True, default=DEFAULT_PROMPT,
                                tooltip="What the video shows: the person, their expression and motion, the scene."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Optional native umT5 conditioning (CLIP Text Encode with a 'wan' "
                                              "CLIP). When connected, the prompt above is ignored."),
            ],
            outputs=[LiveAvatarText.Output(display_name="text", tooltip="Text conditioning [L, 4096].")],
        )

    @classmethod
    def execute(cls, model, prompt: str, conditioning=None) -> io.NodeOutput:
        if conditioning is not None:
            return io.NodeOutput(text_from_conditioning(conditioning, model.text_dim, cls.NAME))
        if not isinstance(prompt, str):
            raise LiveAvatarInputError(cls.NAME, "prompt", "must be text")
        return io.NodeOutput(model.encode_prompt(prompt))


class LiveAvatarAudioEncode(io.ComfyNode):
    NAME = "LiveAvatar Audio Encode"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarAudioEncode",
            display_name=cls.NAME,
            category=CATEGORY_CONDITIONING,
            description="Turns the driving audio (any sample rate, mono or stereo) into wav2vec2 features, one "
                        "column per video frame at 25 fps. The audio length sets the video length.",
            inputs=[
                _model_input(),
                io.Audio.Input("audio", tooltip="The speech that drives the avatar (Load Audio). Resampled to "
                                                "16 kHz and mixed to mono."),
                io.AudioEncoderOutput.Input("audio_encoder_output", optional=True,
                                            tooltip="Optional native wav2vec2 output (Audio Encoder Loader + "
                                                    "Audio Encoder Encode on the same audio) to reuse instead "
                                                    "of the model's own wav2vec2."),
            ],
            outputs=[
                LiveAvatarAudio.Output(display_name="audio", tooltip="Audio conditioning for the sampler."),
                io.Int.Output(display_name="frames", tooltip="Video frames this audio drives (25 fps)."),
            ],
        )

    @classmethod
    def execute(cls, model, audio, audio_encoder_output=None) -> io.NodeOutput:
        from liveavatar.media.audio import AudioLoadError, audio_from_waveform

        waveform, rate = native_audio(audio, cls.NAME)
        try:
            audio16k = audio_from_waveform(waveform, rate)
        except AudioLoadError as exc:
            raise LiveAvatarInputError(cls.NAME, "audio", str(exc)) from exc
        if audio_encoder_output is not None:
            states = encoder_output_states(audio_encoder_output, cls.NAME)
            cond = model.encode_audio_states(states, audio16k)
        else:
            try:
                cond = model.encode_audio(audio16k)
            except ValueError as exc:
                raise LiveAvatarInputError(cls.NAME, "audio", str(exc)) from exc
        frames = int(cond.num_frames)
        fps = DEFAULT_STREAM.fps
        text = f"{frames} frames ({frames / fps:.2f} s at {fps} fps)"
        show_text(text)  # inside the node in the frontend; ui text: in /history
        return io.NodeOutput(cond, frames, ui=ui.PreviewText(text))


def _size_problem(size) -> str | None:
    """None if `size` parses (same rule as the CLI) or is "auto", else the message."""
    from liveavatar.sizes import SizeError, parse_size

    if str(size).strip().lower() == "auto":
        return None
    try:
        parse_size(size)
    except SizeError as exc:
        return str(exc)
    return None


def _size_tooltip() -> str:
    try:
        from liveavatar.sizes import valid_sizes

        named = ", ".join(valid_sizes())
    except Exception:
        named = "704*384, 720*400, 688*368, 384*256, ..."
    return (f"Output size W*H (or WxH), width first. Named sizes: {named}; or any W*H with both sides "
            "multiples of 64 up to 1280*720 pixels. auto: the largest named size whose memory estimate "
            "fits the memory ComfyUI can give the model (bf16 KV caches, offloaded when needed); the "
            "choice and the reason are shown on the node.")


class LiveAvatarReferenceImage(io.ComfyNode):
    NAME = "LiveAvatar Reference Image"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarReferenceImage",
            display_name=cls.NAME,
            category=CATEGORY_CONDITIONING,
            description="Prepares the reference image (the avatar's identity) at the output size and shows "
                        "the effective size.",
            inputs=[
                _model_input(),
                io.Image.Input("image", tooltip="The person to animate (first image of the batch is used)."),
                io.String.Input("size", default=DEFAULT_SIZE, tooltip=_size_tooltip()),
                io.Combo.Input("size_mode", options=list(SIZE_MODES), default=DEFAULT_SIZE_MODE,
                               tooltip="area (as the original Live Avatar and our CLI): W*H is a pixel budget, "
                                       "the image's aspect ratio decides the shape (sides multiples of 64). "
                                       "exact: the video is exactly W x H (image scaled to cover, centre-cropped)."),
            ],
            outputs=[
                LiveAvatarImage.Output(display_name="reference", tooltip="Reference image conditioning."),
                io.Int.Output(display_name="width", tooltip="Effective video width in pixels."),
                io.Int.Output(display_name="height", tooltip="Effective video height in pixels."),
            ],
        )

    @classmethod
    def validate_inputs(cls, size=None) -> bool | str:
        if size is None:
            return True
        problem = _size_problem(size)
        return True if problem is None else f"{cls.NAME}: input 'size': {problem}"

    @classmethod
    def execute(cls, model, image, size: str, size_mode: str) -> io.NodeOutput:
        from liveavatar.media.image import image_from_tensor
        from liveavatar.sizes import SizeError, resolve_size

        if size_mode not in SIZE_MODES:
            raise LiveAvatarInputError(cls.NAME, "size_mode", f"{size_mode!r} is not one of {', '.join(SIZE_MODES)}")
        pil = image_from_tensor(first_image(image, cls.NAME))
        why, requested = "", size
        if str(size).strip().lower() == "auto":  # the largest listed size that fits, decided here
            from liveavatar.pipeline.fit import NoFitError

            from .comfy_memory import fit_in_comfy

            try:
                fit = fit_in_comfy(model, size=None, image_wh=pil.size, size_mode=size_mode)
            except NoFitError as exc:
                raise LiveAvatarInputError(cls.NAME, "size", str(exc)) from exc
            size, why = fit.size_key, f"; {fit.reason}"
        try:
            out = resolve_size(pil.size, size, size_mode)  # resolved once, here at the edge
        except SizeError as exc:
            raise LiveAvatarInputError(cls.NAME, "image" if exc.field == "image" else "size", str(exc)) from exc
        ref = model.prepare_image(pil, out)
        text = f"effective size {ref.width}x{ref.height} (requested '{requested}', mode {size_mode}{why})"
        show_text(text)
        return io.NodeOutput(ref, int(ref.width), int(ref.height), ui=ui.PreviewText(text))


__all__ = ["LiveAvatarTextEncode", "LiveAvatarAudioEncode", "LiveAvatarReferenceImage"]
