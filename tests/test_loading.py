"""Checkpoint loading: lazy sources, strict meta-device loading, official folder, ComfyUI layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from liveavatar.config import OFFICIAL_FILES, DiTConfig
from liveavatar.loading.comfy_layout import (
    comfy_dit_to_official, comfy_t5_to_official, comfy_wav2vec2_to_hf, detect_layout, infer_dit_config,
    infer_t5_config, infer_vae_config, open_single_file, wav2vec2_config_from_keys,
)
from liveavatar.loading.official import find_official_checkpoint, load_components
from liveavatar.loading.safetensors_io import (
    CheckpointError, DictSource, TensorSource, load_into_module, load_pth_state_dict, open_tensor_source,
)
from liveavatar.loading.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "Wan2.2-S2V-14B", seed=0)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)
        self.emb = nn.Embedding(5, 4)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))


def toy_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"proj.weight": torch.randn(4, 8, generator=g), "proj.bias": torch.randn(4, generator=g),
            "norm.weight": torch.randn(4, generator=g), "norm.bias": torch.randn(4, generator=g),
            "emb.weight": torch.randn(5, 4, generator=g), "steps": torch.arange(3)}


def meta_toy() -> Toy:
    with torch.device("meta"):
        return Toy()


# ---- TensorSource ------------------------------------------------------------------------------

def test_single_file_source_is_lazy_and_typed(tmp_path):
    sd = toy_state()
    sd["half"] = torch.ones(2, 3, dtype=torch.bfloat16)
    save_file(sd, str(tmp_path / "m.safetensors"))
    src = open_tensor_source(tmp_path / "m.safetensors")
    assert set(src.keys()) == set(sd) and src.reads == 0
    assert src.shape("proj.weight") == (4, 8) and src.dtype("half") == torch.bfloat16
    assert src.path_of("proj.bias") == tmp_path / "m.safetensors"
    out = src.get("half", dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, torch.ones(2, 3))
    assert src.reads == 1 and src.bytes_read == 12  # as stored: 6 bf16 values
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        src.get("nope")


def test_get_returns_memory_of_its_own(tmp_path):
    save_file(toy_state(), str(tmp_path / "m.safetensors"))
    src = open_tensor_source(tmp_path / "m.safetensors")
    first = src.get("proj.weight")
    first.add_(100.0)  # e.g. a LoRA merge into one model
    assert torch.equal(src.get("proj.weight"), toy_state()["proj.weight"])
    dsrc = DictSource(toy_state())
    dsrc.get("norm.bias").zero_()
    assert torch.equal(dsrc.get("norm.bias"), toy_state()["norm.bias"])


def test_sharded_index_and_folder(tmp_path):
    sd = toy_state()
    save_file({k: sd[k] for k in ("proj.weight", "proj.bias")}, str(tmp_path / "s-1.safetensors"))
    save_file({k: sd[k] for k in ("norm.weight", "norm.bias", "emb.weight", "steps")}, str(tmp_path / "s-2.safetensors"))
    index = {"weight_map": {k: ("s-1.safetensors" if k.startswith("proj") else "s-2.safetensors") for k in sd}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    for path in (tmp_path / "m.safetensors.index.json", tmp_path):
        src = open_tensor_source(path)
        assert set(src.keys()) == set(sd)
        assert src.path_of("norm.bias").name == "s-2.safetensors"
        assert torch.equal(src.get("emb.weight"), sd["emb.weight"])
    # the index must agree with the shards
    index["weight_map"]["proj.bias"] = "s-2.safetensors"
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="proj.bias"):
        open_tensor_source(tmp_path / "m.safetensors.index.json")
    index["weight_map"]["proj.bias"] = "s-9.safetensors"
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="s-9.safetensors"):
        open_tensor_source(tmp_path)


# ---- load_into_module --------------------------------------------------------------------------

def test_load_into_meta_module_reads_each_tensor_once(tmp_path):
    sd = toy_state()
    save_file(sd, str(tmp_path / "m.safetensors"))
    src = open_tensor_source(tmp_path / "m.safetensors")
    model = meta_toy()
    load_into_module(model, src, device="cpu", dtype=torch.bfloat16, keep_fp32=lambda n: n.startswith("norm."))
    assert src.reads == len(sd)  # tensor by tensor, never twice
    assert src.bytes_read == sum(t.numel() * t.element_size() for t in sd.values())
    assert model.proj.weight.dtype == torch.bfloat16 and model.norm.weight.dtype == torch.float32
    assert model.steps.dtype == torch.int64 and torch.equal(model.steps, torch.arange(3))
    assert torch.equal(model.proj.weight, sd["proj.weight"].bfloat16())
    assert torch.equal(model.norm.bias, sd["norm.bias"])
    assert not any(t.is_meta for t in model.state_dict().values())
    assert not model.proj.weight.requires_grad
    y = model.proj(torch.ones(2, 8, dtype=torch.bfloat16))
    assert y.shape == (2, 4)


def test_key_map_renames_and_drops():
    sd = {"model." + k: v for k, v in toy_state().items()}
    sd["model.extra_scale"] = torch.ones(1)
    model = meta_toy()
    load_into_module(model, sd, device="cpu", dtype=torch.float32,
                     key_map=lambda k: None if k.endswith("extra_scale") else k[len("model."):])
    assert torch.equal(model.emb.weight, sd["model.emb.weight"])


def test_missing_unexpected_and_shape_errors_name_file_and_keys(tmp_path):
    sd = toy_state()
    bad = dict(sd)
    del bad["norm.bias"], bad["emb.weight"]
    bad["proj.weight"] = torch.zeros(4, 9)
    bad["stray.weight"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    src = open_tensor_source(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_into_module(meta_toy(), src, device="cpu", dtype=torch.float32)
    msg = str(info.value)
    assert "bad.safetensors" in msg
    assert "missing keys: ['emb.weight', 'norm.bias']" in msg
    assert "unexpected keys: ['stray.weight']" in msg
    assert "proj.weight: file [4, 9] vs model [4, 8]" in msg
    assert src.reads == 0  # checked before any tensor was read


def test_error_lists_at_most_five_keys(tmp_path):
    save_file({f"w{i}": torch.zeros(1) for i in range(9)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=r"\(\+4 more\)"):
        load_into_module(meta_toy(), open_tensor_source(tmp_path / "x.safetensors"), device="cpu")


def test_non_strict_tolerates_missing_but_not_shapes():
    sd = toy_state()
    del sd["steps"]
    sd["other"] = torch.zeros(2)
    model = meta_toy()
    load_into_module(model, sd, device="cpu", dtype=torch.float32, strict=False)
    assert torch.equal(model.steps, torch.zeros(3, dtype=torch.int64))
    sd["proj.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_into_module(meta_toy(), sd, device="cpu", strict=False)


# ---- .pth: weights-only ------------------------------------------------------------------------

class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # would create a file if the pickle were ever executed
        return (Path.touch, (Path(self.marker),))


def test_pth_weights_only(tmp_path):
    torch.save(toy_state(), tmp_path / "ok.pth")
    sd = load_pth_state_dict(tmp_path / "ok.pth")
    assert torch.equal(sd["emb.weight"], toy_state()["emb.weight"])
    torch.save({"state_dict": toy_state()}, tmp_path / "wrapped.pth")
    assert set(load_pth_state_dict(tmp_path / "wrapped.pth")) == set(toy_state())
    src = open_tensor_source(tmp_path / "ok.pth")
    assert isinstance(src, DictSource) and src.shape("proj.weight") == (4, 8)


def test_pth_with_code_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "obj": Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: not a weights-only checkpoint"):
        load_pth_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_pth_with_non_tensor_entries_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match=r"mixed.pth: entries that are not named tensors: \['epoch'\]"):
        load_pth_state_dict(tmp_path / "mixed.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_pth_state_dict(tmp_path / "list.pth")


# ---- official folder ---------------------------------------------------------------------------

def test_find_official_checkpoint_relative_and_absolute(tiny, monkeypatch):
    ckpt = find_official_checkpoint(tiny)
    assert ckpt.root == tiny and ckpt.lora_path == tiny / OFFICIAL_FILES.lora
    assert ckpt.config.dim == 64 and ckpt.config.text_dim == 32 and ckpt.config.audio_num_layers == 3
    assert isinstance(ckpt.dit, TensorSource) and len(ckpt.dit.keys()) > 100
    monkeypatch.chdir(tiny.parent)
    rel = find_official_checkpoint(tiny.name)
    assert rel.root == tiny and rel.t5_path == tiny / OFFICIAL_FILES.t5
    assert find_official_checkpoint(tiny.name, lora="none").lora_path is None


def test_every_missing_file_reported_at_once(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / OFFICIAL_FILES.vae).unlink()
    shutil.rmtree(broken / OFFICIAL_FILES.tokenizer_dir)
    (broken / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        find_official_checkpoint(broken, lora=broken / "nope.safetensors")
    msg = str(info.value)
    assert "missing 4:" in msg and "\n" not in msg
    for name in (OFFICIAL_FILES.vae, OFFICIAL_FILES.tokenizer_dir, "nope.safetensors",
                 "diffusion_pytorch_model-00002-of-00002.safetensors"):
        assert name in msg, name
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        find_official_checkpoint(tmp_path / "absent")


def test_lora_default_locations_and_repo_id(tiny, tmp_path):
    base = tmp_path / "ckpt" / "Wan2.2-S2V-14B"
    shutil.copytree(tiny, base)
    (base / OFFICIAL_FILES.lora).unlink()
    assert find_official_checkpoint(base).lora_path is None
    (tmp_path / "ckpt" / "LiveAvatar").mkdir()
    shutil.copy(tiny / OFFICIAL_FILES.lora, tmp_path / "ckpt" / "LiveAvatar" / OFFICIAL_FILES.lora)
    assert find_official_checkpoint(base).lora_path == tmp_path / "ckpt" / "LiveAvatar" / OFFICIAL_FILES.lora
    assert find_official_checkpoint(base, lora=tmp_path / "ckpt" / "LiveAvatar").lora_path is not None
    with pytest.raises(CheckpointError, match="huggingface-cli download Quark-Vision/Live-Avatar"):
        find_official_checkpoint(base, lora="Quark-Vision/Live-Avatar")


def test_official_round_trip_loads_every_component_strictly(tiny):
    ckpt = find_official_checkpoint(tiny, lora="none")
    parts = load_components(ckpt, device="cpu", dtype=torch.float32)
    dit = parts["dit"]
    assert ckpt.dit.reads == len(ckpt.dit.keys())  # one read per tensor, no state-dict-wide load
    assert not dit.training
    for key, value in dit.state_dict().items():
        assert torch.equal(value, ckpt.dit.get(key)), key
    assert parts["text_encoder"].encode("a person is talking").shape[-1] == 32
    assert parts["vae"].encode(torch.zeros(1, 3, 1, 64, 64)).shape == (1, 16, 1, 8, 8)
    assert parts["audio_encoder"].num_states == ckpt.config.audio_num_layers


def test_reference_tiny_dit_loads_into_our_model(fixtures_dir):
    from liveavatar.models.dit import CausalS2VDiT

    folder = fixtures_dir / "tiny_s2v"
    cfg = DiTConfig.from_json(folder / "config.json")
    with torch.device("meta"):
        model = CausalS2VDiT(cfg)
    src = open_tensor_source(folder)
    load_into_module(model, src, device="cpu", dtype=torch.float32)
    assert src.reads == 180
    assert torch.equal(model.state_dict()["frame_packer.proj_4x.weight"], src.get("frame_packer.proj_4x.weight"))


def test_mismatched_components_are_refused_before_loading(tiny, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    cfg = json.loads((other / OFFICIAL_FILES.wav2vec_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (other / OFFICIAL_FILES.wav2vec_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        load_components(find_official_checkpoint(other), device="cpu", dtype=torch.float32)


# ---- ComfyUI single-file layouts -----------------------------------------------------------------

def _fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().max().float() / torch.finfo(torch.float8_e4m3fn).max
    return (w / scale).to(torch.float8_e4m3fn), scale.reshape(())


def test_comfy_dit_prefixed_file(tiny, tmp_path):
    official = open_tensor_source(tiny)
    sd = {"model.diffusion_model." + k: official.get(k) for k in official.keys()}
    save_file(sd, str(tmp_path / "wan2.2_s2v_14B_bf16.safetensors"))
    src, layout = open_single_file(tmp_path / "wan2.2_s2v_14B_bf16.safetensors", "dit")
    assert layout == "comfy_dit" and detect_layout(official) == "official_dit"
    assert set(src.keys()) == set(official.keys())
    assert torch.equal(src.get("blocks.1.ffn.2.weight"), official.get("blocks.1.ffn.2.weight"))
    cfg = infer_dit_config(src, num_heads=4, audio_inject_layers=(0, 1))
    assert cfg == find_official_checkpoint(tiny).config


@pytest.mark.parametrize("style", ["legacy_scale_weight", "weight_scale_comfy_quant"])
def test_comfy_dit_fp8_scaled_is_dequantized(tiny, tmp_path, style):
    official = open_tensor_source(tiny)
    sd: dict[str, torch.Tensor] = {}
    for key in official.keys():
        t = official.get(key)
        if key.endswith(".weight") and t.dim() == 2 and key.startswith("blocks."):
            q, scale = _fp8_quantize(t)
            sd[key] = q
            stem = key[: -len(".weight")]
            if style == "legacy_scale_weight":
                sd[stem + ".scale_weight"] = scale
            else:
                sd[stem + ".weight_scale"] = scale
                sd[stem + ".input_scale"] = torch.ones(())
                sd[stem + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            sd[key] = t.bfloat16()
    if style == "legacy_scale_weight":
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "wan2.2_s2v_14B_fp8_scaled.safetensors"
    save_file(sd, str(path))
    src, layout = open_single_file(path, "dit")
    assert layout == "comfy_dit_fp8_scaled"
    assert set(src.keys()) == set(official.keys())
    key = "blocks.0.self_attn.q.weight"
    w = src.get(key, dtype=torch.float32)
    stem = key[: -len(".weight")]
    scale = sd[stem + (".scale_weight" if style == "legacy_scale_weight" else ".weight_scale")]
    assert torch.equal(w, sd[key].float() * scale)
    ref = official.get(key)
    assert (w - ref).abs().max() <= 0.07 * ref.abs().max()
    assert src.dtype(key) == torch.float32


def test_unsupported_quantization_is_refused(tmp_path):
    sd = {"blocks.0.self_attn.q.weight": torch.zeros(4, 4, dtype=torch.int8),
          "blocks.0.self_attn.q.weight_scale": torch.ones(4, 1),
          "blocks.0.self_attn.q.comfy_quant": torch.tensor(list(b'{"format": "int8_tensorwise"}'), dtype=torch.uint8),
          "head.modulation": torch.zeros(1, 2, 4), "casual_audio_encoder.weights": torch.zeros(1, 3, 1, 1)}
    save_file(sd, str(tmp_path / "int8.safetensors"))
    with pytest.raises(CheckpointError, match="int8_tensorwise"):
        open_single_file(tmp_path / "int8.safetensors", "dit")


def test_non_s2v_wan_dit_is_named(tmp_path):
    save_file({"head.modulation": torch.zeros(1, 2, 8), "blocks.0.ffn.0.weight": torch.zeros(4, 8)},
              str(tmp_path / "wan_t2v.safetensors"))
    with pytest.raises(CheckpointError, match="without the S2V audio modules"):
        open_single_file(tmp_path / "wan_t2v.safetensors", "dit")


def test_comfy_t5_hf_names_convert_back(tiny, tmp_path):
    from liveavatar.models.text_encoder import convert_t5_state_dict

    official = load_pth_state_dict(tiny / OFFICIAL_FILES.t5)
    hf = convert_t5_state_dict(dict(official))  # UMT5EncoderModel names = what ComfyUI's T5 loads
    hf.pop("encoder.embed_tokens.weight", None)  # tied copy; ComfyUI's T5 has no such module
    hf["spiece_model"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    hf["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"] = official["blocks.0.ffn.fc1.weight"]
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "umt5_xxl_bf16.safetensors"))
    src, layout = open_single_file(tmp_path / "umt5_xxl_bf16.safetensors", "t5")
    assert layout == "comfy_t5"
    assert open_single_file(tiny / OFFICIAL_FILES.t5, "t5")[1] == "official_t5"
    assert set(src.keys()) == set(official)
    for k in official:
        assert torch.equal(src.get(k), official[k]), k
    assert infer_t5_config(src) == infer_t5_config(DictSource(official))
    assert comfy_t5_to_official("encoder.block.3.layer.1.DenseReluDense.wi_0.weight") == "blocks.3.ffn.gate.0.weight"
    assert comfy_t5_to_official("encoder.block.3.layer.0.SelfAttention.relative_attention_bias.weight") == \
        "blocks.3.pos_embedding.embedding.weight"
    assert comfy_t5_to_official("shared.weight") == "token_embedding.weight"
    assert comfy_t5_to_official("spiece_model") is None and comfy_t5_to_official("scaled_fp8") is None


def test_comfy_vae_and_wav2vec2(tiny, tmp_path):
    vae = load_pth_state_dict(tiny / OFFICIAL_FILES.vae)
    save_file({k: v.contiguous() for k, v in vae.items()}, str(tmp_path / "wan_2.1_vae.safetensors"))
    src, layout = open_single_file(tmp_path / "wan_2.1_vae.safetensors", "vae")
    assert layout == "wan_vae" and infer_vae_config(src).base_dim == 8

    from safetensors.torch import load_file

    folder = tiny / OFFICIAL_FILES.wav2vec_dir
    hf = load_file(str(folder / "model.safetensors"))
    comfy = {k[len("wav2vec2."):]: v for k, v in hf.items() if k.startswith("wav2vec2.")}  # ComfyUI module names
    save_file(comfy, str(tmp_path / "wav2vec2_large_english.safetensors"))
    src, layout = open_single_file(tmp_path / "wav2vec2_large_english.safetensors", "wav2vec2")
    assert layout == "comfy_wav2vec2"
    assert set(src.keys()) == {k for k in hf if k.startswith("wav2vec2.")}
    config, pre = wav2vec2_config_from_keys(src, num_attention_heads=2)  # heads: not in the shapes
    real = json.loads((folder / "config.json").read_text())
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_bias",
                  "feat_extract_norm", "do_stable_layer_norm", "num_conv_pos_embeddings",
                  "num_conv_pos_embedding_groups"):
        assert config[field] == real[field], field
    assert list(config["conv_dim"]) == list(real["conv_dim"]) and list(config["conv_kernel"]) == list(real["conv_kernel"])
    assert pre["do_normalize"] is True
    from liveavatar.models.wav2vec import AudioFeatureExtractor

    a = AudioFeatureExtractor.from_pretrained(folder)
    b = AudioFeatureExtractor.from_state_dict({k: src.get(k) for k in src.keys()}, config, pre)
    wave = torch.sin(torch.linspace(0, 300, 8000))
    assert torch.equal(a.hidden_states(wave), b.hidden_states(wave))
    assert comfy_wav2vec2_to_hf("encoder.layers.0.attention.q_proj.weight") == \
        "wav2vec2.encoder.layers.0.attention.q_proj.weight"


def test_key_functions_and_layout_names():
    assert comfy_dit_to_official("model.diffusion_model.blocks.0.ffn.0.weight") == "blocks.0.ffn.0.weight"
    assert comfy_dit_to_official("blocks.0.ffn.0.scale_weight") is None
    assert comfy_dit_to_official("scaled_fp8") is None
    assert detect_layout({"token_embedding.weight": torch.zeros(1), "blocks.0.attn.q.weight": torch.zeros(1)}) == \
        "official_t5"
    assert detect_layout({"decoder.middle.0.residual.0.gamma": torch.zeros(1)}) == "wan_vae"
    assert detect_layout({"x.lora_A.weight": torch.zeros(1), "x.lora_B.weight": torch.zeros(1)}) == "lora"
    assert detect_layout({"foo": torch.zeros(1)}) == "unknown"


def _tiny_spiece_model() -> bytes:
    """A small SentencePiece model trained here (T5 ids: pad 0, eos 1, unk 2)."""
    import io

    import sentencepiece as spm

    corpus = ["a woman talks to the camera in a bright studio", "the man is smiling and speaking slowly",
              "news reporter in front of a blue background", "close up portrait, soft warm light!"] * 50
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=40, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", minloglevel=2)
    return buf.getvalue()


def test_sentencepiece_tokenizer_pads_truncates_keeps_eos():
    import sentencepiece as spm

    from liveavatar.models.text_encoder import SentencePieceTokenizer, tokenize

    blob = _tiny_spiece_model()
    tok, sp = SentencePieceTokenizer(blob), spm.SentencePieceProcessor(model_proto=blob)
    ids, mask = tokenize(tok, "  A woman   talks &amp; smiles ", 64)
    want = sp.encode("A woman talks & smiles") + [1]  # cleaned as the reference cleans
    assert len(want) < 64 and ids[0, :len(want)].tolist() == want and ids[0, len(want):].eq(0).all()
    assert mask[0].tolist() == [1] * len(want) + [0] * (64 - len(want))
    ids, mask = tokenize(tok, "news reporter " * 20, 8)  # truncated: 7 pieces + EOS
    assert ids[0].tolist() == sp.encode(("news reporter " * 20).strip())[:7] + [1] and mask.all()


@pytest.mark.parametrize("tokenizer", ["folder", "embedded", "missing"])
def test_load_components_from_comfy_files(tiny, tmp_path, tokenizer):
    """ComfyUI-style single files. The umT5 file may carry its tokenizer (`spiece_model`, as
    ComfyUI's do): then no tokenizer folder is needed; without either, the error says so."""
    from liveavatar.loading.official import load_components_from_files
    from liveavatar.models.text_encoder import SentencePieceTokenizer, convert_t5_state_dict

    official = open_tensor_source(tiny)
    save_file({"model.diffusion_model." + k: official.get(k) for k in official.keys()}, str(tmp_path / "dit.safetensors"))
    t5 = convert_t5_state_dict(dict(load_pth_state_dict(tiny / OFFICIAL_FILES.t5)))
    t5.pop("encoder.embed_tokens.weight", None)
    blob = _tiny_spiece_model()
    if tokenizer == "embedded":
        t5["spiece_model"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    save_file({k: v.contiguous() for k, v in t5.items()}, str(tmp_path / "t5.safetensors"))
    kwargs = dict(dit=tmp_path / "dit.safetensors", t5=tmp_path / "t5.safetensors", vae=tiny / OFFICIAL_FILES.vae,
                  wav2vec=tiny / OFFICIAL_FILES.wav2vec_dir, lora=tiny / OFFICIAL_FILES.lora,
                  config=tiny / OFFICIAL_FILES.config, device="cpu", dtype=torch.float32,
                  tokenizer_dir=tiny / OFFICIAL_FILES.tokenizer_dir if tokenizer == "folder" else None)
    if tokenizer == "missing":
        with pytest.raises(CheckpointError, match="no embedded tokenizer.*tokenizer_dir"):
            load_components_from_files(**kwargs)
        return
    parts = load_components_from_files(**kwargs)
    text = parts["text_encoder"]
    if tokenizer == "embedded":
        import sentencepiece as spm

        assert isinstance(text.tokenizer, SentencePieceTokenizer)
        ids = spm.SentencePieceProcessor(model_proto=blob).encode("a woman talks") + [1]
        ids_t = torch.tensor([ids + [0] * (text.cfg.text_len - len(ids))])
        mask = (torch.arange(text.cfg.text_len) < len(ids)).long()[None]
        assert torch.equal(text.encode("a woman talks"), text.encode_ids(ids_t, mask))
        return
    from liveavatar.loading.official import load_dit

    ref = load_dit(find_official_checkpoint(tiny), "cpu", torch.float32)
    got = parts["dit"].state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(got[key], value), key


def test_infer_14b_config_from_shapes_alone(fixtures_dir):
    rows = (fixtures_dir / "s2v14b_keys.tsv").read_text().splitlines()[1:]
    meta = {r.split("\t")[0]: torch.empty([int(x) for x in r.split("\t")[1].split("x")], device="meta") for r in rows}
    src = DictSource(meta, origin="wan2.2_s2v_14B_bf16.safetensors")
    assert detect_layout(src) == "official_dit"
    cfg = infer_dit_config(src)
    assert cfg == DiTConfig.from_json(fixtures_dir / "s2v14b_config.json")
    assert cfg.num_heads == 40 and cfg.text_dim == 4096 and cfg.audio_num_layers == 25
    small = {k: v for k, v in meta.items() if not k.startswith("audio_injector.injector.11.")}
    with pytest.raises(CheckpointError, match="audio_inject_layers"):
        infer_dit_config(DictSource(small))


def test_wav2vec2_large_xlsr_config_from_shapes():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    real = dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=24, intermediate_size=4096,
                conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=128,
                num_conv_pos_embedding_groups=16, vocab_size=33)
    with torch.device("meta"):
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**real))
    src = DictSource(model.state_dict())
    assert detect_layout(src) == "hf_wav2vec2"
    config, pre = wav2vec2_config_from_keys(src)
    for key, value in real.items():
        assert config[key] == value, key
    assert pre["do_normalize"] and pre["sampling_rate"] == 16000


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_while_loading_equals_convert_after(tiny, scaling):
    """fp8 linears made layer by layer during the load (LoRA merged first) hold exactly what
    loading bf16, merging the LoRA and converting afterwards gives; the excluded layers stay bf16."""
    from liveavatar.loading.official import build_dit_from_source, load_dit
    from liveavatar.models.fp8 import FP8Linear, convert_to_fp8

    ckpt = find_official_checkpoint(tiny)
    after = load_dit(ckpt, "cpu", torch.bfloat16)
    convert_to_fp8(after, allow_cpu=True, scaling=scaling)
    during = build_dit_from_source(ckpt.dit, ckpt.config, "cpu", torch.bfloat16, ckpt.lora_path, 1.0,
                                   fp8=scaling, fp8_allow_cpu=True)
    a, b = after.state_dict(), during.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = a[key], b[key]
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert x.dtype == y.dtype and torch.equal(x, y), key
    kinds = {n: type(m).__name__ for n, m in during.named_modules() if isinstance(m, (nn.Linear, FP8Linear))}
    assert kinds == {n: type(m).__name__ for n, m in after.named_modules() if isinstance(m, (nn.Linear, FP8Linear))}
    assert kinds["blocks.0.self_attn.q"] == "FP8Linear" and kinds["head.head"] == "Linear"
    assert during.blocks[0].self_attn.q.scaling == scaling


def test_fp8_on_cpu_is_refused_before_reading_files(tmp_path):
    from liveavatar.pipeline.model import LiveAvatar

    with pytest.raises(ValueError, match="fp8: needs a CUDA GPU"):
        LiveAvatar.from_checkpoint(tmp_path / "no-such-folder", device="cpu", fp8=True)
    with pytest.raises(ValueError, match="fp8: 'block'"):
        LiveAvatar.from_checkpoint(tmp_path / "no-such-folder", device="cpu", fp8="block")


def test_load_into_module_frees_what_on_assigned_replaces():
    """A layer transformed in `on_assigned` (as the fp8-while-loading path does) leaves no loaded
    tensor behind in the loader: its weight is freed at once (weakref dead), tied tensors still tie."""
    import gc
    import weakref

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.emb = nn.Embedding(8, 8)
            self.out = nn.Linear(8, 8, bias=False)
            self.out.weight = self.emb.weight  # tied

    src = {k: torch.randn(v.shape) for k, v in Net().state_dict().items()}
    with torch.device("meta"):
        net = Net()
    refs: dict[str, weakref.ref] = {}

    def replace(name: str) -> None:
        if name == "a.bias":  # layer `a` complete: swap it for a fresh module, keep a weakref to its weight
            refs["a"] = weakref.ref(net.a.weight)
            net.a = nn.Identity()
            gc.collect()
            assert refs["a"]() is None, "the loader still holds the replaced weight"

    load_into_module(net, src, strict=True, on_assigned=replace)
    assert "a" in refs and isinstance(net.a, nn.Identity)
    assert torch.equal(net.b.weight, src["b.weight"]) and net.out.weight.data_ptr() == net.emb.weight.data_ptr()
