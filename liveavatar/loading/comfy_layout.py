"""ComfyUI single-file layouts of the same weights, detected from their keys and renamed lazily.

What ComfyUI's loaders accept (read from ComfyUI's source, `comfy/sd.py`, `model_detection.py`,
`ops.py`, `text_encoders/t5.py`, `audio_encoders/*.py`, `ldm/wan/*.py`):

- DiT (`models/diffusion_models/`): the official Wan names (ComfyUI's `WanModel_S2V` uses the
  same module names, `casual_audio_encoder` typo included), either bare or under the prefix
  `model.diffusion_model.` (full checkpoints). fp8 files: plain `float8_e4m3fn` weights, or
  "scaled" fp8 with a per-layer scale: legacy `<layer>.scale_weight` (+ optional
  `<layer>.scale_input`) next to a top-level `scaled_fp8` marker tensor, or the newer
  `<layer>.weight_scale` (+ `input_scale`, `comfy_quant` JSON byte tensor / `_quantization_metadata`
  header entry). Real weight = fp8 weight (as float) * scale.
- umT5 (`models/text_encoders/`): HF T5 names, `shared.weight`,
  `encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o,relative_attention_bias}`,
  `encoder.block.{i}.layer.{0,1}.layer_norm`, `encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}`,
  `encoder.final_layer_norm`; optionally `spiece_model` (the tokenizer as bytes) and fp8 scales.
  `wi_0` is the GELU-gated branch (official `ffn.gate.0`), `wi_1` the linear one (`ffn.fc1`).
- VAE (`models/vae/`): the official Wan2.1 VAE names (`decoder.middle.0.residual.0.gamma`, ...).
- wav2vec2 (`models/audio_encoders/`): HF `Wav2Vec2Model` names, with or without the `wav2vec2.`
  prefix (ComfyUI strips it); the config is inferred from the shapes (ComfyUI does the same).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..config import DiTConfig, T5Config, VAEConfig
from .safetensors_io import CheckpointError, RemappedSource, TensorSource, as_source, format_keys

DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
T5_PREFIXES = ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.", "transformer.")
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_AUX_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".weight_scale_2",
                 ".comfy_quant", ".pre_quant_scale")
_FP8_FORMATS = {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fn_scaled", "float8_e5m2_scaled"}


def _strip(key: str, prefixes: Iterable[str]) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def _is_aux(key: str) -> bool:
    return key == "scaled_fp8" or key.endswith(_AUX_SUFFIXES)


def _has_scales(keys: Iterable[str]) -> bool:
    return any(k.endswith(_SCALE_SUFFIXES) for k in keys)


def detect_layout(source: TensorSource | Any) -> str:
    """Name the layout of a checkpoint from its keys.

    One of: `official_dit`, `comfy_dit`, `comfy_dit_fp8_scaled`, `wan_dit_not_s2v`, `official_t5`,
    `comfy_t5`, `comfy_t5_fp8_scaled`, `wan_vae`, `wan22_vae`, `diffusers_wan_vae`, `hf_wav2vec2`,
    `comfy_wav2vec2`, `lora`, `unknown`.
    """
    keys = set(as_source(source).keys())
    scaled = _has_scales(keys)
    dit_keys = {_strip(k, DIT_PREFIXES) for k in keys}
    if "head.modulation" in dit_keys and any(k.startswith("blocks.0.") for k in dit_keys):
        if not any(k.startswith("casual_audio_encoder.") for k in dit_keys):
            return "wan_dit_not_s2v"
        if scaled:
            return "comfy_dit_fp8_scaled"
        return "official_dit" if "head.modulation" in keys else "comfy_dit"
    t5_keys = {_strip(k, T5_PREFIXES) for k in keys}
    if "token_embedding.weight" in keys and "blocks.0.attn.q.weight" in keys:
        return "official_t5"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in t5_keys:
        return "comfy_t5_fp8_scaled" if scaled else "comfy_t5"
    if "decoder.middle.0.residual.0.gamma" in keys:
        return "wan22_vae" if "decoder.upsamples.0.upsamples.0.residual.2.weight" in keys else "wan_vae"
    if "decoder.conv_in.weight" in keys and any(k.startswith("decoder.up_blocks.") for k in keys) \
            and "quant_conv.weight" in keys:
        return "diffusers_wan_vae"
    if "wav2vec2.encoder.layer_norm.weight" in keys:
        return "hf_wav2vec2"
    if "encoder.layer_norm.weight" in keys and "feature_projection.projection.weight" in keys:
        return "comfy_wav2vec2"
    from .lora import normalize_lora_key

    if keys and sum(normalize_lora_key(k) is not None for k in keys) >= len(keys) // 2 + 1:
        return "lora"
    return "unknown"


# ---------------------------------------------------------------------------------------------
# key conversions
# ---------------------------------------------------------------------------------------------

def comfy_dit_to_official(key: str) -> str | None:
    """ComfyUI DiT key -> official name; None for quantisation side tensors (scales, markers)."""
    if _is_aux(key):
        return None
    return _strip(key, DIT_PREFIXES)


_T5_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.layer\.(\d)\.(.+)$")
_T5_LAYER0 = {
    "layer_norm.weight": "norm1.weight",
    "SelfAttention.q.weight": "attn.q.weight", "SelfAttention.k.weight": "attn.k.weight",
    "SelfAttention.v.weight": "attn.v.weight", "SelfAttention.o.weight": "attn.o.weight",
    "SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
}
_T5_LAYER1 = {
    "layer_norm.weight": "norm2.weight",
    "DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def embedded_tokenizer_blob(source: TensorSource) -> torch.Tensor | None:
    """The SentencePiece model a ComfyUI umT5 file carries as `spiece_model` (uint8), or None.
    `source`: the file's source as opened, or its renamed view from `open_single_file`."""
    base = getattr(source, "base", source)
    return base.get("spiece_model") if "spiece_model" in base.keys() else None


def comfy_t5_to_official(key: str) -> str | None:
    """ComfyUI / HF umT5 encoder key -> official Wan T5 name.

    None for keys the official encoder does not have: the tokenizer blob `spiece_model`, the tied
    copy `encoder.embed_tokens.weight`, `logit_scale`, fp8 scales. Unknown keys come back
    unchanged (a strict load then names them).
    """
    if _is_aux(key) or key in ("spiece_model", "encoder.embed_tokens.weight", "logit_scale"):
        return None
    key = _strip(key, T5_PREFIXES)
    if key in ("spiece_model", "encoder.embed_tokens.weight", "logit_scale"):
        return None
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    match = _T5_BLOCK.match(key)
    if match:
        block, layer, rest = match.groups()
        table = _T5_LAYER0 if layer == "0" else _T5_LAYER1 if layer == "1" else {}
        if rest in table:
            return f"blocks.{block}.{table[rest]}"
    return key


def comfy_wav2vec2_to_hf(key: str) -> str | None:
    """ComfyUI audio-encoder key -> HF `Wav2Vec2ForCTC` name (`wav2vec2.` prefix); heads kept."""
    if _is_aux(key):
        return None
    if key.startswith(("wav2vec2.", "lm_head.", "quantizer.", "project_q.", "project_hid.")):
        return key
    return "wav2vec2." + key


# ---------------------------------------------------------------------------------------------
# fp8 dequantisation
# ---------------------------------------------------------------------------------------------

def _layer_formats(source: TensorSource) -> dict[str, str]:
    """Per-layer quantisation format from `comfy_quant` tensors and `_quantization_metadata`."""
    formats: dict[str, str] = {}
    raw = source.metadata().get("_quantization_metadata")
    if raw:
        try:
            layers = json.loads(raw).get("layers", {})
            formats.update({k: (v.get("format") if isinstance(v, dict) else str(v)) for k, v in layers.items()})
        except (json.JSONDecodeError, AttributeError):
            pass
    for key in source.keys():
        if key.endswith(".comfy_quant"):
            try:
                conf = json.loads(bytes(source.get(key).to(torch.uint8).tolist()).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                conf = {}
            fmt = conf.get("format") if isinstance(conf, dict) else conf
            formats[key[: -len(".comfy_quant")]] = str(fmt)
    return formats


def renamed_source(source: TensorSource | Any, rename: Any, what: str) -> RemappedSource:
    """Rename keys with `rename(key) -> new | None` and fold fp8 scales into their weights.

    For a weight `<layer>.weight` with a sibling `<layer>.scale_weight` or `<layer>.weight_scale`,
    `get()` returns `weight.float() * scale` (scale: scalar, or one value per output row), reported
    as float32. Quantisation formats other than fp8 raise `CheckpointError`.
    """
    source = as_source(source)
    bad = {layer: fmt for layer, fmt in _layer_formats(source).items() if fmt not in _FP8_FORMATS}
    if bad:
        raise CheckpointError(
            f"{source.describe()}: {what} uses quantisation formats we cannot dequantise: "
            f"{format_keys(f'{k}: {v}' for k, v in sorted(bad.items()))} (only fp8 scaled files are supported)"
        )
    names: dict[str, str] = {}
    scales: dict[str, str] = {}
    for key in source.keys():
        new = rename(key)
        if new is None:
            continue
        if new in names:
            raise CheckpointError(f"{source.describe()}: {names[new]!r} and {key!r} both map to {new!r}")
        names[new] = key
        if key.endswith(".weight"):
            stem = key[: -len(".weight")]
            for suffix in _SCALE_SUFFIXES:
                if stem + suffix in source:
                    scales[new] = stem + suffix

    def dequantize(new_key: str, tensor: torch.Tensor) -> torch.Tensor:
        scale_key = scales.get(new_key)
        if scale_key is None:
            return tensor
        scale = source.get(scale_key, device=tensor.device, dtype=torch.float32)
        if scale.numel() > 1:
            scale = scale.reshape(tensor.shape[0], *([1] * (tensor.dim() - 1)))
        return tensor.to(torch.float32) * scale

    return RemappedSource(source, names, transform=dequantize if scales else None,
                          dtypes={k: torch.float32 for k in scales})


def official_dit_source(source: TensorSource | Any) -> RemappedSource:
    """Any DiT layout -> official names (prefix stripped, fp8 scales folded in)."""
    return renamed_source(source, comfy_dit_to_official, "the DiT")


def official_t5_source(source: TensorSource | Any) -> TensorSource:
    """Official or ComfyUI umT5 -> official names."""
    source = as_source(source)
    if detect_layout(source) == "official_t5":
        return source
    return renamed_source(source, comfy_t5_to_official, "the umT5 encoder")


def hf_wav2vec2_source(source: TensorSource | Any) -> RemappedSource:
    return renamed_source(source, comfy_wav2vec2_to_hf, "the wav2vec2 encoder")


# ---------------------------------------------------------------------------------------------
# configs from shapes (single files carry no config.json)
# ---------------------------------------------------------------------------------------------

def _count(keys: Iterable[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def infer_dit_config(source: TensorSource, base: DiTConfig | None = None, **overrides: Any) -> DiTConfig:
    """DiTConfig from official-named DiT shapes (what a bare single file allows).

    Inferred: dim, ffn_dim, freq_dim, num_layers, in/out/cond dims, text_dim, audio_dim,
    num_audio_token, audio_num_layers. num_heads follows the Wan convention head_dim 128 (as
    ComfyUI does) unless given. audio_inject_layers cannot be read from shapes: the 14B list is
    used when the injector count matches it; otherwise pass it (or a config.json as `base`).
    """
    base = base or DiTConfig()
    keys = source.keys()
    dim = source.shape("head.modulation")[-1]
    num_layers = _count(keys, r"^blocks\.(\d+)\.")
    n_inject = _count(keys, r"^audio_injector\.injector\.(\d+)\.")
    conv1 = source.shape("casual_audio_encoder.encoder.conv1_local.conv.weight")
    values: dict[str, Any] = {
        "dim": dim,
        "ffn_dim": source.shape("blocks.0.ffn.0.weight")[0],
        "freq_dim": source.shape("time_embedding.0.weight")[1],
        "num_layers": num_layers,
        "in_dim": source.shape("patch_embedding.weight")[1],
        "out_dim": source.shape("head.head.weight")[0] // 4,
        "cond_dim": source.shape("cond_encoder.weight")[1],
        "text_dim": source.shape("text_embedding.0.weight")[1],
        "audio_dim": conv1[1],
        "num_audio_token": conv1[0] // (dim // 4),
        "audio_num_layers": source.shape("casual_audio_encoder.weights")[1],
    }
    if base.dim != dim or "num_heads" in overrides:
        values["num_heads"] = overrides.get("num_heads", max(1, dim // 128))
    if len(base.audio_inject_layers) != n_inject or any(i >= num_layers for i in base.audio_inject_layers):
        if "audio_inject_layers" not in overrides:
            raise CheckpointError(
                f"{source.describe()}: {n_inject} audio injectors over {num_layers} layers; which layers "
                f"they feed cannot be read from the weights: pass audio_inject_layers or a config.json"
            )
    values.update(overrides)
    import dataclasses

    return dataclasses.replace(base, **values).validate(source.describe())


def infer_t5_config(source: TensorSource, text_len: int = 512) -> T5Config:
    """T5Config from official-named umT5 shapes (all fields are visible in the shapes)."""
    vocab, dim = source.shape("token_embedding.weight")
    buckets, heads = source.shape("blocks.0.pos_embedding.embedding.weight")
    return T5Config(
        vocab=vocab, dim=dim, dim_attn=source.shape("blocks.0.attn.q.weight")[0],
        dim_ffn=source.shape("blocks.0.ffn.fc1.weight")[0], num_heads=heads,
        num_layers=_count(source.keys(), r"^blocks\.(\d+)\."), num_buckets=buckets, text_len=text_len,
    )


def infer_vae_config(source: TensorSource, base: VAEConfig | None = None) -> VAEConfig:
    """VAEConfig (base_dim, z_dim) from official-named Wan2.1 VAE shapes."""
    import dataclasses

    base = base or VAEConfig()
    return dataclasses.replace(base, base_dim=source.shape("encoder.conv1.weight")[0],
                               z_dim=source.shape("conv2.weight")[0])


def wav2vec2_config_from_keys(source: TensorSource, **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HF `Wav2Vec2Config` dict, preprocessor config) inferred from HF-named wav2vec2 shapes.

    `overrides` replace inferred config fields. Heads = hidden / 64 (large: 16, base: 12, as
    ComfyUI assumes; the shapes cannot tell); conv strides are the standard
    (5, 2, 2, 2, 2, 2, 2); layer-norm conv features imply the stable-layer-norm encoder and input
    normalisation (wav2vec2-large-xlsr-53), group-norm ones the base layout.
    """
    keys = source.keys()
    p = "wav2vec2."
    hidden = source.shape(p + "encoder.layer_norm.weight")[0]
    n_conv = _count(keys, r"^wav2vec2\.feature_extractor\.conv_layers\.(\d+)\.")
    conv = [source.shape(f"{p}feature_extractor.conv_layers.{i}.conv.weight") for i in range(n_conv)]
    layer_norm = f"{p}feature_extractor.conv_layers.1.layer_norm.weight" in source
    pos = next(k for k in keys if k.startswith(p + "encoder.pos_conv_embed.conv.")
               and k.endswith(("original1", "weight_v")))
    pos_shape = source.shape(pos)
    config = {
        "model_type": "wav2vec2", "architectures": ["Wav2Vec2ForCTC"],
        "hidden_size": hidden, "num_attention_heads": max(1, hidden // 64),
        "num_hidden_layers": _count(keys, r"^wav2vec2\.encoder\.layers\.(\d+)\."),
        "intermediate_size": source.shape(p + "encoder.layers.0.feed_forward.intermediate_dense.weight")[0],
        "conv_dim": [c[0] for c in conv], "conv_kernel": [c[2] for c in conv],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2][:n_conv] + [2] * max(0, n_conv - 7),
        "conv_bias": f"{p}feature_extractor.conv_layers.1.conv.bias" in source,
        "feat_extract_norm": "layer" if layer_norm else "group",
        "do_stable_layer_norm": layer_norm,
        "num_conv_pos_embeddings": pos_shape[2], "num_conv_pos_embedding_groups": hidden // pos_shape[1],
        "vocab_size": source.shape("lm_head.weight")[0] if "lm_head.weight" in source else 32,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "feat_proj_dropout": 0.0, "final_dropout": 0.0, "layerdrop": 0.0, "mask_time_prob": 0.0,
    }
    config.update(overrides)
    pre = {"do_normalize": layer_norm, "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
           "return_attention_mask": layer_norm, "sampling_rate": 16000}
    return config, pre


def open_single_file(path: str | Path, expect: str) -> tuple[TensorSource, str]:
    """Open a single file and check it holds `expect` ("dit", "t5", "vae", "wav2vec2", "lora").

    Returns (source with official names (DiT, T5, VAE) or HF names (wav2vec2), detected layout).
    """
    source = as_source(path)
    layout = detect_layout(source)
    kinds = {
        "dit": ("official_dit", "comfy_dit", "comfy_dit_fp8_scaled"),
        "t5": ("official_t5", "comfy_t5", "comfy_t5_fp8_scaled"),
        "vae": ("wan_vae",),
        "wav2vec2": ("hf_wav2vec2", "comfy_wav2vec2"),
        "lora": ("lora",),
    }
    if layout not in kinds[expect]:
        hint = {
            "wan_dit_not_s2v": "a Wan DiT without the S2V audio modules (T2V/I2V?); Live Avatar needs Wan2.2-S2V-14B",
            "wan22_vae": "the Wan2.2 VAE (48 channels); Live Avatar uses the Wan2.1 VAE",
            "diffusers_wan_vae": "a diffusers-format Wan VAE; use the official/ComfyUI Wan2.1 VAE file",
        }.get(layout, f"layout {layout!r}")
        raise CheckpointError(f"{source.describe()}: expected {expect} weights, found {hint}")
    if expect == "dit":
        return official_dit_source(source), layout
    if expect == "t5":
        return official_t5_source(source), layout
    if expect == "wav2vec2":
        return hf_wav2vec2_source(source), layout
    return source, layout


__all__ = [
    "detect_layout", "comfy_dit_to_official", "comfy_t5_to_official", "comfy_wav2vec2_to_hf",
    "renamed_source", "official_dit_source", "official_t5_source", "hf_wav2vec2_source",
    "infer_dit_config", "infer_t5_config", "infer_vae_config", "wav2vec2_config_from_keys",
    "open_single_file",
]
