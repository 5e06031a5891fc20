"""State-dict conformance of CausalS2VDiT: tiny keys, real 14B keys/shapes (meta device), LoRA targets."""

from __future__ import annotations

import json

import torch

from liveavatar.config import DiTConfig, LoRAConfig
from liveavatar.loading.lora import peft_target_names
from liveavatar.models.dit import CausalS2VDiT


def read_tsv(path) -> list[tuple[str, tuple[int, ...]]]:
    rows = path.read_text().splitlines()[1:]
    out = []
    for row in rows:
        key, shape = row.split("\t")[:2]
        out.append((key, tuple(int(s) for s in shape.split("x"))))
    return out


def our_keys(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def meta_model(config_path) -> CausalS2VDiT:
    with torch.device("meta"):
        return CausalS2VDiT(DiTConfig.from_json(config_path))


def test_tiny_keys_equal_reference(fixtures_dir):
    model = meta_model(fixtures_dir / "tiny_s2v" / "config.json")
    expected = read_tsv(fixtures_dir / "tiny_s2v" / "keys.tsv")
    assert len(expected) == 180
    assert our_keys(model) == expected  # names, shapes and order
    assert sum(p.numel() for p in model.parameters()) == 2_948_793


def test_14b_keys_and_shapes(fixtures_dir):
    model = meta_model(fixtures_dir / "s2v14b_config.json")
    assert all(p.is_meta for p in model.parameters())
    expected = read_tsv(fixtures_dir / "s2v14b_keys.tsv")
    assert len(expected) == 1260
    ours = our_keys(model)
    assert dict(ours) == dict(expected)
    assert ours == expected  # same order too
    assert sum(p.numel() for p in model.parameters()) == 16_295_755_609
    assert not list(model.buffers())


def test_14b_lora_targets(fixtures_dir):
    model = meta_model(fixtures_dir / "s2v14b_config.json")
    spec = json.loads((fixtures_dir / "s2v14b_lora_targets.json").read_text())
    assert tuple(spec["target_modules_string"].split(",")) == LoRAConfig().targets
    names = peft_target_names(model)
    assert len(names) == spec["num_wrapped_linears"] == 448
    assert sorted(names) == sorted(spec["wrapped_modules"])

    # shapes of the LoRA tensors peft builds for them: A [r, in], B [out, r]
    r = LoRAConfig().rank
    lora = dict(read_tsv(fixtures_dir / "s2v14b_lora_keys.tsv"))
    modules = dict(model.named_modules())
    for name in names:
        lin = modules[name]
        assert lora[f"base_model.model.{name}.lora_A.default.weight"] == (r, lin.in_features)
        assert lora[f"base_model.model.{name}.lora_B.default.weight"] == (lin.out_features, r)
    assert len(lora) == 2 * len(names)


def test_cache_sizes_follow_the_latent_size(fixtures_dir):
    """Sink capacity is computed from the size (2.5 fsl at multiples of 8; 2778 at 720x400, not a fixed 2800)."""
    model = meta_model(fixtures_dir / "s2v14b_config.json")
    assert model.sink_tokens((16, 24)) == 240
    assert model.sink_tokens((90, 50)) == 45 * 25 * 2 + 22 * 12 + 4 * 11 * 6 == 2778
    assert model.frame_packer.positions((16, 24))[:, 0].unique().tolist() == [-19, -14, -9, -4, -3, -1]
    step = model.new_step_cache((16, 24), device="meta", dtype=torch.bfloat16)
    assert step.ring == 12 * 96
    assert step.kv.shape == (40, 2, 1, 12 * 96, 40, 128)
    assert step.nbytes == step.kv.numel() * 2
    slot = model.new_step_cache((16, 24), "meta", torch.bfloat16, sink_slot=True)
    assert slot.kv.shape == (40, 2, 1, 12 * 96 + 240, 40, 128)
    sink = model.new_sink_cache((16, 24), device="meta", dtype=torch.bfloat16)
    assert sink.kv.shape == (40, 2, 1, 240, 40, 128)


def test_14b_streaming_calls_on_meta(fixtures_dir):
    """The real layout at 720x400 (latent 90x50, odd patch grid 45x25): prefill + blocks, shapes only.

    Meta tensors also catch any tensor left on another device in the call path.
    """
    with torch.device("meta"):
        model = CausalS2VDiT(DiTConfig.from_json(fixtures_dir / "s2v14b_config.json")).to(torch.bfloat16)
    hw, dev = (90, 50), "meta"
    sink = model.new_sink_cache(hw)
    text = model.encode_text(torch.zeros(20, 4096, device=dev))
    assert text.kv.shape == (40, 2, 1, 512, 40, 128)
    model.prefill_sink(torch.zeros(1, 16, 1, *hw, device=dev), torch.zeros(1, 16, 19, *hw, device=dev), text, sink)
    assert sink.length == sink.capacity == 2778
    cache = model.new_step_cache(hw)
    for f0 in (0, 12):  # clip 0, then a wrapped write in clip 1
        v = model.forward_block(torch.zeros(16, 3, *hw, device=dev, dtype=torch.bfloat16), 602.15, text,
                                torch.zeros(1, 25, 1024, 12, device=dev), None, cache, sink, f0, 4)
        assert v.shape == (16, 3, 90, 50) and v.dtype == torch.bfloat16 and v.is_meta
    assert cache.length == cache.ring == 12 * 45 * 25
