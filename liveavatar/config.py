"""Configuration as data.

`DiTConfig` mirrors the checkpoint's `config.json` (the schema written for `WanModel_S2V`, as in
the official Wan2.2-S2V-14B folder). Keys that the official loader drops (`patch_size`,
`cross_attn_norm`, `qk_norm`, `text_dim`, `window_size`) take the class defaults used by the
reference. `StreamConfig` holds the streaming-generation constants of Live Avatar (block and clip
sizes, motion history, sink RoPE positions, schedule), which are properties of the trained model,
not of the checkpoint file.

No module of this package hard-codes a model dimension: everything is read from these classes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot describe a Live Avatar DiT. The message names the file and key."""


def _kind(default: Any) -> str:
    if isinstance(default, tuple):
        return "a list of numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(default)]


def _same_kind(value: Any, default: Any) -> bool:
    """`value` (from JSON) fits a field whose default is `default` (bool, int, float, str, tuple)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, type(default))


@dataclass(frozen=True)
class DiTConfig:
    """Causal S2V DiT hyper-parameters (the `config.json` of a Wan2.2-S2V checkpoint)."""

    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    text_len: int = 512
    eps: float = 1e-6
    cond_dim: int = 16
    audio_dim: int = 1024
    num_audio_token: int = 4
    enable_adain: bool = True
    adain_mode: str = "attn_norm"
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    zero_init: bool = True
    zero_timestep: bool = True
    enable_motioner: bool = False
    add_last_motion: bool = True
    enable_tsm: bool = False
    trainable_token_pos_emb: bool = False
    motion_token_num: int = 1024
    enable_framepack: bool = True
    framepack_drop_mode: str = "padd"
    model_type: str = "s2v"
    # Not stored in config.json by the official writer (class defaults apply).
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    qk_norm: bool = True
    cross_attn_norm: bool = True
    # Number of wav2vec2 hidden states the audio encoder weights (num_hidden_layers + 1);
    # the reference hard-codes 25. Read from `casual_audio_encoder.weights` when loading.
    audio_num_layers: int = 25

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Complex RoPE pairs per axis (time, height, width): [c - 2(c//3), c//3, c//3], c = hd/2."""
        c = self.head_dim // 2
        return (c - 2 * (c // 3), c // 3, c // 3)

    def validate(self, source: str = "config.json") -> "DiTConfig":
        problems = []
        if self.dim % self.num_heads:
            problems.append(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        elif self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} must be even for RoPE")
        if self.in_dim != 16 or self.out_dim != 16 or self.cond_dim != 16:
            problems.append("in_dim, out_dim and cond_dim must be 16 (the Wan2.1 VAE latent channels)")
        if self.dim % 4:
            problems.append(f"dim {self.dim} must be divisible by 4 (audio tokens)")
        bad = [i for i in self.audio_inject_layers if not 0 <= i < self.num_layers]
        if bad:
            problems.append(f"audio_inject_layers {bad} are outside 0..{self.num_layers - 1}")
        if self.model_type != "s2v":
            problems.append(f"model_type is {self.model_type!r}, expected 's2v'")
        if tuple(self.patch_size) != (1, 2, 2):
            problems.append(f"patch_size {self.patch_size} is not (1, 2, 2)")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> "DiTConfig":
        """Build from a config.json dict; unknown keys (e.g. `_class_name`) are ignored."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object of DiT settings, got a {type(data).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        wrong: list[str] = []
        for key, value in data.items():
            if key not in names:
                continue
            if isinstance(value, list):
                value = tuple(value)
            if not _same_kind(value, names[key].default):
                wrong.append(f"{key} = {value!r} (expected {_kind(names[key].default)})")
            kwargs[key] = value
        if wrong:
            raise ConfigError(f"{source}: wrong value types: " + "; ".join(wrong))
        try:
            return cls(**kwargs).validate(source)
        except TypeError as exc:  # pragma: no cover - dataclass signature problems
            raise ConfigError(f"{source}: {exc}") from exc

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json here; point --ckpt-dir at a Wan2.2-S2V folder")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The config.json form (lists, `_class_name` first), as the official writer emits it."""
        out: dict[str, Any] = {"_class_name": "WanModel_S2V", "_diffusers_version": "0.35.2"}
        skip = {"patch_size", "text_dim", "qk_norm", "cross_attn_norm", "audio_num_layers"}
        for f in dataclasses.fields(self):
            if f.name in skip:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class StreamConfig:
    """Streaming-generation constants of Live Avatar (trained values; see the spec §2.6, §3.4).

    Units: `fps` video frames per second; frames are video frames unless named `latent`.
    """

    fps: int = 25
    lead_in_frames: int = 3  # silent frames in front of the audio, dropped from the video (pipeline/plan.py)
    frames_per_block_latent: int = 3  # 3 latent frames = 12 video frames per causal block
    blocks_per_clip: int = 4  # infer_frames 48 = 4 blocks
    vae_stride_t: int = 4
    vae_stride_hw: int = 8
    motion_frames: int = 73  # video frames of motion history
    motion_frames_latent: int = 19  # (73 + 3) // 4
    framepack_buckets: tuple[int, int, int] = (1, 2, 16)  # newest first
    ref_rope_position: int = 30  # temporal RoPE index of the reference (sink) token
    sink_offset_range: tuple[int, int] = (4, 30)  # relative_dist drawn per denoising call
    motion_rope_positions: tuple[int, ...] = (-1, -3, -19, -14, -9, -4)
    num_train_timesteps: int = 1000
    shift: float = 3.0
    audio_feature_fps: int = 30  # wav2vec2 features are resampled 50 -> 30 per second
    sample_rate: int = 16000
    size_multiple: int = 64
    sizes: tuple[str, ...] = (
        "720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704",
        "1024*704", "704*1024", "720*400", "704*384", "688*368", "384*256",
    )

    @property
    def frames_per_block(self) -> int:
        return self.frames_per_block_latent * self.vae_stride_t

    @property
    def frames_per_clip(self) -> int:
        return self.frames_per_block * self.blocks_per_clip

    @property
    def latent_frames_per_clip(self) -> int:
        return self.frames_per_block_latent * self.blocks_per_clip


DEFAULT_STREAM = StreamConfig()


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE layout (diffusers `AutoencoderKLWan` arguments) and latent normalisation."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )


@dataclass(frozen=True)
class T5Config:
    """umT5 encoder layout (official `T5Encoder` arguments; umT5-XXL by default)."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    text_len: int = 512


@dataclass(frozen=True)
class CheckpointFiles:
    """File names of the official Wan2.2-S2V-14B folder layout."""

    config: str = "config.json"
    dit_index: str = "diffusion_pytorch_model.safetensors.index.json"
    dit_single: str = "diffusion_pytorch_model.safetensors"
    t5: str = "models_t5_umt5-xxl-enc-bf16.pth"
    tokenizer_dir: str = "google/umt5-xxl"
    vae: str = "Wan2.1_VAE.pth"
    wav2vec_dir: str = "wav2vec2-large-xlsr-53-english"
    lora: str = "liveavatar.safetensors"
    # Our own additions for tiny checkpoints (absent from the official folder; optional).
    t5_config: str = "t5_config.json"
    vae_config: str = "vae_config.json"


OFFICIAL_FILES = CheckpointFiles()


@dataclass(frozen=True)
class LoRAConfig:
    """Live Avatar DMD LoRA: rank, alpha and peft target suffixes."""

    rank: int = 128
    alpha: float = 64.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "ffn.0", "ffn.2")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def dataclass_from_json(cls: type, path: Path, defaults: Any = None) -> Any:
    """Load a flat dataclass (VAEConfig, T5Config) from JSON, tuples for lists; missing -> defaults."""
    data = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown[:5]}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return dataclasses.replace(defaults or cls(), **kwargs)


def dataclass_to_json(obj: Any, path: Path) -> None:
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


__all__ = [
    "ConfigError", "DiTConfig", "StreamConfig", "DEFAULT_STREAM", "VAEConfig", "T5Config",
    "CheckpointFiles", "OFFICIAL_FILES", "LoRAConfig", "dataclass_from_json", "dataclass_to_json",
]
