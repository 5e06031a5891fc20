"""The official Wan2.2-S2V-14B folder (+ Live Avatar LoRA), and ComfyUI single files.

`find_official_checkpoint(dir)` checks every file at once and reports all that are missing with
their expected names; nothing heavy is read (headers and JSON only). `load_dit` builds the DiT on
the meta device, streams the base weights tensor by tensor onto the target device, merges the
LoRA layer by layer there (base -> LoRA; fp8 conversion, if any, comes after, elsewhere) and
returns the model in eval mode. `load_components` / `load_components_from_files` load all four
parts (DiT, umT5, VAE, wav2vec2) for the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import OFFICIAL_FILES, ConfigError, DiTConfig, T5Config, VAEConfig, dataclass_from_json
from ..models.block_packing import pack_on_device, pack_to_host
from ..models.layer_stream import LayerResidency
from ..models.pinned import HostArena
from .comfy_layout import infer_dit_config, infer_t5_config, infer_vae_config, open_single_file
from .lora import plan_lora
from .preflight import check_dit_weights
from .safetensors_io import (
    CheckpointError, DictSource, TensorSource, load_into_module, load_pth_state_dict, open_tensor_source,
)

log = logging.getLogger(__name__)

_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
_WAV2VEC_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# tensors that belong to one layer: a layer slice skips those of the layers it does not hold
_LAYER_KEY = re.compile(r"^(blocks\.\d+\.|audio_injector\.(injector|injector_adain_layers)\.\d+\.)")


@dataclass
class OfficialCheckpoint:
    """Paths of a Wan2.2-S2V-14B folder, its DiT config and a lazy view of the DiT weights.

    `config` is config.json completed from the weights (`text_dim`, `audio_num_layers` are not
    stored in config.json). `lora_path` is None when no LoRA was asked for or found.
    """

    root: Path
    config: DiTConfig
    dit: TensorSource
    t5_path: Path
    tokenizer_dir: Path
    vae_path: Path
    wav2vec_dir: Path
    lora_path: Path | None = None
    t5_config_path: Path | None = None
    vae_config_path: Path | None = None

    def wav2vec_config(self) -> dict[str, Any]:
        """The wav2vec2 folder's config.json (HF `Wav2Vec2Config` fields)."""
        return json.loads((self.wav2vec_dir / "config.json").read_text())


def _absolute(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else Path.cwd() / p).resolve()


def _default_lora(root: Path) -> Path | None:
    candidates = [root / OFFICIAL_FILES.lora, root.parent / "LiveAvatar" / OFFICIAL_FILES.lora]
    # The reference's hf_hub_download(cache_dir="ckpt/LiveAvatar") leaves the file in HF cache layout.
    candidates += sorted((root.parent / "LiveAvatar").glob(f"models--*/snapshots/*/{OFFICIAL_FILES.lora}"))
    return next((c for c in candidates if c.is_file()), None)


def resolve_lora(root: Path, lora: str | Path | None, missing: list[str]) -> Path | None:
    """The LoRA file to merge: explicit path (file or folder), "none", or the default locations."""
    if lora is None:
        return _default_lora(root)
    if str(lora).strip().lower() in ("none", ""):
        return None
    path = _absolute(lora)
    if path.is_dir():
        path = path / OFFICIAL_FILES.lora
    if path.is_file():
        return path
    if _HF_REPO_ID.match(str(lora)) and not Path(str(lora)).expanduser().exists():
        missing.append(
            f"LoRA {lora!r} looks like a Hugging Face repo id; nothing is downloaded at run time: "
            f"run `huggingface-cli download {lora} --local-dir ckpt/LiveAvatar` and pass "
            f"ckpt/LiveAvatar/{OFFICIAL_FILES.lora}"
        )
    else:
        missing.append(f"LoRA file {path} (expected {OFFICIAL_FILES.lora})")
    return None


def complete_config(config: DiTConfig, dit: TensorSource) -> DiTConfig:
    """Fill the fields config.json does not store from the weight shapes."""
    updates: dict[str, Any] = {}
    if "text_embedding.0.weight" in dit:
        updates["text_dim"] = dit.shape("text_embedding.0.weight")[1]
    if "casual_audio_encoder.weights" in dit:
        updates["audio_num_layers"] = dit.shape("casual_audio_encoder.weights")[1]
    return dataclasses.replace(config, **updates)


def find_official_checkpoint(ckpt_dir: str | Path, lora: str | Path | None = None) -> OfficialCheckpoint:
    """Locate every file of the official layout under `ckpt_dir` (relative or absolute).

    All missing files are reported in one `CheckpointError`, each with its expected name. LoRA:
    `lora` (a file, a folder holding liveavatar.safetensors, or "none"); by default
    `<ckpt_dir>/liveavatar.safetensors` or `<ckpt_dir>/../LiveAvatar/liveavatar.safetensors` if
    present (else no LoRA).
    """
    root = _absolute(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint folder not found (pass the Wan2.2-S2V-14B folder, "
                              f"e.g. ckpt/Wan2.2-S2V-14B; relative paths are taken from {Path.cwd()})")
    f = OFFICIAL_FILES
    missing: list[str] = []
    if not (root / f.config).is_file():
        missing.append(f"{f.config} (DiT config)")
    index, single = root / f.dit_index, root / f.dit_single
    dit_path: Path | None = index if index.is_file() else single if single.is_file() else None
    if dit_path is None:
        missing.append(f"{f.dit_index} + its shards, or {f.dit_single} (DiT weights)")
    elif dit_path == index:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a sharded-checkpoint index ({exc})") from exc
        missing += [f"{s} (DiT shard listed in {f.dit_index})" for s in shards if not (root / s).is_file()]
    for name, what in ((f.t5, "umT5 encoder"), (f.vae, "Wan2.1 VAE")):
        if not (root / name).is_file():
            missing.append(f"{name} ({what})")
    tok = root / f.tokenizer_dir
    if not tok.is_dir() or not any((tok / n).is_file() for n in _TOKENIZER_FILES):
        missing.append(f"{f.tokenizer_dir}/ (umT5 tokenizer folder with one of {list(_TOKENIZER_FILES)})")
    w2v = root / f.wav2vec_dir
    if not (w2v / "config.json").is_file() or not any((w2v / n).is_file() for n in _WAV2VEC_WEIGHTS):
        missing.append(f"{f.wav2vec_dir}/ (HF wav2vec2 folder: config.json + one of {list(_WAV2VEC_WEIGHTS)})")
    lora_path = resolve_lora(root, lora, missing)
    if missing:
        # one line: CLIs print the first line of an error
        raise CheckpointError(f"{root}: incomplete Wan2.2-S2V-14B folder, missing {len(missing)}: "
                              + "; ".join(missing))

    try:
        config = DiTConfig.from_json(root / f.config)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    assert dit_path is not None
    dit = open_tensor_source(dit_path)
    config = complete_config(config, dit)
    check_dit_weights(dit, config, root / f.config, lora_path)
    return OfficialCheckpoint(
        root=root, config=config, dit=dit, t5_path=root / f.t5, tokenizer_dir=tok,
        vae_path=root / f.vae, wav2vec_dir=w2v, lora_path=lora_path,
        t5_config_path=(root / f.t5_config) if (root / f.t5_config).is_file() else None,
        vae_config_path=(root / f.vae_config) if (root / f.vae_config).is_file() else None,
    )


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------

def build_dit_from_source(source: TensorSource, config: DiTConfig, device: torch.device | str,
                          dtype: torch.dtype, lora_path: str | Path | None = None,
                          lora_strength: float = 1.0, fp8: bool | str = False,
                          fp8_allow_cpu: bool = False, layers: range | None = None,
                          residency: LayerResidency | None = None) -> torch.nn.Module:
    """Meta-build `CausalS2VDiT(config)`, stream `source` into it, eval().

    `layers`: build and read only this layer slice (its layers and audio injectors; the tensors
    of the other layers are never read), for a rank of a layer-sharded worker group.

    Layer by layer as the weights arrive: the LoRA is merged into each Linear, and with `fp8`
    (a scaling, "tensor" / "row", or True: `options.resolve_fp8_scaling`) each eligible Linear is converted to an
    `FP8Linear` right away, so loading peaks near the fp8 size (15.9 GiB for the 14B) instead of
    the bf16 size (30.4 GiB). Same values as loading, merging and converting one after the other.
    `fp8_allow_cpu`: tests only (fp8 emulation on the CPU).

    residency (`loading.placement.place_dit`): the blocks from `residency.weights` on are packed
    into (pinned) host memory as soon as each is complete (read, LoRA merged, fp8 converted), and
    the model streams them (`CausalS2VDiT.stream_layers`): the device never holds more than the
    resident weights plus one block in flight.
    """
    from ..models.dit import CausalS2VDiT
    from ..models.fp8 import FP8Linear, fp8_emulation_needed, fp8_linears
    from ..options import resolve_fp8_scaling

    with torch.device("meta"):
        model = CausalS2VDiT(config, layers=layers)
    held = set(model.state_dict())
    key_map = None if layers is None else (lambda k: k if k in held or not _LAYER_KEY.match(k) else None)
    if lora_path is not None and str(lora_path).strip().lower() in ("none", ""):
        lora_path = None
    scaling = resolve_fp8_scaling(fp8)
    emulate = fp8_emulation_needed(torch.device(device), scaling, fp8_allow_cpu) if scaling else False
    modules = dict(model.named_modules())
    lora_source = open_tensor_source(lora_path) if lora_path is not None else None
    plan = plan_lora(model, lora_source, strength=lora_strength) if lora_source is not None else None
    to_fp8 = set(fp8_linears(model)) if scaling else set()
    watched = to_fp8 | (set(plan.layers) if plan is not None else set())
    if residency is not None and layers is not None:
        raise ValueError("layer streaming is whole-model only: residency and layers exclude each other")
    packer = _BlockPacker(model, residency)

    def finish_layer(tensor_name: str) -> None:
        name = tensor_name.rpartition(".")[0]
        if name not in watched:
            return
        linear = modules[name]
        if any(p.is_meta for p in linear.parameters(recurse=False)):
            return  # its bias (or weight) is still to come
        watched.discard(name)
        if plan is not None and name in plan:
            plan.apply(name, linear)
        if name in to_fp8:
            parent, _, child = name.rpartition(".")
            modules[name] = FP8Linear.from_linear(linear, emulate=emulate, scaling=scaling)
            setattr(modules[parent] if parent else model, child, modules[name])
            del linear  # no reference to the bf16 layer is left: its weight is freed now

    def on_assigned(tensor_name: str) -> None:
        finish_layer(tensor_name)
        packer.tensor_done(tensor_name)

    keep = getattr(model, "keep_fp32", None)
    try:
        load_into_module(model, source, device=device, dtype=dtype, strict=True, key_map=key_map,
                         keep_fp32=keep if callable(keep) else None, on_assigned=on_assigned)
    finally:
        if lora_source is not None:
            lora_source.close()
    if plan is not None:
        report = plan.finish()
        log.info("LoRA %s: merged into %d/%d target layers (scale %.4g, rank %d)", lora_path,
                 report.matched, report.targets, report.scale, report.rank)
    if scaling:
        log.info("fp8 (%s scales): linears converted while loading", scaling)
    if hasattr(model, "clear_caches"):
        model.clear_caches()
    packer.finish()
    return model.eval()


class _BlockPacker:
    """Packs each DiT block the moment its last tensor is in place: a streamed one into host
    memory (`block_packing.pack_to_host`), a resident one into one device buffer
    (`block_packing.pack_on_device`: the allocator rounds it once); then hands the model its
    `LayerResidency` (`finish`)."""

    def __init__(self, model: torch.nn.Module, residency: LayerResidency | None):
        self.model, self.residency = model, residency
        n = len(model.blocks) if residency is not None else 0
        self.streamed = set(range(residency.weights, n)) if residency is not None else set()
        self.arena = HostArena(pin=False)  # pinned once the device is known (first block)
        self.packed: set[int] = set()

    def tensor_done(self, name: str) -> None:
        head, _, rest = name.partition(".")
        index = rest.partition(".")[0]
        if head != "blocks" or not index.isdigit():
            return
        i = int(index)
        block = self.model.blocks[i]
        if i in self.packed or any(t.is_meta for t in (*block.parameters(), *block.buffers())):
            return
        self.packed.add(i)
        if i not in self.streamed:
            pack_on_device(block)
            return
        self.arena.pin = next(block.parameters()).device.type == "cuda"
        pack_to_host(block, self.arena, len(self.streamed - self.packed) + 1)

    def finish(self) -> None:
        if self.residency is not None:
            self.model.stream_layers(self.residency)


def load_dit(ckpt: OfficialCheckpoint, device: torch.device | str, dtype: torch.dtype,
             lora_path: str | Path | None = None, lora_strength: float = 1.0,
             fp8: bool | str = False, layers: range | None = None,
             residency: LayerResidency | None = None) -> torch.nn.Module:
    """The causal S2V DiT with base weights and the LoRA (`lora_path` or `ckpt.lora_path`) merged
    (and fp8 linears when `fp8`, converted while loading). `lora_path="none"`: base weights only.
    residency: the streamed blocks go to host memory as they load (`build_dit_from_source`).
    """
    return build_dit_from_source(ckpt.dit, ckpt.config, device, dtype,
                                 lora_path if lora_path is not None else ckpt.lora_path, lora_strength, fp8=fp8,
                                 layers=layers, residency=residency)


def t5_config_for(ckpt: OfficialCheckpoint, sd: dict[str, torch.Tensor]) -> T5Config:
    if ckpt.t5_config_path is not None:
        return dataclass_from_json(T5Config, ckpt.t5_config_path)
    return infer_t5_config(DictSource(sd, origin=ckpt.t5_path), text_len=ckpt.config.text_len)


def load_text_encoder(ckpt: OfficialCheckpoint, device: torch.device | str, dtype: torch.dtype) -> Any:
    """umT5 encoder from `models_t5_umt5-xxl-enc-bf16.pth` (memory-mapped, weights-only)."""
    from ..models.text_encoder import TextEncoder

    sd = load_pth_state_dict(ckpt.t5_path)
    return TextEncoder.from_official_state_dict(sd, t5_config_for(ckpt, sd), ckpt.tokenizer_dir,
                                                device=device, dtype=dtype)


def load_vae(ckpt: OfficialCheckpoint, device: torch.device | str, dtype: torch.dtype) -> Any:
    """Wan2.1 VAE from `Wan2.1_VAE.pth` (memory-mapped, weights-only)."""
    from ..models.vae import WanVAE

    sd = load_pth_state_dict(ckpt.vae_path)
    if ckpt.vae_config_path is not None:
        cfg = dataclass_from_json(VAEConfig, ckpt.vae_config_path)
    else:
        cfg = infer_vae_config(DictSource(sd, origin=ckpt.vae_path))
    return WanVAE.from_official_state_dict(sd, cfg, device=device, dtype=dtype)


def load_audio_encoder(ckpt: OfficialCheckpoint, device: torch.device | str, dtype: torch.dtype) -> Any:
    from ..models.wav2vec import AudioFeatureExtractor

    return AudioFeatureExtractor.from_pretrained(ckpt.wav2vec_dir, device=device, dtype=dtype)


def check_consistency(dit: DiTConfig, t5_dim: int | None, w2v_hidden: int | None,
                      w2v_states: int | None, where: str) -> None:
    """The DiT's text/audio input sizes must match the encoders (checked before heavy loads)."""
    problems = []
    if t5_dim is not None and t5_dim != dit.text_dim:
        problems.append(f"umT5 dim {t5_dim} != DiT text_dim {dit.text_dim}")
    if w2v_hidden is not None and w2v_hidden != dit.audio_dim:
        problems.append(f"wav2vec2 hidden_size {w2v_hidden} != DiT audio_dim {dit.audio_dim}")
    if w2v_states is not None and w2v_states != dit.audio_num_layers:
        problems.append(f"wav2vec2 num_hidden_layers + 1 = {w2v_states} != DiT audio layers {dit.audio_num_layers}")
    if problems:
        raise CheckpointError(f"{where}: components do not fit together: " + "; ".join(problems))


def load_components(ckpt: OfficialCheckpoint, device: torch.device | str, dtype: torch.dtype,
                    lora_strength: float = 1.0, lora_path: str | Path | None = None,
                    fp8: bool | str = False, layers: range | None = None,
                    residency: LayerResidency | None = None) -> dict[str, Any]:
    """{"dit", "text_encoder", "vae", "audio_encoder"} from an official folder (`fp8`, `layers`, `residency`:
    see `build_dit_from_source`)."""
    t5_sd = load_pth_state_dict(ckpt.t5_path)  # memory-mapped: only the header is read here
    w2v = ckpt.wav2vec_config()
    check_consistency(ckpt.config, t5_config_for(ckpt, t5_sd).dim, w2v.get("hidden_size"),
                      int(w2v.get("num_hidden_layers", 0)) + 1, str(ckpt.root))
    del t5_sd
    # umT5-XXL (about 11 GB in bf16) is parked on the CPU and visits the GPU only to encode a
    # prompt (LiveAvatar.encode_prompt), so it never competes with the DiT's KV caches.
    return {
        "audio_encoder": load_audio_encoder(ckpt, device, dtype),
        "text_encoder": load_text_encoder(ckpt, "cpu", dtype),
        "vae": load_vae(ckpt, device, dtype),
        "dit": load_dit(ckpt, device, dtype, lora_path=lora_path, lora_strength=lora_strength, fp8=fp8,
                        layers=layers, residency=residency),
    }


def load_components_from_files(*, dit: str | Path, t5: str | Path, vae: str | Path, wav2vec: str | Path,
                               tokenizer_dir: str | Path | None = None, lora: str | Path | None = None,
                               lora_strength: float = 1.0, config: str | Path | None = None,
                               device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                               dit_overrides: dict[str, Any] | None = None,
                               fp8: bool | str = False, layers: range | None = None,
                               placement: Callable[[DiTConfig, dict], LayerResidency | None] | None = None,
                               ) -> dict[str, Any]:
    """The four components from single files (ComfyUI model folders) or official files.

    Layouts are detected from the keys (see `comfy_layout`). `config`: a DiT config.json; without
    it the DiT config is inferred from the shapes (`dit_overrides` for what shapes cannot tell).
    `wav2vec` may be an HF folder or a single safetensors file. `tokenizer_dir` is the umT5
    tokenizer folder (google/umt5-xxl); None uses the SentencePiece model embedded in the umT5
    file (`spiece_model`, as ComfyUI's umT5 files carry it). `placement(config, wav2vec2 config)`:
    the DiT's residency (`loading.placement.place_dit`, counting the audio encoder), decided once
    the configs are known, before any weight is read (its MemoryError stops the load there).
    """
    from ..models.text_encoder import TextEncoder
    from ..models.vae import WanVAE
    from ..models.wav2vec import AudioFeatureExtractor

    dit_src, layout = open_single_file(_absolute(dit), "dit")
    if config is not None:
        cfg = complete_config(DiTConfig.from_json(_absolute(config)), dit_src)
    else:
        cfg = infer_dit_config(dit_src, **(dit_overrides or {}))
    lora_path = resolve_lora(_absolute(dit).parent, lora if lora is not None else "none", missing := [])
    if missing:
        raise CheckpointError("; ".join(missing))
    check_dit_weights(dit_src, cfg, _absolute(config) if config is not None else None, lora_path)
    w2v_path = _absolute(wav2vec)
    if w2v_path.is_dir():
        w2v_cfg, w2v_pre, w2v_src = json.loads((w2v_path / "config.json").read_text()), None, None
    else:
        from .comfy_layout import wav2vec2_config_from_keys

        w2v_src, _ = open_single_file(w2v_path, "wav2vec2")
        w2v_cfg, w2v_pre = wav2vec2_config_from_keys(w2v_src)
    residency = placement(cfg, w2v_cfg) if placement is not None else None
    t5_src, _ = open_single_file(_absolute(t5), "t5")
    t5_cfg = infer_t5_config(t5_src, text_len=cfg.text_len)
    check_consistency(cfg, t5_cfg.dim, w2v_cfg.get("hidden_size"), int(w2v_cfg.get("num_hidden_layers", 0)) + 1,
                      str(_absolute(dit)))
    embedded = None
    if tokenizer_dir is None:
        from ..models.text_encoder import tokenizer_from_spiece_tensor
        from .comfy_layout import embedded_tokenizer_blob

        blob = embedded_tokenizer_blob(t5_src)
        if blob is None:
            raise CheckpointError(f"{_absolute(t5)}: this umT5 file has no embedded tokenizer (spiece_model); "
                                  "pass tokenizer_dir (the google/umt5-xxl tokenizer folder)")
        embedded = tokenizer_from_spiece_tensor(blob)

    if w2v_src is None:
        audio = AudioFeatureExtractor.from_pretrained(w2v_path, device=device, dtype=dtype)
    else:
        w2v_sd = {k: w2v_src.get(k) for k in w2v_src.keys()}
        audio = AudioFeatureExtractor.from_state_dict(w2v_sd, w2v_cfg, w2v_pre, device=device, dtype=dtype)
    t5_sd = {k: t5_src.get(k, device="cpu", dtype=dtype) for k in t5_src.keys()}  # parked on the CPU
    text = TextEncoder.from_official_state_dict(
        t5_sd, t5_cfg, None if embedded is not None else _absolute(tokenizer_dir), device="cpu", dtype=dtype,
        tokenizer=embedded)
    del t5_sd
    vae_src, _ = open_single_file(_absolute(vae), "vae")
    vae_sd = {k: vae_src.get(k) for k in vae_src.keys()}
    vae_model = WanVAE.from_official_state_dict(vae_sd, infer_vae_config(vae_src), device=device, dtype=dtype)
    log.info("DiT %s: layout %s", dit, layout)
    model = build_dit_from_source(dit_src, cfg, device, dtype, lora_path, lora_strength, fp8=fp8, layers=layers,
                                  residency=residency)
    return {"dit": model, "text_encoder": text, "vae": vae_model, "audio_encoder": audio}


__all__ = [
    "OfficialCheckpoint", "find_official_checkpoint", "resolve_lora", "complete_config", "load_dit",
    "build_dit_from_source", "load_text_encoder", "load_vae", "load_audio_encoder", "load_components",
    "load_components_from_files", "check_consistency",
]
