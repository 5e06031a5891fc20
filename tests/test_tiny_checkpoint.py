"""Tiny checkpoint writer: official folder layout, key lists derived from configs, fixture rule."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from liveavatar.config import OFFICIAL_FILES, DiTConfig, LoRAConfig, T5Config, VAEConfig
from liveavatar.loading.safetensors_io import load_pth_state_dict, open_tensor_source
from liveavatar.loading.tiny import (
    TINY_DIT, dit_key_shapes, lora_targets_from_shapes, make_tiny_checkpoint, t5_key_shapes, vae_key_shapes,
)

REPO = Path(__file__).resolve().parents[1]


def read_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    rows = path.read_text().splitlines()[1:]
    return {r.split("\t")[0]: tuple(int(x) for x in r.split("\t")[1].split("x")) for r in rows}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("tiny") / "Wan2.2-S2V-14B"
    t0 = time.perf_counter()
    make_tiny_checkpoint(out, seed=0)
    return out, time.perf_counter() - t0


def test_official_folder_layout_and_size(tiny):
    root, seconds = tiny
    f = OFFICIAL_FILES
    for name in (f.config, f.dit_index, "diffusion_pytorch_model-00001-of-00002.safetensors",
                 "diffusion_pytorch_model-00002-of-00002.safetensors", f.t5, f.t5_config, f.vae, f.vae_config,
                 f.lora, f"{f.wav2vec_dir}/config.json", f"{f.wav2vec_dir}/model.safetensors",
                 f"{f.wav2vec_dir}/preprocessor_config.json"):
        assert (root / name).is_file(), name
    assert (root / f.tokenizer_dir).is_dir() and any((root / f.tokenizer_dir).iterdir())
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 10 * 2**20, f"{size / 2**20:.1f} MB"
    assert seconds < 20
    index = json.loads((root / f.dit_index).read_text())
    assert set(index["weight_map"].values()) == {"diffusion_pytorch_model-00001-of-00002.safetensors",
                                                  "diffusion_pytorch_model-00002-of-00002.safetensors"}
    config = json.loads((root / f.config).read_text())
    assert config["_class_name"] == "WanModel_S2V" and config["dim"] == 64 and config["audio_inject_layers"] == [0, 1]
    assert "text_dim" not in config  # as the official writer: not a registered config key


def test_dit_weights_match_config_and_fixture_rule(tiny):
    root, _ = tiny
    src = open_tensor_source(root / OFFICIAL_FILES.dit_index)
    cfg = TINY_DIT
    assert {k: src.shape(k) for k in src.keys()} == dit_key_shapes(cfg)
    for key in src.keys():
        t = src.get(key)
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
        assert t.std() > 0 if t.numel() > 1 else t.abs().item() > 0, f"{key} is constant"
    # the rule: norm weights around 1, modulation ~ N(0, 1/dim)
    assert abs(src.get("blocks.0.self_attn.norm_q.weight").mean().item() - 1.0) < 0.1
    assert src.get("blocks.0.modulation").std().item() == pytest.approx(64 ** -0.5, rel=0.3)


def test_components_have_consistent_sizes(tiny):
    root, _ = tiny
    t5 = load_pth_state_dict(root / OFFICIAL_FILES.t5)
    t5_cfg = json.loads((root / OFFICIAL_FILES.t5_config).read_text())
    assert t5["token_embedding.weight"].shape == (t5_cfg["vocab"], TINY_DIT.text_dim)
    assert set(t5) == set(t5_key_shapes(T5Config(**{k: v for k, v in t5_cfg.items()})))
    vae = load_pth_state_dict(root / OFFICIAL_FILES.vae)
    assert {k: tuple(v.shape) for k, v in vae.items()} == vae_key_shapes(VAEConfig(base_dim=8))
    w2v = json.loads((root / OFFICIAL_FILES.wav2vec_dir / "config.json").read_text())
    assert w2v["hidden_size"] == TINY_DIT.audio_dim
    assert w2v["num_hidden_layers"] + 1 == TINY_DIT.audio_num_layers
    assert w2v["do_stable_layer_norm"] is True and w2v["feat_extract_norm"] == "layer"
    with safe_open(str(root / OFFICIAL_FILES.wav2vec_dir / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert any(k.startswith("wav2vec2.encoder.layers.1.") for k in keys) and "lm_head.weight" in keys


def test_lora_covers_every_target_with_nonzero_matrices(tiny):
    root, _ = tiny
    lora = open_tensor_source(root / OFFICIAL_FILES.lora)
    targets = lora_targets_from_shapes(dit_key_shapes(TINY_DIT), LoRAConfig().targets)
    # 2 blocks x (4 self + 4 cross + 2 ffn) + 2 injectors x 4
    assert len(targets) == 2 * 10 + 2 * 4
    expected = {f"base_model.model.{m}.lora_{ab}.default.weight" for m in targets for ab in "AB"}
    assert set(lora.keys()) == expected
    for module, (out_f, in_f) in targets.items():
        a = lora.get(f"base_model.model.{module}.lora_A.default.weight")
        b = lora.get(f"base_model.model.{module}.lora_B.default.weight")
        assert a.shape == (4, in_f) and b.shape == (out_f, 4)
        assert a.abs().min() > 0 or a.std() > 0
        assert (b @ a).abs().max() > 0


def test_deterministic_per_seed(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3)
    c = make_tiny_checkpoint(tmp_path / "c", seed=4)
    sa, sb, sc = (open_tensor_source(p / OFFICIAL_FILES.dit_index) for p in (a, b, c))
    key = "blocks.1.ffn.0.weight"
    assert torch.equal(sa.get(key), sb.get(key))
    assert not torch.equal(sa.get(key), sc.get(key))
    assert (a / OFFICIAL_FILES.lora).read_bytes() == (b / OFFICIAL_FILES.lora).read_bytes()


def test_custom_dit_config_and_bf16(tmp_path):
    cfg = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=3, audio_dim=16, audio_inject_layers=(0, 2),
                    text_dim=16, audio_num_layers=2, freq_dim=16)
    root = make_tiny_checkpoint(tmp_path / "ck", seed=1, dit=cfg, dtype=torch.bfloat16)
    src = open_tensor_source(root)
    assert src.dtype("blocks.2.ffn.2.weight") == torch.bfloat16
    assert src.shape("audio_injector.injector.1.q.weight") == (32, 32)
    assert json.loads((root / OFFICIAL_FILES.wav2vec_dir / "config.json").read_text())["num_hidden_layers"] == 1
    assert load_pth_state_dict(root / OFFICIAL_FILES.t5)["token_embedding.weight"].shape[1] == 16


# ---- derived key lists against the reference's own lists -----------------------------------

def test_dit_keys_match_reference_14b(fixtures_dir):
    cfg = DiTConfig.from_json(fixtures_dir / "s2v14b_config.json")
    derived = dit_key_shapes(cfg)
    reference = read_tsv(fixtures_dir / "s2v14b_keys.tsv")
    assert list(derived) == list(reference) and derived == reference
    assert len(derived) == 1260
    assert sum(torch.Size(s).numel() for s in derived.values()) == 16_295_755_609


def test_dit_keys_match_reference_tiny(fixtures_dir):
    cfg = DiTConfig.from_json(fixtures_dir / "tiny_s2v" / "config.json")
    assert dit_key_shapes(cfg) == read_tsv(fixtures_dir / "tiny_s2v" / "keys.tsv")


def test_vae_and_t5_keys_match_reference(fixtures_dir):
    assert vae_key_shapes(VAEConfig(base_dim=8)) == read_tsv(fixtures_dir / "vae" / "keys.tsv")
    full = vae_key_shapes(VAEConfig())
    assert len(full) == 194 and sum(torch.Size(s).numel() for s in full.values()) == 126_892_531
    case = json.loads((fixtures_dir / "t5" / "t5_case.json").read_text())["config"]
    cfg = T5Config(vocab=case["vocab_size"], dim=case["dim"], dim_attn=case["dim_attn"], dim_ffn=case["dim_ffn"],
                   num_heads=case["num_heads"], num_layers=case["encoder_layers"], num_buckets=case["num_buckets"])
    assert t5_key_shapes(cfg) == read_tsv(fixtures_dir / "t5" / "keys.tsv")


def test_model_keys_match_derived_keys(fixtures_dir):
    from liveavatar.loading.tiny import dit_shapes_from_model

    for cfg in (TINY_DIT, DiTConfig.from_json(fixtures_dir / "s2v14b_config.json")):
        assert dit_shapes_from_model(cfg) == dit_key_shapes(cfg)


def test_cli_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "cli-ckpt"
    proc = subprocess.run([sys.executable, "-m", "liveavatar", "make-tiny-checkpoint", str(out), "--seed", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from liveavatar.loading.official import find_official_checkpoint

    ckpt = find_official_checkpoint(out)
    assert ckpt.config.dim == TINY_DIT.dim and ckpt.lora_path == out.resolve() / OFFICIAL_FILES.lora
