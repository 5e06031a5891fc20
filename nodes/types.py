"""Socket types and menu categories shared by the LiveAvatar nodes.

Custom socket types carry our library objects between nodes (ComfyUI only checks the type name):

- `LIVEAVATAR_MODEL`: a `nodes.handle.LiveAvatarHandle` (in-process model or worker group).
- `LIVEAVATAR_TEXT`: a `liveavatar.pipeline.payloads.TextPayload`: the umT5 states `[L, text_dim]`
  (single mode) or a `PromptRef` (tpp mode: every rank encodes the prompt).
- `LIVEAVATAR_AUDIO`: an `AudioPayload`: `AudioConditioning` (wav2vec2 features + 16 kHz audio) or
  an `AudioRef` (the audio and its frame count).
- `LIVEAVATAR_IMAGE`: an `ImagePayload`: `ImageConditioning` (reference pixels at the output size)
  or an `ImageRef` (the image and its resolved `OutputSize`).
The payload types and the backend contract are in `liveavatar/pipeline/payloads.py`.
"""

from __future__ import annotations

from comfy_api.latest import io

from .errors import LiveAvatarInputError

CATEGORY = "LiveAvatar"
CATEGORY_LOADERS = f"{CATEGORY}/loaders"
CATEGORY_CONDITIONING = f"{CATEGORY}/conditioning"
CATEGORY_SAMPLING = f"{CATEGORY}/sampling"
CATEGORY_OUTPUT = f"{CATEGORY}/output"

LiveAvatarModel = io.Custom("LIVEAVATAR_MODEL")
LiveAvatarText = io.Custom("LIVEAVATAR_TEXT")
LiveAvatarAudio = io.Custom("LIVEAVATAR_AUDIO")
LiveAvatarImage = io.Custom("LIVEAVATAR_IMAGE")


__all__ = [
    "CATEGORY", "CATEGORY_LOADERS", "CATEGORY_CONDITIONING", "CATEGORY_SAMPLING", "CATEGORY_OUTPUT",
    "LiveAvatarModel", "LiveAvatarText", "LiveAvatarAudio", "LiveAvatarImage", "LiveAvatarInputError",
]
