"""What travels between the steps of a job, written as types both backends satisfy.

A backend (`Backend`) is what the CLI and the ComfyUI nodes drive: the in-process
`liveavatar.pipeline.LiveAvatar` (one device) or a worker group (`parallel.handle.GroupModel`,
whose ranks each encode the conditioning themselves). Its encode steps return payloads:

- text (`TextPayload`): the umT5 context tensor [L, text_dim] in-process, a `PromptRef` (the
  prompt string) for a worker group;
- audio (`AudioPayload`): `AudioConditioning` (wav2vec2 features + the 16 kHz audio) in-process,
  an `AudioRef` (the audio and its frame count) for a worker group;
- image (`ImagePayload`): `ImageConditioning` (reference pixels at the output size) in-process,
  an `ImageRef` (the image and its resolved `OutputSize`) for a worker group.
`generate(text, audio, image, ...)` takes the payloads of the same backend and streams
`DecodedBlock`s. The ComfyUI sockets LIVEAVATAR_TEXT / _AUDIO / _IMAGE carry these payloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Union, runtime_checkable

import torch

from liveavatar.config import StreamConfig
from liveavatar.sizes import OutputSize


@dataclass
class PromptRef:
    """A prompt to be encoded on each rank."""

    prompt: str


@dataclass
class AudioRef:
    """Audio to be encoded on each rank; `num_frames` = written video frames."""

    audio: Any
    num_frames: int


@dataclass
class ImageRef:
    """A reference image (PIL) with its output size, resolved once by the parent (every rank
    prepares the image at exactly this size, without resolving it again)."""

    image: Any
    size: OutputSize

    @property
    def width(self) -> int:
        return self.size.width

    @property
    def height(self) -> int:
        return self.size.height


@dataclass
class PoseRef:
    """A pose video to be encoded on each DiT rank (with its own VAE, as `LiveAvatar.encode_pose`)."""

    path: str


TextPayload = Union[torch.Tensor, PromptRef]  # umT5 context [L, text_dim], or the prompt itself


@runtime_checkable
class AudioPayload(Protocol):
    """Audio conditioning: `num_frames` written video frames (the audio length at `stream.fps`) and
    `audio`, the user's 16 kHz audio (`Audio16k`) muxed into the output."""

    num_frames: int
    audio: Any


@runtime_checkable
class ImagePayload(Protocol):
    """The reference image at the output size: `width` x `height` pixels (multiples of 64)."""

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


@runtime_checkable
class Backend(Protocol):
    """What the CLI and the nodes drive (in-process `LiveAvatar` or a worker group).

    Optional beyond this: `close()` (stop worker processes), `encode_reference(image)` (VAE
    latents of the reference, cached by the nodes), `audio_conditioning_from_states(...)`.
    Closing the iterator `generate` returns, or `cancel()` returning True, stops the job.
    """

    stream: StreamConfig

    def encode_prompt(self, prompt: str) -> TextPayload: ...

    def encode_audio(self, audio: Any) -> AudioPayload: ...

    def prepare_image(self, image: Any, size: "OutputSize | str", size_mode: str = ...) -> ImagePayload: ...

    def encode_pose(self, path: Any, image: Any, num_frames: int) -> Any: ...

    def generate(self, context: TextPayload, audio: AudioPayload, image: ImagePayload, *, seed: int = ...,
                 steps: int = ..., num_clip: int | None = ..., progress: Callable[[dict], None] | None = ...,
                 cancel: Callable[[], bool] | None = ..., **kwargs: Any) -> Iterator[Any]: ...


__all__ = ["PromptRef", "AudioRef", "ImageRef", "PoseRef", "TextPayload", "AudioPayload", "ImagePayload", "Backend"]
