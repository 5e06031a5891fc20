"""Tiny random checkpoints in the official Wan2.2-S2V-14B folder layout (tests, demo, CLI).

`make_tiny_checkpoint(dir)` writes, in a few seconds and under 10 MB, every file the real folder
has (same names, same key names, shapes scaled down) plus the Live Avatar LoRA:

    config.json                                   DiT config in the checkpoint schema
    diffusion_pytorch_model-0000{1,2}-of-00002.safetensors + ...safetensors.index.json
    models_t5_umt5-xxl-enc-bf16.pth + t5_config.json     (weights-only torch.save, official names)
    google/umt5-xxl/                              tokenizer folder
    Wan2.1_VAE.pth + vae_config.json              (official names, small base width)
    wav2vec2-large-xlsr-53-english/               HF Wav2Vec2ForCTC: config.json, model.safetensors,
                                                  preprocessor_config.json
    liveavatar.safetensors                        peft-named LoRA for every target layer

Weights follow the fixture rule (fixtures README, case 1), so no layer is zero and every path
runs: `*modulation` N(0,1)/sqrt(dim); 1-D norm weights (and VAE `gamma`) 1 + 0.1 N; other 1-D
0.02 N; >= 2-D N(0,1)/sqrt(fan_in); `casual_audio_encoder.weights` 0.01 + 0.5 N;
`padding_tokens` 0.5 N; `trainable_cond_mask` 0.1 N; all drawn from one `torch.Generator(seed)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from ..config import OFFICIAL_FILES, DiTConfig, LoRAConfig, T5Config, VAEConfig, dataclass_to_json

Shapes = dict[str, tuple[int, ...]]

TINY_DIT = DiTConfig(
    dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2, text_len=512, audio_dim=32,
    audio_inject_layers=(0, 1), text_dim=32, audio_num_layers=3,
)
TINY_T5 = T5Config(vocab=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=32)
TINY_VAE = VAEConfig(base_dim=8)
TINY_LORA_RANK = 4


# ---------------------------------------------------------------------------------------------
# key lists (official names) derived from the configs
# ---------------------------------------------------------------------------------------------

def dit_key_shapes(cfg: DiTConfig) -> Shapes:
    """Official state-dict keys and shapes of the causal S2V DiT (1260 keys for the 14B)."""
    d, f = cfg.dim, cfg.ffn_dim
    pt, ph, pw = cfg.patch_size
    patch = (d, cfg.in_dim, pt, ph, pw)
    s: Shapes = {
        "patch_embedding.weight": patch, "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
    }
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        s[b + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            if attn == "cross_attn":
                s[b + "norm3.weight"], s[b + "norm3.bias"] = (d,), (d,)
            for p in "qkvo":
                s[f"{b}{attn}.{p}.weight"], s[f"{b}{attn}.{p}.bias"] = (d, d), (d,)
            s[f"{b}{attn}.norm_q.weight"], s[f"{b}{attn}.norm_k.weight"] = (d,), (d,)
        s[b + "ffn.0.weight"], s[b + "ffn.0.bias"] = (f, d), (f,)
        s[b + "ffn.2.weight"], s[b + "ffn.2.bias"] = (d, f), (d,)
    s["head.modulation"] = (1, 2, d)
    s["head.head.weight"] = (cfg.out_dim * pt * ph * pw, d)
    s["head.head.bias"] = (cfg.out_dim * pt * ph * pw,)
    s["cond_encoder.weight"], s["cond_encoder.bias"] = (d, cfg.cond_dim, pt, ph, pw), (d,)
    a = "casual_audio_encoder."
    s[a + "weights"] = (1, cfg.audio_num_layers, 1, 1)
    s[a + "encoder.padding_tokens"] = (1, 1, 1, d)
    convs = {
        "conv1_local": (d // 4 * cfg.num_audio_token, cfg.audio_dim), "conv1_global": (d // 4, cfg.audio_dim),
        "conv2": (d // 2, d // 4), "conv3": (d, d // 2),
    }
    for name, (out_c, in_c) in convs.items():
        s[f"{a}encoder.{name}.conv.weight"], s[f"{a}encoder.{name}.conv.bias"] = (out_c, in_c, 3), (out_c,)
    s[a + "encoder.final_linear.weight"], s[a + "encoder.final_linear.bias"] = (d, d), (d,)
    for j in range(len(cfg.audio_inject_layers)):
        b = f"audio_injector.injector.{j}."
        for p in "qkvo":
            s[f"{b}{p}.weight"], s[f"{b}{p}.bias"] = (d, d), (d,)
        s[b + "norm_q.weight"], s[b + "norm_k.weight"] = (d,), (d,)
    for j in range(len(cfg.audio_inject_layers)):
        b = f"audio_injector.injector_adain_layers.{j}.linear."
        s[b + "weight"], s[b + "bias"] = (2 * d, d), (2 * d,)
    s["trainable_cond_mask.weight"] = (3, d)
    for name, k in (("proj", 1), ("proj_2x", 2), ("proj_4x", 4)):
        s[f"frame_packer.{name}.weight"] = (d, cfg.in_dim, pt * k, ph * k, pw * k)
        s[f"frame_packer.{name}.bias"] = (d,)
    return s


def t5_key_shapes(cfg: T5Config) -> Shapes:
    """Official umT5 encoder keys (`models_t5_umt5-xxl-enc-bf16.pth` names)."""
    s: Shapes = {"token_embedding.weight": (cfg.vocab, cfg.dim)}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        s[b + "norm1.weight"] = (cfg.dim,)
        for p in "qkv":
            s[f"{b}attn.{p}.weight"] = (cfg.dim_attn, cfg.dim)
        s[b + "attn.o.weight"] = (cfg.dim, cfg.dim_attn)
        s[b + "norm2.weight"] = (cfg.dim,)
        s[b + "ffn.gate.0.weight"] = (cfg.dim_ffn, cfg.dim)
        s[b + "ffn.fc1.weight"] = (cfg.dim_ffn, cfg.dim)
        s[b + "ffn.fc2.weight"] = (cfg.dim, cfg.dim_ffn)
        s[b + "pos_embedding.embedding.weight"] = (cfg.num_buckets, cfg.num_heads)
    s["norm.weight"] = (cfg.dim,)
    return s


def vae_key_shapes(cfg: VAEConfig) -> Shapes:
    """Official Wan2.1 VAE keys (`Wan2.1_VAE.pth` names; 194 for the standard layout)."""
    s: Shapes = {}

    def conv3(name: str, c_out: int, c_in: int, k: tuple[int, int, int]) -> None:
        s[name + ".weight"], s[name + ".bias"] = (c_out, c_in, *k), (c_out,)

    def res(name: str, c_in: int, c_out: int) -> None:
        s[name + ".residual.0.gamma"] = (c_in, 1, 1, 1)
        conv3(name + ".residual.2", c_out, c_in, (3, 3, 3))
        s[name + ".residual.3.gamma"] = (c_out, 1, 1, 1)
        conv3(name + ".residual.6", c_out, c_out, (3, 3, 3))
        if c_in != c_out:
            conv3(name + ".shortcut", c_out, c_in, (1, 1, 1))

    def attn(name: str, c: int) -> None:
        s[name + ".norm.gamma"] = (c, 1, 1)
        s[name + ".to_qkv.weight"], s[name + ".to_qkv.bias"] = (3 * c, c, 1, 1), (3 * c,)
        s[name + ".proj.weight"], s[name + ".proj.bias"] = (c, c, 1, 1), (c,)

    def resample(name: str, c: int, c_out: int, temporal: int | None) -> None:
        s[name + ".resample.1.weight"], s[name + ".resample.1.bias"] = (c_out, c, 3, 3), (c_out,)
        if temporal is not None:
            conv3(name + ".time_conv", temporal, c, (3, 1, 1))

    base, z, mult, n_res = cfg.base_dim, cfg.z_dim, tuple(cfg.dim_mult), cfg.num_res_blocks
    dims = [base * m for m in (1, *mult)]
    conv3("encoder.conv1", dims[0], 3, (3, 3, 3))
    idx = 0
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(n_res):
            res(f"encoder.downsamples.{idx}", c_in, c_out)
            c_in, idx = c_out, idx + 1
        if i != len(mult) - 1:
            resample(f"encoder.downsamples.{idx}", c_out, c_out, c_out if cfg.temperal_downsample[i] else None)
            idx += 1
    top = dims[-1]
    res("encoder.middle.0", top, top), attn("encoder.middle.1", top), res("encoder.middle.2", top, top)
    s["encoder.head.0.gamma"] = (top, 1, 1, 1)
    conv3("encoder.head.2", 2 * z, top, (3, 3, 3))
    conv3("conv1", 2 * z, 2 * z, (1, 1, 1))
    conv3("conv2", z, z, (1, 1, 1))
    dims = [base * m for m in (mult[-1], *mult[::-1])]
    up_t = tuple(cfg.temperal_downsample)[::-1]
    conv3("decoder.conv1", dims[0], z, (3, 3, 3))
    res("decoder.middle.0", dims[0], dims[0]), attn("decoder.middle.1", dims[0])
    res("decoder.middle.2", dims[0], dims[0])
    idx = 0
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        if 0 < i < len(mult):
            c_in //= 2
        for _ in range(n_res + 1):
            res(f"decoder.upsamples.{idx}", c_in, c_out)
            c_in, idx = c_out, idx + 1
        if i != len(mult) - 1:
            resample(f"decoder.upsamples.{idx}", c_out, c_out // 2, 2 * c_out if up_t[i] else None)
            idx += 1
    s["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv3("decoder.head.2", 3, dims[-1], (3, 3, 3))
    return s


# ---------------------------------------------------------------------------------------------
# random weights
# ---------------------------------------------------------------------------------------------

def draw_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """One tensor by the fixture rule (see module docstring), float32."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    is_norm = leaf == "gamma" or (leaf == "weight" and "norm" in name and len(shape) == 1)
    if name.endswith("modulation"):
        return noise / math.sqrt(shape[-1])
    if name.endswith("casual_audio_encoder.weights"):
        return 0.01 + 0.5 * noise
    if name.endswith("padding_tokens"):
        return 0.5 * noise
    if name.endswith("trainable_cond_mask.weight"):
        return 0.1 * noise
    if is_norm:
        return 1.0 + 0.1 * noise
    if len(shape) <= 1:
        return 0.02 * noise
    return noise / math.sqrt(math.prod(shape[1:]))


def draw_state_dict(shapes: Shapes, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: draw_tensor(k, v, gen).to(dtype) for k, v in shapes.items()}


def dit_shapes_from_model(cfg: DiTConfig) -> Shapes | None:
    """Key shapes of `CausalS2VDiT(cfg)` built on meta, or None while that class is unavailable."""
    try:
        from ..models.dit import CausalS2VDiT
    except ImportError:
        return None
    with torch.device("meta"):
        model = CausalS2VDiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def lora_state_dict(target_shapes: dict[str, tuple[int, int]], rank: int, gen: torch.Generator,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """peft-named LoRA (`base_model.model.<m>.lora_{A,B}.default.weight`), nonzero A and B."""
    out: dict[str, torch.Tensor] = {}
    for module, (out_f, in_f) in target_shapes.items():
        a = torch.randn((rank, in_f), generator=gen) / math.sqrt(in_f)
        b = 0.1 * torch.randn((out_f, rank), generator=gen) / math.sqrt(rank)
        out[f"base_model.model.{module}.lora_A.default.weight"] = a.to(dtype)
        out[f"base_model.model.{module}.lora_B.default.weight"] = b.to(dtype)
    return out


def lora_targets_from_shapes(shapes: Shapes, targets: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Linear layers (2-D `.weight` with a `.bias` or not) whose name matches a peft target suffix."""
    targets = tuple(targets)
    out: dict[str, tuple[int, int]] = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        module = key[: -len(".weight")]
        if any(module == t or module.endswith("." + t) for t in targets):
            out[module] = (shape[0], shape[1])
    return out


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------

def _save_sharded(sd: dict[str, torch.Tensor], out_dir: Path, shards: int = 2) -> None:
    from safetensors.torch import save_file

    keys = list(sd)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for k in keys:
        size = sd[k].numel() * sd[k].element_size()
        groups[min(shards - 1, acc * shards // max(total, 1))].append(k)
        acc += size
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in group}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / OFFICIAL_FILES.dit_index).write_text(json.dumps(index, indent=2) + "\n")


def _write_wav2vec(folder: Path, hidden: int, num_states: int, gen: torch.Generator) -> None:
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    folder.mkdir(parents=True, exist_ok=True)
    config = Wav2Vec2Config(
        vocab_size=32, hidden_size=hidden, num_hidden_layers=num_states - 1, num_attention_heads=2,
        intermediate_size=2 * hidden, conv_dim=(16,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_bias=True, feat_extract_norm="layer",
        do_stable_layer_norm=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, architectures=["Wav2Vec2ForCTC"],
    )
    with torch.device("meta"):
        model = Wav2Vec2ForCTC(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    save_file(draw_state_dict(shapes, gen), str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.to_json_file(str(folder / "config.json"))
    pre = {"do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
           "padding_side": "right", "padding_value": 0.0, "processor_class": "Wav2Vec2Processor",
           "return_attention_mask": True, "sampling_rate": 16000}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=1) + "\n")


def make_tiny_checkpoint(
    out_dir: str | Path,
    seed: int = 0,
    *,
    dit: DiTConfig | None = None,
    t5: T5Config | None = None,
    vae: VAEConfig | None = None,
    lora_rank: int = TINY_LORA_RANK,
    dtype: torch.dtype = torch.float32,
    with_lora: bool = True,
) -> Path:
    """Write a tiny random checkpoint in the official folder layout to `out_dir`; returns it.

    `dit` defaults to `TINY_DIT` (dim 64, 4 heads, 2 layers, ffn 128, audio_dim 32, inject
    layers [0, 1], text_dim 32). The T5 dim is forced to `dit.text_dim`, the wav2vec2 hidden size
    to `dit.audio_dim` and its layer count to `dit.audio_num_layers - 1`. `dtype` is the storage
    dtype of the DiT, T5 and LoRA (the VAE is stored in float32, as the official file).
    """
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = (dit or TINY_DIT).validate("make_tiny_checkpoint(dit=...)")
    t5_cfg = dataclasses.replace(t5 or TINY_T5, dim=cfg.text_dim)
    vae_cfg = vae or TINY_VAE
    gen = torch.Generator().manual_seed(seed)

    shapes = dit_shapes_from_model(cfg) or dit_key_shapes(cfg)
    (out / OFFICIAL_FILES.config).write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    dit_sd = draw_state_dict(shapes, gen, dtype)
    _save_sharded(dit_sd, out)

    torch.save(draw_state_dict(t5_key_shapes(t5_cfg), gen, dtype), out / OFFICIAL_FILES.t5)
    dataclass_to_json(t5_cfg, out / OFFICIAL_FILES.t5_config)
    _write_tokenizer(out / OFFICIAL_FILES.tokenizer_dir, t5_cfg.vocab)

    torch.save(draw_state_dict(vae_key_shapes(vae_cfg), gen, torch.float32), out / OFFICIAL_FILES.vae)
    dataclass_to_json(vae_cfg, out / OFFICIAL_FILES.vae_config)

    _write_wav2vec(out / OFFICIAL_FILES.wav2vec_dir, cfg.audio_dim, cfg.audio_num_layers, gen)

    if with_lora:
        from safetensors.torch import save_file

        targets = lora_targets_from_shapes(shapes, LoRAConfig().targets)
        save_file(lora_state_dict(targets, lora_rank, gen, dtype), str(out / OFFICIAL_FILES.lora))
    return out


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    from ..models.text_encoder import make_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    make_tiny_tokenizer(folder, vocab_size)


__all__ = [
    "make_tiny_checkpoint", "dit_key_shapes", "t5_key_shapes", "vae_key_shapes", "draw_tensor",
    "draw_state_dict", "lora_state_dict", "lora_targets_from_shapes", "TINY_DIT", "TINY_T5", "TINY_VAE",
]
