"""wav2vec2 audio features for Live Avatar, up to the DiT's per-block audio input.

Chain (spec §2.3, fixture case 7):

1. 16 kHz mono samples `[T]` -> processor normalisation (zero mean, unit variance over the whole
   utterance; transformers' `Wav2Vec2FeatureExtractor` with the checkpoint's preprocessor config).
2. transformers `Wav2Vec2Model` (the encoder of `Wav2Vec2ForCTC`; the CTC head is not used) ->
   all `num_hidden_layers + 1` hidden states at 50 frames/s, `[n_states, T50, C]`. The last state
   is the encoder's output, i.e. AFTER its final LayerNorm for the stable-layer-norm layout, as the
   reference (transformers 4.51) returns it. transformers >= 5.16 returns the pre-norm state in
   `hidden_states[-1]`; we take the encoder's output from a forward hook instead, which is right
   on every version.
3. Linear interpolation in time, 50 -> 30 frames/s, `align_corners=True`,
   `T30 = int(T50 / 50 * 30)` -> `[n_states, T30, C]`, float32.
4. Bucketing to video frames at 25 fps: video frame `j` takes the 30-fps feature at
   `round(j * 30 / 25)` (numpy rounding) or zeros past the end; the frame count is padded to whole
   clips of `pad_to_multiple` (48) frames with the reference's rule
   `clips = floor(T30 / (48 * 30 / 25)) + 1` -> `[1, n_states, C, N]`, `N = clips * 48`.
   The DiT gets `[..., 12 b : 12 b + 12]` for block `b`.

Long audio. The reference runs the encoder over the whole file at once. Here this module does one
pass over the samples it is given; `liveavatar.pipeline.audio_features.WindowedAudioFeatures`
feeds it windows (with context) of a clip of any length, block by block, and keeps clips that fit
one window on this one-pass path (bit-exact).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liveavatar.config import DEFAULT_STREAM

__all__ = [
    "AudioFeatureExtractor",
    "Wav2VecLoadError",
    "bucket_indices",
    "bucket_video_frames",
    "interpolate_50_to_30",
    "num_clips_for",
]

# Heads and pre-training parts of HF wav2vec2 checkpoints that the feature path never uses.
_UNUSED_PREFIXES = ("lm_head.", "quantizer.", "project_q.", "project_hid.", "dropout_features.")
_WN_OLD_TO_NEW = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
_WN_NEW_TO_OLD = {v: k for k, v in _WN_OLD_TO_NEW.items()}


class Wav2VecLoadError(ValueError):
    """A wav2vec2 checkpoint folder / state dict cannot be loaded (named file or keys)."""


# --------------------------------------------------------------------------- time resampling


def interpolate_50_to_30(states: Tensor, input_fps: float = 50.0, output_fps: float = 30.0) -> Tensor:
    """`[n_states, T50, C]` -> `[n_states, T30, C]`, `T30 = int(T50 / input_fps * output_fps)`.

    Linear interpolation along time with `align_corners=True` (first and last frames kept), in the
    input's dtype. The length uses the same float expression as the reference.
    """
    n, t_in, _ = states.shape
    t_out = int(t_in / float(input_fps) * output_fps)
    if t_out < 1:
        raise ValueError(
            f"audio too short: {t_in} feature frames at {input_fps} fps give no frame at {output_fps} fps"
        )
    out = F.interpolate(states.transpose(1, 2), size=t_out, mode="linear", align_corners=True)
    return out.transpose(1, 2)


def num_clips_for(num_feature_frames: int, fps: int = 25, feature_fps: int = 30, pad_to_multiple: int = 48) -> int:
    """The reference's clip count: `floor(T30 / (pad_to_multiple * feature_fps / fps)) + 1`.

    Always at least one clip and always one (partial or empty) clip past the audio's end.
    """
    scale = feature_fps / fps
    return int(num_feature_frames / (pad_to_multiple * scale)) + 1


def bucket_indices(first: int, stop: int, total: int, fps: int = 25, feature_fps: int = 30) -> Tensor:
    """Feature index of video frames `[first, stop)` out of `total` columns: `[stop - first]` int64.

    `round(j / fps * feature_fps)` exactly as the reference computes it over all `total` columns
    (`np.linspace(0, total / fps, total, endpoint=False)`, i.e. `j * step` in float64, then numpy
    rounding, half to even), for any sub-range.
    """
    step = (total / fps) / total
    times = np.arange(first, stop, dtype=np.float64) * step
    return torch.from_numpy(np.round(times * int(feature_fps)).astype(np.int64))


def bucket_video_frames(
    feat: Tensor, fps: int = 25, feature_fps: int = 30, pad_to_multiple: int = 48
) -> Tensor:
    """Per-video-frame features: `[n_states, T30, C]` -> `[1, n_states, C, N]`.

    `N = num_clips_for(T30) * pad_to_multiple`. Video frame `j` takes feature index
    `round(j / fps * feature_fps)` (numpy rounding, half to even) when it is `< T30`, else zeros.
    """
    n_states, t30, dim = feat.shape
    total = num_clips_for(t30, fps, feature_fps, pad_to_multiple) * pad_to_multiple
    idx = bucket_indices(0, total, total, fps, feature_fps)
    keep = idx < t30
    out = feat.new_zeros(n_states, dim, total)
    out[:, :, keep.to(feat.device)] = feat[:, idx[keep].to(feat.device), :].transpose(1, 2)
    return out.unsqueeze(0)


# --------------------------------------------------------------------------- loading


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise Wav2VecLoadError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Wav2VecLoadError(f"{what} {path} is not valid JSON: {exc}") from exc


def _load_weight_files(folder: Path) -> dict[str, Tensor]:
    """`model.safetensors`, a sharded safetensors index, or `pytorch_model.bin` (weights_only)."""
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    binary = folder / "pytorch_model.bin"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(_read_json(index, "safetensors index")["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for name in shards:
            sd.update(load_file(str(folder / name)))
        return sd
    if binary.is_file():
        from ..loading.safetensors_io import CheckpointError, load_pth_state_dict

        try:
            return load_pth_state_dict(binary)  # weights-only: never unpickles code
        except CheckpointError as exc:  # pickle with non-tensor objects, truncated file, ...
            raise Wav2VecLoadError(str(exc)) from exc
    raise Wav2VecLoadError(
        f"no wav2vec2 weights in {folder}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def _encoder_state_dict(sd: Mapping[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """HF `Wav2Vec2ForCTC` / `Wav2Vec2Model` keys -> `Wav2Vec2Model` keys of this transformers.

    Drops the CTC / pre-training heads, strips the `wav2vec2.` prefix, and renames the positional
    conv's weight norm between the old (`weight_g`, `weight_v`) and the parametrization
    (`parametrizations.weight.original0/1`) spellings to whichever the model uses.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith(_UNUSED_PREFIXES):
            continue
        if key.startswith("wav2vec2."):
            key = key[len("wav2vec2."):]
        if key not in expected:
            for a, b in list(_WN_OLD_TO_NEW.items()) + list(_WN_NEW_TO_OLD.items()):
                if key.endswith("." + a) and key[: -len(a)] + b in expected:
                    key = key[: -len(a)] + b
                    break
        out[key] = value
    return out


# --------------------------------------------------------------------------- the extractor


class AudioFeatureExtractor:
    """wav2vec2 (transformers) + the reference's normalisation, resampling and bucketing.

    Attributes: `num_states` (= num_hidden_layers + 1), `hidden_size` (C), `sample_rate` (16000),
    `frame_rate` (encoder frames per second, 50), `stride` (samples per encoder frame, 320),
    `receptive_field` (samples seen by one encoder frame, 400), `device`, `dtype`.
    """

    def __init__(self, model: nn.Module, normalizer: Any) -> None:
        self.model = model.eval().requires_grad_(False)
        self.normalizer = normalizer
        cfg = model.config
        self.num_states = int(cfg.num_hidden_layers) + 1
        self.hidden_size = int(cfg.hidden_size)
        self.sample_rate = int(normalizer.sampling_rate)
        self.stride = math.prod(int(s) for s in cfg.conv_stride)  # samples per encoder frame
        field, jump = 1, 1
        for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
            field += (int(k) - 1) * jump
            jump *= int(s)
        self.receptive_field = field  # samples seen by one encoder frame
        self.frame_rate = self.sample_rate / self.stride
        self.normalizes = bool(getattr(normalizer, "do_normalize", True))
        self._encoder_out: list[Tensor] = []
        model.encoder.register_forward_hook(self._grab_encoder_output)

    # ---- construction

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> "AudioFeatureExtractor":
        """A HF wav2vec2 folder: `config.json`, weights (`model.safetensors` or `pytorch_model.bin`,
        read with weights_only) and `preprocessor_config.json` (defaults when absent)."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise Wav2VecLoadError(f"wav2vec2 folder not found: {folder}")
        config = _read_json(folder / "config.json", "wav2vec2 config")
        pre_path = folder / "preprocessor_config.json"
        pre = _read_json(pre_path, "wav2vec2 preprocessor config") if pre_path.is_file() else None
        return cls.from_state_dict(_load_weight_files(folder), config, pre, device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, Tensor],
        config: Mapping[str, Any],
        preprocessor_config: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> "AudioFeatureExtractor":
        """HF-named weights (`wav2vec2.*`, CTC head ignored; old `weight_g/weight_v` accepted),
        the model's config.json as a dict, and its preprocessor config (None: transformers'
        defaults, i.e. 16 kHz with normalisation on)."""
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

        config = dict(config)
        if config.get("model_type", "wav2vec2") != "wav2vec2":
            raise Wav2VecLoadError(f"config model_type is {config.get('model_type')!r}, expected 'wav2vec2'")
        hf_config = Wav2Vec2Config(**config)
        with torch.device("meta"):
            model = Wav2Vec2Model(hf_config)
        expected = set(model.state_dict().keys())
        weights = _encoder_state_dict(sd, expected)
        missing = sorted(expected - weights.keys() - {"masked_spec_embed"})
        unexpected = sorted(weights.keys() - expected)
        if missing or unexpected:
            raise Wav2VecLoadError(
                f"wav2vec2 weights do not fit the config ({len(missing)} missing, {len(unexpected)} "
                f"unexpected); missing e.g. {missing[:5]}, unexpected e.g. {unexpected[:5]}"
            )
        for key in expected - weights.keys():  # masked_spec_embed: training-only, never read in eval
            weights[key] = torch.zeros(model.get_parameter(key).shape)
        model.load_state_dict(weights, strict=True, assign=True)
        model = model.to(device=device, dtype=dtype)
        pre = dict(preprocessor_config) if preprocessor_config is not None else {}
        pre.pop("processor_class", None)
        pre.pop("feature_extractor_type", None)
        normalizer = Wav2Vec2FeatureExtractor(**pre)
        return cls(model, normalizer, **kwargs)

    @staticmethod
    def device_bytes(config: Mapping[str, Any], dtype: torch.dtype) -> int:
        """Bytes the encoder of this config.json holds on its device in `dtype` (a meta build:
        nothing is read or allocated); 0.59 GiB for wav2vec2-large in bf16. The DiT placement counts
        it (it stays on the device for the whole job)."""
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        with torch.device("meta"):
            model = Wav2Vec2Model(Wav2Vec2Config(**dict(config)))
        elt = torch.tensor([], dtype=dtype).element_size()
        return sum(t.numel() * (elt if t.is_floating_point() else t.element_size())
                   for t in (*model.parameters(), *model.buffers()))

    # ---- properties

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _grab_encoder_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._encoder_out.append(output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state)

    # ---- steps

    def normalize(self, samples_16k: Tensor) -> Tensor:
        """`[T]` 16 kHz samples -> `[T]` float32 `input_values` (the processor's normalisation)."""
        samples = self._check_samples(samples_16k)
        arr = samples.detach().to("cpu", torch.float32).numpy()
        values = self.normalizer(arr, sampling_rate=self.sample_rate, return_tensors="pt").input_values
        return values[0]

    def num_frames_50(self, num_samples: int) -> int:
        """Encoder frames for `num_samples` input samples (the conv stack's length formula)."""
        return (num_samples - self.receptive_field) // self.stride + 1 if num_samples >= self.receptive_field else 0

    @torch.no_grad()
    def encode_values(self, input_values: Tensor) -> Tensor:
        """`[T]` normalised -> `[n_states, T50, C]` in the model's dtype, one pass."""
        x = input_values.to(device=self.device, dtype=self.dtype)[None]
        self._encoder_out.clear()
        out = self.model(x, output_hidden_states=True)
        states = list(out.hidden_states)
        if len(states) != self.num_states or len(self._encoder_out) != 1:
            raise RuntimeError(
                f"wav2vec2 returned {len(states)} hidden states (expected {self.num_states}); "
                "unsupported transformers version?"
            )
        states[-1] = self._encoder_out.pop()
        return torch.cat(states, dim=0)

    def hidden_states(self, samples_16k: Tensor) -> Tensor:
        """`[T]` 16 kHz mono samples -> `[n_states, T50, C]`, all hidden states, model dtype, one pass.

        Index 0 is the input of the first transformer layer (after the positional conv), the last is
        the encoder output after its final LayerNorm.
        """
        return self.encode_values(self.normalize(samples_16k))

    def normalize_with(self, samples_16k: Tensor, mean: float, var: float) -> Tensor:
        """`[T]` -> `[T]` float32 normalised with a whole clip's `mean` / `var` (a window of a long
        clip); the processor's formula `(x - mean) / sqrt(var + 1e-7)` in float32."""
        x = samples_16k.detach().to("cpu", torch.float32).numpy()
        if not self.normalizes:
            return torch.from_numpy(x.copy())
        std = np.sqrt(np.float32(var) + np.float32(1e-7))
        return torch.from_numpy(((x - np.float32(mean)) / std).astype(np.float32))

    def features_30fps(self, samples_16k: Tensor, *, feature_fps: int | None = None) -> Tensor:
        """`[T]` -> `[n_states, T30, C]` float32; `T30 = int(T50 / 50 * 30)` (reference rule)."""
        fps_out = DEFAULT_STREAM.audio_feature_fps if feature_fps is None else feature_fps
        states = self.hidden_states(samples_16k)
        return interpolate_50_to_30(states, self.frame_rate, fps_out).float()

    def video_frame_features(
        self, samples_16k: Tensor, fps: int | None = None, pad_to_multiple: int | None = None,
        feature_fps: int | None = None,
    ) -> Tensor:
        """`[T]` -> `[1, n_states, C, N]` float32, one column per 25-fps video frame.

        `N = clips * pad_to_multiple` (48 = one clip), columns past the audio are zeros; block `b`
        of the DiT reads `[..., 12 b : 12 b + 12]`.
        """
        fps = DEFAULT_STREAM.fps if fps is None else fps
        if pad_to_multiple is None:
            pad_to_multiple = DEFAULT_STREAM.frames_per_clip
        if feature_fps is None:
            feature_fps = DEFAULT_STREAM.audio_feature_fps
        feat = self.features_30fps(samples_16k, feature_fps=feature_fps)
        return bucket_video_frames(feat, fps=fps, feature_fps=feature_fps, pad_to_multiple=pad_to_multiple)

    # ---- checks

    def _check_samples(self, samples: Tensor) -> Tensor:
        if not isinstance(samples, Tensor):
            samples = torch.as_tensor(samples)
        if samples.ndim != 1:
            raise ValueError(f"expected mono 16 kHz samples [T], got shape {tuple(samples.shape)}; use Audio16k.samples")
        need = self.receptive_field + self.stride  # two encoder frames, so that 30-fps output is not empty
        if samples.shape[0] < need:
            raise ValueError(
                f"audio too short: {samples.shape[0]} samples ({samples.shape[0] / self.sample_rate:.3f} s); "
                f"at least {need} samples ({need / self.sample_rate:.3f} s) are needed"
            )
        return samples
