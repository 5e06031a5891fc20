from liveavatar.config import ConfigError, DiTConfig

import pytest


def test_real_14b_config(fixtures_dir):
    cfg = DiTConfig.from_json(fixtures_dir / "s2v14b_config.json")
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.head_dim) == (5120, 40, 40, 128)
    assert cfg.rope_axes == (22, 21, 21)
    assert cfg.audio_inject_layers == (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)


def test_tiny_config(fixtures_dir):
    cfg = DiTConfig.from_json(fixtures_dir / "tiny_s2v")
    assert (cfg.dim, cfg.num_heads, cfg.head_dim, cfg.rope_axes) == (128, 4, 32, (6, 5, 5))


def test_bad_config_names_file_and_key(tmp_path):
    (tmp_path / "config.json").write_text('{"dim": 100, "num_heads": 3, "audio_inject_layers": [0, 9], "num_layers": 2}')
    with pytest.raises(ConfigError, match=r"config.json: .*num_heads"):
        DiTConfig.from_json(tmp_path)


def test_roundtrip(tmp_path):
    cfg = DiTConfig(dim=64, num_heads=4, num_layers=2, ffn_dim=128, audio_inject_layers=(0, 1))
    import json
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert DiTConfig.from_json(tmp_path) == cfg
