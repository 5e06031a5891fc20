"""Wan2.1 video VAE: diffusers `AutoencoderKLWan` with the official weights and the
Live Avatar latent normalisation, plus a streaming decoder whose causal caches persist
across calls (the online decode of the pipeline-parallel path).

Shapes: video [B, 3, T, H, W] in [-1, 1] with T = 1 + 4k; latents [B, z_dim, 1 + (T - 1) // 4,
H / 8, W / 8]. Latents leaving `encode` and entering `decode` are normalised per channel with the
16 constants of `VAEConfig`: z = (mu - mean) * (1 / std); decode inverts this as z / (1 / std) +
mean (the reference writes both with the reciprocal; other algebraic forms differ by 1e-7..5e-6).

Temporal causality: the encoder sees frames in chunks 1, 4, 4, ...; the decoder one latent frame
at a time, carrying the last two frames of every causal conv's input (models/vae_stream.py: the
caches are explicit tensors, so the decoder's frame step compiles as one graph). The first latent
frame of a fresh cache yields 1 video frame, every later one 4.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from liveavatar.config import VAEConfig

from . import vae_stream


class VAEKeyError(KeyError):
    """An official VAE state dict whose names or shapes do not fit the configured layout."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------
# key conversion: official Wan2.1_VAE names -> diffusers AutoencoderKLWan names
# ----------------------------------------------------------------------------------------------

# Inside a residual block the official nn.Sequential is
# [RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d].
_RESIDUAL_PARTS = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.",
                   "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}
# Leaves shared by both layouts (attention block and resample layers keep their names).
_KEEP_LEAVES = re.compile(r"^(norm\.gamma|to_qkv\.(weight|bias)|proj\.(weight|bias)|"
                          r"resample\.1\.(weight|bias)|time_conv\.(weight|bias))$")
_TOP_LEVEL = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
_HEAD = {"head.0.gamma": "norm_out.gamma", "head.2.weight": "conv_out.weight", "head.2.bias": "conv_out.bias"}


def _residual_or_keep(rest: str) -> str | None:
    """Rename the inside of a residual / attention / resample module; None if unknown."""
    for old, new in _RESIDUAL_PARTS.items():
        if rest.startswith(old):
            leaf = rest[len(old):]
            ok = leaf == "gamma" if new.startswith("norm") else leaf in ("weight", "bias")
            return new + leaf if ok else None
    return rest if _KEEP_LEAVES.match(rest) else None


def _decoder_upsample_slot(index: int, num_res_blocks: int, num_levels: int) -> str | None:
    """Flat official `decoder.upsamples.<index>` -> `up_blocks.<level>.resnets.<j>` / `.upsamplers.0`.

    Each level holds num_res_blocks + 1 residual blocks, then (except the last level) one
    resample module.
    """
    per_level = num_res_blocks + 2
    level, pos = divmod(index, per_level)
    if level >= num_levels:
        return None
    if pos <= num_res_blocks:
        return f"up_blocks.{level}.resnets.{pos}."
    if level == num_levels - 1:  # the last level has no resample
        return None
    return f"up_blocks.{level}.upsamplers.0."


def _convert_vae_key(key: str, num_res_blocks: int, num_levels: int) -> str | None:
    for old, new in _TOP_LEVEL.items():
        if key.startswith(old) and key[len(old):] in ("weight", "bias"):
            return new + key[len(old):]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder") or not rest:
        return None
    if rest in ("conv1.weight", "conv1.bias"):
        return f"{side}.conv_in.{rest.split('.')[1]}"
    if rest in _HEAD:
        return f"{side}.{_HEAD[rest]}"
    m = re.match(r"^middle\.(\d+)\.(.+)$", rest)
    if m:
        slot = {"0": "mid_block.resnets.0.", "1": "mid_block.attentions.0.", "2": "mid_block.resnets.1."}
        inner = _residual_or_keep(m.group(2))
        return f"{side}.{slot[m.group(1)]}{inner}" if m.group(1) in slot and inner else None
    m = re.match(r"^downsamples\.(\d+)\.(.+)$", rest)
    if m and side == "encoder":
        inner = _residual_or_keep(m.group(2))
        return f"encoder.down_blocks.{m.group(1)}.{inner}" if inner else None
    m = re.match(r"^upsamples\.(\d+)\.(.+)$", rest)
    if m and side == "decoder":
        slot = _decoder_upsample_slot(int(m.group(1)), num_res_blocks, num_levels)
        inner = _residual_or_keep(m.group(2))
        return f"decoder.{slot}{inner}" if slot and inner else None
    return None


def convert_vae_state_dict(
    sd: dict[str, torch.Tensor], cfg: VAEConfig = VAEConfig()
) -> dict[str, torch.Tensor]:
    """Official Wan2.1 VAE state dict (194 keys) -> diffusers `AutoencoderKLWan` names.

    The tensors are passed through unchanged (same objects). Raises `VAEKeyError` naming the
    first keys it cannot place. Whether every expected key is present is checked against the
    built model by `WanVAE.from_official_state_dict`.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        new = _convert_vae_key(key, cfg.num_res_blocks, len(cfg.dim_mult))
        if new is None:
            unknown.append(key)
        elif new in out:
            raise VAEKeyError(f"VAE state dict: two keys map to {new!r} (second: {key!r})")
        else:
            out[new] = value
    if unknown:
        hint = ""
        if any(k.startswith(("encoder.conv_in", "decoder.up_blocks", "quant_conv")) for k in unknown):
            hint = " (these look like diffusers names already; load them directly)"
        raise VAEKeyError(
            f"VAE state dict: {len(unknown)} key(s) are not official Wan2.1 VAE names, first: "
            f"{unknown[:5]}{hint}"
        )
    return out


def load_official_vae_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read `Wan2.1_VAE.pth` (a pickled dict of tensors, read with weights_only) or a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE weights not found: {path} (expected Wan2.1_VAE.pth from the Wan2.2-S2V folder)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from ..loading.safetensors_io import load_pth_state_dict

    return load_pth_state_dict(path)  # weights-only: never unpickles code


# ----------------------------------------------------------------------------------------------
# the wrapper
# ----------------------------------------------------------------------------------------------


def _count_causal_convs(module: nn.Module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


def build_autoencoder(cfg: VAEConfig = VAEConfig()) -> nn.Module:
    """An empty (meta-device) diffusers `AutoencoderKLWan` of the configured layout."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan(
            base_dim=cfg.base_dim,
            z_dim=cfg.z_dim,
            dim_mult=list(cfg.dim_mult),
            num_res_blocks=cfg.num_res_blocks,
            attn_scales=[],
            temperal_downsample=list(cfg.temperal_downsample),
            dropout=0.0,
            latents_mean=list(cfg.latents_mean),
            latents_std=list(cfg.latents_std),
        )
    return model


class WanVAE:
    """Wan2.1 VAE for Live Avatar (see the module docstring for shapes and normalisation).

    `model` is the diffusers `AutoencoderKLWan`; it runs in `dtype` on `device`. Latents in and
    out are float32; the normalisation is done in float32 (as in the reference, whose constants
    are float32 tensors), and decoded video is returned as float32.
    """

    def __init__(self, model: nn.Module, cfg: VAEConfig = VAEConfig(), device="cpu", dtype=torch.float32):
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(
                f"VAEConfig: latents_mean/latents_std need {cfg.z_dim} values (z_dim), got "
                f"{len(cfg.latents_mean)}/{len(cfg.latents_std)}"
            )
        self.cfg = cfg
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=self.device)
        self.inv_std = 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32, device=self.device)
        self.num_encoder_caches = _count_causal_convs(model.encoder)
        # the decoder's frame steps (vae_stream): eager, or compiled regions after compile_decoder()
        self.first_frame = vae_stream.first_frame
        self.next_frame = vae_stream.next_frame
        # use_cuda_graphs(): vae_graphs.GraphCounts of the streaming decoders that replay their
        # steady call from CUDA graphs; None: no graphs
        self.graph_counts = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_official_state_dict(
        cls, sd: dict[str, torch.Tensor], cfg: VAEConfig = VAEConfig(), device="cpu", dtype=torch.float32
    ) -> "WanVAE":
        """Build from an official-name state dict (e.g. `Wan2.1_VAE.pth`); strict names and shapes."""
        converted = convert_vae_state_dict(sd, cfg)
        model = build_autoencoder(cfg)
        expected = model.state_dict()
        missing = [k for k in expected if k not in converted]
        if missing:
            raise VAEKeyError(
                f"VAE state dict: {len(missing)} weight(s) missing for base_dim={cfg.base_dim}, "
                f"dim_mult={list(cfg.dim_mult)}; first diffusers names: {missing[:5]}"
            )
        extra = [k for k in converted if k not in expected]
        if extra:
            raise VAEKeyError(f"VAE state dict: {len(extra)} unexpected weight(s), first: {extra[:5]}")
        bad = [(k, tuple(converted[k].shape), tuple(v.shape)) for k, v in expected.items()
               if tuple(converted[k].shape) != tuple(v.shape)]
        if bad:
            k, got, want = bad[0]
            raise VAEKeyError(
                f"VAE state dict: {len(bad)} shape mismatch(es), first {k}: file {got}, model {want}; "
                f"is VAEConfig.base_dim ({cfg.base_dim}) right for this file?"
            )
        tensors = {k: v.to(device=device, dtype=dtype) for k, v in converted.items()}
        model.load_state_dict(tensors, strict=True, assign=True)
        return cls(model, cfg, device=device, dtype=dtype)

    @classmethod
    def from_file(cls, path: str | Path, cfg: VAEConfig = VAEConfig(), device="cpu", dtype=torch.float32) -> "WanVAE":
        return cls.from_official_state_dict(load_official_vae_file(path), cfg, device=device, dtype=dtype)

    # -- normalisation -----------------------------------------------------------------------
    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw posterior mean [B, z, t, h, w] -> model latents (float32)."""
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        return (mu.float() - self.mean.view(shape)) * self.inv_std.view(shape)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model latents [B, z, t, h, w] -> raw decoder input (float32)."""
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        return z.float() / self.inv_std.view(shape) + self.mean.view(shape)

    # -- encode / decode ---------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 8 ->
        normalised latents [B, z_dim, 1 + (T - 1) // 4, H / 8, W / 8] (float32)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"WanVAE.encode: expected video [B, 3, T, H, W], got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % 4 or h % 8 or w % 8:
            raise ValueError(
                f"WanVAE.encode: T={t} must be 1 + 4k and H={h}, W={w} multiples of 8 "
                "(trim or pad the clip first)"
            )
        # one video at a time, as the reference does (batched convs differ by ~1e-6)
        return torch.cat([self._encode_one(v[None]) for v in video], dim=0)

    def _encode_one(self, video: torch.Tensor) -> torch.Tensor:
        t = video.shape[2]
        x = video.to(device=self.device, dtype=self.dtype)
        cache: list = [None] * self.num_encoder_caches
        chunks = []
        for start, stop in [(0, 1)] + [(1 + 4 * i, 5 + 4 * i) for i in range((t - 1) // 4)]:
            chunks.append(self.model.encoder(x[:, :, start:stop], feat_cache=cache, feat_idx=[0]))
        moments = self.model.quant_conv(torch.cat(chunks, dim=2))
        mu = moments[:, : self.cfg.z_dim]
        return self.normalize(mu)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z_dim, T, h, w] -> video [B, 3, 1 + 4(T - 1), 8h, 8w] in [-1, 1]
        (float32). One-shot: a fresh streaming decoder fed all frames at once."""
        return self.streaming_decoder().decode(latents)

    def streaming_decoder(self) -> "StreamingDecoder":
        return StreamingDecoder(self)

    def compile_decoder(self) -> None:
        """torch.compile the decoder's two frame steps (`vae_stream.first_frame` / `next_frame`) as
        full-graph regions with static shapes (`compile_cache.compiled_region`: with
        `LIVEAVATAR_PRECOMPILE=1` a warm start loads them from dynamo's precompile cache). Each
        compiles at its first call: the first latent frame of a video, then the second; nothing
        recompiles after that for the same frame size. Weights and state-dict keys unchanged."""
        from liveavatar.compile_cache import compiled_region, use_cache_dir

        use_cache_dir()
        self.first_frame = compiled_region(vae_stream.first_frame)
        self.next_frame = compiled_region(vae_stream.next_frame)

    def use_cuda_graphs(self, enable: bool = True) -> None:
        """Streaming decoders made from now on replay their steady-state per-latent-frame call
        from a CUDA graph (`vae_graphs.FrameGraph`: the same kernels, the same frames; on CPU the
        same body eagerly). For small sizes, where launching ~500 kernels per latent frame costs
        more than running them. Not with `compile_decoder`. `graph_counts`: captures / replays."""
        from liveavatar.models.vae_graphs import GraphCounts

        self.graph_counts = GraphCounts() if enable else None


class StreamingDecoder:
    """Decoder with causal caches that persist across `decode` calls.

    Feeding latents in any split (frame by frame, 7 + 3 + 3, all at once) gives the same frames
    bit for bit: each latent frame goes through the decoder on its own (`WanVAE.first_frame` /
    `next_frame`), with the cache tensors carried over. The first latent frame after construction
    or `reset()` gives 1 video frame, every other latent frame 4.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Forget the history: the next latent frame is decoded as the first of a video."""
        self._caches: list[tuple[torch.Tensor, ...]] = []  # per batch element: vae_stream's caches
        self._graphs: list = []  # after vae.use_cuda_graphs(): one FrameGraph per video of the batch
        self.frames_in = 0

    @property
    def fresh(self) -> bool:
        return self.frames_in == 0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, z_dim, n, h, w] (normalised) -> frames [B, 3, F, 8h, 8w] float32 in [-1, 1],
        F = 4n, or 4n - 3 on a fresh decoder."""
        vae = self.vae
        if latents.ndim != 5 or latents.shape[1] != vae.cfg.z_dim:
            raise ValueError(
                f"StreamingDecoder.decode: expected latents [B, {vae.cfg.z_dim}, n, h, w], got {tuple(latents.shape)}"
            )
        if latents.shape[2] == 0:
            raise ValueError("StreamingDecoder.decode: no latent frames given (n = 0)")
        batch = latents.shape[0]
        if not self.fresh and batch != len(self._caches):
            raise ValueError(
                f"StreamingDecoder.decode: batch size changed from {len(self._caches)} to {batch}; call reset() first"
            )
        first = self.fresh
        if first and vae.graph_counts is not None:
            from liveavatar.models.vae_graphs import FrameGraph

            self._graphs = [FrameGraph(vae.next_frame, vae.graph_counts) for _ in range(batch)]
        z = vae.denormalize(latents.to(vae.device)).to(vae.dtype)
        videos = []
        # one video at a time, as the reference does (batched convs differ by ~1e-6)
        for b in range(batch):
            x = vae.model.post_quant_conv(z[b : b + 1])
            frames = []
            for i in range(x.shape[2]):
                (frame,) = vae_stream.same_layout((x[:, :, i : i + 1],))  # one layout whatever n: no recompiles
                if first and i == 0:
                    out, caches = vae.first_frame(vae.model.decoder, frame)
                    self._caches.append(vae_stream.same_layout(caches))
                else:
                    step = self._graphs[b].next_frame if self._graphs else vae.next_frame
                    out, caches = step(vae.model.decoder, frame, self._caches[b])
                    self._caches[b] = vae_stream.same_layout(caches)
                frames.append(out)
            videos.append(torch.cat(frames, dim=2))
        self.frames_in += latents.shape[2]
        return torch.cat(videos, dim=0).float().clamp_(-1.0, 1.0)

__all__ = [
    "VAEKeyError", "convert_vae_state_dict", "load_official_vae_file", "build_autoencoder",
    "WanVAE", "StreamingDecoder",
]
