"""Check DiT weights (and the LoRA) against the model before anything heavy is loaded.

Headers only: the DiT is built on the meta device from its config and every weight file is
compared with it key by key and shape by shape, and the LoRA is planned against it. So a wrong
file is reported, naming it and saying what it holds, before the encoders or any weight are read
(the pipeline would otherwise load umT5, wav2vec2 and the VAE first).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DiTConfig
from .comfy_layout import detect_layout
from .lora import plan_lora
from .safetensors_io import CheckpointError, TensorSource, check_fits, format_keys, open_tensor_source

__all__ = ["check_dit_weights", "what_it_holds"]

_DIT_LAYOUTS = ("official_dit", "comfy_dit", "comfy_dit_fp8_scaled")
_HOLDS = {
    "official_t5": "umT5 text-encoder weights", "comfy_t5": "umT5 text-encoder weights",
    "comfy_t5_fp8_scaled": "umT5 text-encoder weights (fp8)",
    "wan_vae": "Wan2.1 VAE weights", "wan22_vae": "Wan2.2 VAE weights (48 channels)",
    "diffusers_wan_vae": "diffusers Wan VAE weights",
    "hf_wav2vec2": "wav2vec2 audio-encoder weights", "comfy_wav2vec2": "wav2vec2 audio-encoder weights",
    "lora": "LoRA matrices",
    "wan_dit_not_s2v": "a Wan DiT without the S2V audio modules (T2V/I2V?); Live Avatar needs Wan2.2-S2V-14B",
}


def what_it_holds(source: TensorSource) -> str:
    """A few words on what a weight file holds, from its keys (e.g. "wav2vec2 audio-encoder weights")."""
    layout = detect_layout(source)
    if layout in _HOLDS:
        return _HOLDS[layout]
    if layout in _DIT_LAYOUTS:
        return "DiT weights"
    return f"{len(source)} tensors of an unknown model (first keys {format_keys(sorted(source.keys()), 3)})"


def _files(source: TensorSource) -> list[Path]:
    return sorted({p for k in source.keys() if (p := source.path_of(k)) is not None})


def check_dit_weights(source: TensorSource, config: DiTConfig, config_path: str | Path | None = None,
                      lora_path: str | Path | None = None) -> None:
    """Raise one `CheckpointError` naming the file when `source` (official DiT names) cannot be loaded
    into `CausalS2VDiT(config)`, or the LoRA at `lora_path` does not fit it.

    Order: a weight file holding no DiT tensor at all (named with what it holds); a Wan DiT of
    another kind; keys / shapes that do not fit the config (`config_path` is named too); the LoRA.
    """
    from ..models.dit import CausalS2VDiT

    with torch.device("meta"):
        model = CausalS2VDiT(config)
    expected = set(model.state_dict())
    base = getattr(source, "base", None)  # a renamed view: describe the file by its own keys
    for file in _files(source):
        keys = [k for k in source.keys() if source.path_of(k) == file]
        if not any(k in expected for k in keys):
            raw = TensorSource([file]) if file.suffix == ".safetensors" else (base or source)
            raise CheckpointError(f"{file}: holds no DiT tensors, it holds {what_it_holds(raw)}; expected the "
                                  "Wan2.2-S2V-14B DiT weights (diffusion_pytorch_model*.safetensors)")
    layout = detect_layout(base if base is not None else source)
    if layout == "wan_dit_not_s2v":
        raise CheckpointError(f"{source.describe()}: holds {_HOLDS[layout]}")
    try:
        check_fits(model, source)
    except CheckpointError as exc:
        if config_path is None:
            raise
        raise CheckpointError(f"{exc} (model built from {config_path}: is it the config of these weights?)") from exc
    if lora_path is not None and str(lora_path).strip().lower() not in ("none", ""):
        lora = open_tensor_source(lora_path)
        try:
            plan_lora(model, lora)
        finally:
            lora.close()
