"""Conversions between ComfyUI's native socket values and what our library takes or yields.

Pure tensor code, importable without ComfyUI. Native layouts (ComfyUI `comfy_api/latest/_io.py`):

- IMAGE: float32 `[B, H, W, C]` in 0..1 (C = 3, sometimes 4).
- AUDIO: `{"waveform": [B, C, T] float, "sample_rate": int}`.
- CONDITIONING: `[[cond [1, L, D], {extras}], ...]` (umT5 from CLIPLoader type `wan`: L = 512,
  zero rows past the prompt's tokens).
- AUDIO_ENCODER_OUTPUT: `{"encoded_audio": [B, T, C], "encoded_audio_all_layers": (n_states x
  [B, T, C]), "audio_samples": int}` at 50 states per second (`comfy/audio_encoders/`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .errors import LiveAvatarInputError


def first_image(image: Any, node: str, input_name: str = "image") -> Tensor:
    """Native IMAGE `[B, H, W, C]` -> the first image as float32 `[1, H, W, 3]` in 0..1."""
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise LiveAvatarInputError(node, input_name, f"expected an IMAGE [B, H, W, 3], got {shape}; "
                                   "connect a Load Image node (or any node that outputs IMAGE)")
    if image.shape[0] < 1 or image.shape[1] < 1 or image.shape[2] < 1:
        raise LiveAvatarInputError(node, input_name, f"the image batch is empty ({tuple(image.shape)})")
    img = image[:1].float()
    if img.shape[-1] == 1:
        img = img.expand(-1, -1, -1, 3)
    return img[..., :3].clamp(0.0, 1.0).contiguous()


def native_audio(audio: Any, node: str, input_name: str = "audio") -> tuple[Tensor, int]:
    """Check a native AUDIO dict; returns (waveform float32 `[B, C, T]`, sample_rate)."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise LiveAvatarInputError(node, input_name, "expected an AUDIO value {'waveform', 'sample_rate'}; "
                                   "connect a Load Audio node")
    wav = audio["waveform"]
    rate = int(audio["sample_rate"])
    if not isinstance(wav, Tensor) or wav.ndim not in (2, 3):
        shape = tuple(wav.shape) if isinstance(wav, Tensor) else type(wav).__name__
        raise LiveAvatarInputError(node, input_name, f"waveform must be [B, C, T], got {shape}")
    if wav.ndim == 2:
        wav = wav.unsqueeze(0)
    if wav.shape[-1] == 0:
        raise LiveAvatarInputError(node, input_name, "the audio is empty (0 samples); load a longer file")
    if rate <= 0:
        raise LiveAvatarInputError(node, input_name, f"sample_rate must be positive, got {rate}")
    return wav.float(), rate


def text_from_conditioning(cond: Any, text_dim: int | None, node: str,
                           input_name: str = "conditioning") -> Tensor:
    """Native CONDITIONING (umT5 states) -> our text conditioning `[L, D]` (first entry, batch 0).

    The zero rows ComfyUI pads up to 512 tokens are kept: the DiT pads the context with zeros to
    its text length anyway, so padded and trimmed prompts give the same result.
    """
    try:
        states = cond[0][0]
    except (TypeError, IndexError, KeyError):
        raise LiveAvatarInputError(node, input_name, "expected a CONDITIONING value; connect CLIP Text "
                                   "Encode fed by Load CLIP (type 'wan', umt5_xxl)") from None
    if not isinstance(states, Tensor) or states.ndim != 3:
        shape = tuple(states.shape) if isinstance(states, Tensor) else type(states).__name__
        raise LiveAvatarInputError(node, input_name, f"conditioning tensor must be [1, L, D], got {shape}")
    if text_dim is not None and states.shape[-1] != text_dim:
        raise LiveAvatarInputError(node, input_name, f"conditioning has {states.shape[-1]} channels but the "
                                   f"model expects {text_dim}: use the umT5-XXL text encoder (Load CLIP, "
                                   "type 'wan') or leave this input empty to encode the prompt")
    return states[0].float()


def encoder_output_states(out: Any, node: str, input_name: str = "audio_encoder_output") -> Tensor:
    """Native AUDIO_ENCODER_OUTPUT -> wav2vec2 hidden states `[n_states, T, C]` at 50 per second."""
    layers = out.get("encoded_audio_all_layers") if isinstance(out, dict) else None
    if not layers:
        raise LiveAvatarInputError(node, input_name, "expected an AUDIO_ENCODER_OUTPUT from Audio Encoder "
                                   "Encode (wav2vec2); whisper outputs are not supported")
    states = torch.stack([t[0] if t.ndim == 3 else t for t in layers], dim=0)
    return states.float()


class ImageBuffer:
    """Native IMAGE + AUDIO filled block by block into buffers allocated once for the planned length.

    frames: float32 `[frames, H, W, 3]` in 0..1 (12 bytes per pixel, touched as it fills); samples:
    mono float32 `[samples]`. Nothing is kept per block (small per-block tensors held for the whole
    run fragment the heap: measured at 8x the frames' own size on a 750-frame 64x64 run). More than
    planned still fits: the buffers grow.
    """

    def __init__(self, frames: int, height: int, width: int, samples: int, sample_rate: int) -> None:
        self.frames = torch.empty((max(0, frames), height, width, 3), dtype=torch.float32)
        self.samples = torch.empty(max(0, samples), dtype=torch.float32)
        self.sample_rate = int(sample_rate)
        self.n_frames = self.n_samples = 0

    @staticmethod
    def _room(buf: Tensor, used: int, more: int) -> Tensor:
        if used + more <= buf.shape[0]:
            return buf
        return torch.cat([buf[:used], torch.empty((more, *buf.shape[1:]), dtype=buf.dtype)])

    def add(self, frames: Tensor, samples: Tensor) -> None:
        """uint8 frames `[n, H, W, 3]` and their mono samples `[m]` (any device)."""
        n, m = int(frames.shape[0]), int(samples.numel())
        self.frames = self._room(self.frames, self.n_frames, n)
        self.samples = self._room(self.samples, self.n_samples, m)
        torch.div(frames.to("cpu"), 255.0, out=self.frames[self.n_frames:self.n_frames + n])
        self.samples[self.n_samples:self.n_samples + m] = samples.to("cpu", torch.float32).reshape(-1)
        self.n_frames += n
        self.n_samples += m

    def image(self) -> Tensor:
        """Native IMAGE float32 `[N, H, W, 3]` in 0..1 (a view of the buffer)."""
        return self.frames[:self.n_frames]

    def audio(self) -> dict[str, Any]:
        """Native AUDIO `{"waveform": [1, 1, T], "sample_rate"}` of exactly these frames."""
        return {"waveform": self.samples[:self.n_samples].reshape(1, 1, -1), "sample_rate": self.sample_rate}


def preview_image(frame: Tensor, max_size: int = 512):
    """uint8 `[H, W, 3]` frame -> PIL image no larger than `max_size` on its longer side."""
    from PIL import Image

    img = Image.fromarray(frame.to("cpu").numpy())
    if max(img.size) > max_size:
        img.thumbnail((max_size, max_size))
    return img


__all__ = [
    "first_image", "native_audio", "text_from_conditioning", "encoder_output_states",
    "ImageBuffer", "preview_image",
]
