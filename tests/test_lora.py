"""LoRA merge: key spellings, scale alpha/r, strength, errors, the 14B target list."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from liveavatar.config import OFFICIAL_FILES, DiTConfig
from liveavatar.loading.lora import merge_lora, normalize_lora_key, peft_target_names
from liveavatar.loading.safetensors_io import CheckpointError, open_tensor_source
from liveavatar.loading.tiny import make_tiny_checkpoint

RANK = 4


class ToyDiT(nn.Module):
    """The naming of the DiT's LoRA targets (and one Linear that is not a target)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)

        def lin(i: int, o: int) -> nn.Linear:
            layer = nn.Linear(i, o, dtype=dtype)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(o, i, generator=g))
            return layer

        block = nn.Module()
        block.self_attn = nn.Module()
        block.self_attn.q, block.self_attn.o = lin(16, 16), lin(16, 16)
        block.ffn = nn.Sequential(lin(16, 32), nn.GELU(), lin(32, 16))
        self.blocks = nn.ModuleList([block])
        self.audio_injector = nn.Module()
        inj = nn.Module()
        inj.q = lin(16, 16)
        self.audio_injector.injector = nn.ModuleList([inj])
        self.text_embedding = nn.Sequential(lin(8, 16))


TARGETS = ["blocks.0.self_attn.q", "blocks.0.self_attn.o", "blocks.0.ffn.0", "blocks.0.ffn.2",
           "audio_injector.injector.0.q"]


def lora_mats(model: nn.Module, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in TARGETS:
        w = model.get_submodule(name).weight
        out[name] = (torch.randn(RANK, w.shape[1], generator=g), torch.randn(w.shape[0], RANK, generator=g))
    return out


SPELLINGS = {
    "peft": lambda m, ab: f"base_model.model.{m}.lora_{ab}.default.weight",
    "peft_bare": lambda m, ab: f"{m}.lora_{ab}.default.weight",
    "diffusers": lambda m, ab: f"diffusion_model.{m}.lora_{ab}.weight",
    "comfy_full": lambda m, ab: f"model.diffusion_model.{m}.lora_{ab}.weight",
    "kohya": lambda m, ab: f"lora_unet_{m.replace('.', '_')}.lora_{'down' if ab == 'A' else 'up'}.weight",
    "down_up": lambda m, ab: f"diffusion_model.{m}.lora_{'down' if ab == 'A' else 'up'}.weight",
    "dot_down": lambda m, ab: f"{m}.lora.{'down' if ab == 'A' else 'up'}.weight",
    "mochi": lambda m, ab: f"{m}.lora_{ab}",
}


def write(mats, spelling: str, path, alpha: float | None = None) -> None:
    name = SPELLINGS[spelling]
    sd = {}
    for module, (a, b) in mats.items():
        sd[name(module, "A")], sd[name(module, "B")] = a, b
        if alpha is not None:
            sd[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))


def expected(model: nn.Module, mats, scale: float) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in mats.items():
        w = model.get_submodule(name).weight
        out[name] = (w.detach().float() + scale * (b.double() @ a.double()).float()).to(w.dtype)
    return out


def test_normalize_lora_key_spellings():
    m = "blocks.3.cross_attn.k"
    for spelling, name in SPELLINGS.items():
        got_a, got_b = normalize_lora_key(name(m, "A")), normalize_lora_key(name(m, "B"))
        module = m.replace(".", "_") if spelling == "kohya" else m
        assert got_a == (module, "A") and got_b == (module, "B"), spelling
    assert normalize_lora_key("base_model.model.blocks.0.ffn.2.lora_B.default.weight") == ("blocks.0.ffn.2", "B")
    assert normalize_lora_key("blocks.0.ffn.0_lora.down.weight") == ("blocks.0.ffn.0", "A")
    assert normalize_lora_key("diffusion_model.blocks.0.ffn.0.alpha") == ("blocks.0.ffn.0", "alpha")
    assert normalize_lora_key("blocks.0.ffn.0.weight") is None
    assert normalize_lora_key("base_model.model.blocks.0.ffn.0.base_layer.weight") is None


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_spelling_merges_to_w_plus_scaled_ba(spelling, tmp_path):
    model = ToyDiT()
    mats = lora_mats(model)
    want = expected(model, mats, 0.5)  # no alpha in the file: the reference ratio 64/128
    write(mats, spelling, tmp_path / "l.safetensors")
    report = merge_lora(model, open_tensor_source(tmp_path / "l.safetensors"))
    assert report.matched == 5 and report.targets == 5 and report.unmatched_keys == []
    assert report.scale == 0.5 and report.rank == RANK
    for name, w in want.items():
        torch.testing.assert_close(model.get_submodule(name).weight, w, rtol=0, atol=1e-5)
    assert not model.text_embedding[0].weight.isnan().any()


def test_bf16_merge_rounds_once_from_fp32(tmp_path):
    model = ToyDiT(torch.bfloat16)
    mats = lora_mats(model)
    want = {n: (model.get_submodule(n).weight.float() + 0.5 * (b @ a)).bfloat16() for n, (a, b) in mats.items()}
    write(mats, "peft", tmp_path / "l.safetensors")
    merge_lora(model, tmp_path / "l.safetensors")
    for name, w in want.items():
        assert torch.equal(model.get_submodule(name).weight, w), name


def test_strength_and_alpha(tmp_path):
    base = ToyDiT()
    mats = lora_mats(base)
    write(mats, "peft", tmp_path / "l.safetensors")
    zero = copy.deepcopy(base)
    report = merge_lora(zero, tmp_path / "l.safetensors", strength=0.0)
    assert report.matched == 5
    for (n, p), (_, q) in zip(zero.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n
    double = copy.deepcopy(base)
    merge_lora(double, tmp_path / "l.safetensors", strength=2.0)
    for name, w in expected(base, mats, 1.0).items():
        torch.testing.assert_close(double.get_submodule(name).weight, w, rtol=0, atol=1e-5)
    # per-layer .alpha tensors (alpha 8, rank 4 -> scale 2), and an explicit alpha argument
    write(mats, "diffusers", tmp_path / "alpha.safetensors", alpha=8.0)
    with_alpha = copy.deepcopy(base)
    assert merge_lora(with_alpha, tmp_path / "alpha.safetensors").scale == 2.0
    for name, w in expected(base, mats, 2.0).items():
        torch.testing.assert_close(with_alpha.get_submodule(name).weight, w, rtol=0, atol=1e-5)
    explicit = copy.deepcopy(base)
    assert merge_lora(explicit, tmp_path / "l.safetensors", alpha=1.0, rank=2).scale == 0.5


def test_no_match_raises_and_names_the_file(tmp_path):
    save_file({"unet.down.0.lora_A.weight": torch.zeros(4, 16), "unet.down.0.lora_B.weight": torch.zeros(16, 4),
               "something_else": torch.zeros(1)}, str(tmp_path / "sdxl_lora.safetensors"))
    with pytest.raises(CheckpointError, match="sdxl_lora.safetensors: no LoRA key matches"):
        merge_lora(ToyDiT(), tmp_path / "sdxl_lora.safetensors")


def test_partial_match_warns_with_counts(tmp_path, caplog):
    model = ToyDiT()
    mats = lora_mats(model)
    sd = {f"{m}.lora_{ab}.default.weight": t for m, (a, b) in list(mats.items())[:3] for ab, t in (("A", a), ("B", b))}
    sd["blocks.9.self_attn.q.lora_A.default.weight"] = torch.zeros(RANK, 16)
    save_file(sd, str(tmp_path / "part.safetensors"))
    with caplog.at_level(logging.WARNING):
        report = merge_lora(model, tmp_path / "part.safetensors")
    assert report.matched == 3 and report.targets == 5
    assert report.unmatched_keys == ["blocks.9.self_attn.q.lora_A.default.weight"]
    assert report.missing_targets == ["audio_injector.injector.0.q", "blocks.0.ffn.2"]
    assert "merged into 3 layers (5 targets); 1 keys unused" in caplog.text


def test_shape_mismatch_raises_before_any_change(tmp_path):
    model = ToyDiT()
    before = copy.deepcopy(model)
    mats = lora_mats(model)
    mats["blocks.0.ffn.2"] = (torch.zeros(RANK, 31), torch.zeros(16, RANK))
    write(mats, "peft", tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks.0.ffn.2: A \[4, 31\], B \[16, 4\] vs weight \[16, 32\]"):
        merge_lora(model, tmp_path / "bad.safetensors")
    for (n, p), (_, q) in zip(model.named_parameters(), before.named_parameters()):
        assert torch.equal(p, q), n


def test_peft_targets_of_a_toy_model():
    assert sorted(peft_target_names(ToyDiT())) == sorted(TARGETS)


# ---- the real 14B names ------------------------------------------------------------------------

def test_every_14b_lora_key_normalises_to_a_target(fixtures_dir):
    targets = json.loads((fixtures_dir / "s2v14b_lora_targets.json").read_text())
    wrapped = set(targets["wrapped_modules"])
    assert len(wrapped) == targets["num_wrapped_linears"] == 448
    rows = (fixtures_dir / "s2v14b_lora_keys.tsv").read_text().splitlines()[1:]
    seen: dict[str, set[str]] = {}
    for row in rows:
        key, shape = row.split("\t")[:2]
        module, kind = normalize_lora_key(key)
        assert module in wrapped, key
        seen.setdefault(module, set()).add(kind)
        r = 128
        dims = [int(x) for x in shape.split("x")]
        assert (dims[0] if kind == "A" else dims[1]) == r
    assert set(seen) == wrapped and all(v == {"A", "B"} for v in seen.values())
    assert targets["scaling_alpha_over_rank"] == 0.5


def test_14b_model_targets_match_peft(fixtures_dir):
    from liveavatar.models import dit

    cfg = DiTConfig.from_json(fixtures_dir / "s2v14b_config.json")
    with torch.device("meta"):
        model = dit.CausalS2VDiT(cfg)
    wrapped = json.loads((fixtures_dir / "s2v14b_lora_targets.json").read_text())["wrapped_modules"]
    assert sorted(peft_target_names(model)) == sorted(wrapped)


def test_tiny_checkpoint_lora_through_load_dit(tmp_path):
    from liveavatar.loading.official import find_official_checkpoint, load_dit

    root = make_tiny_checkpoint(tmp_path / "ck", seed=5)
    ckpt = find_official_checkpoint(root)
    base = load_dit(ckpt, "cpu", torch.float32, lora_path="none")
    merged = load_dit(ckpt, "cpu", torch.float32)
    lora = open_tensor_source(root / OFFICIAL_FILES.lora)
    names = {normalize_lora_key(k)[0] for k in lora.keys()}
    assert len(names) == len(peft_target_names(merged)) == 28
    for name in names:
        a = lora.get(f"base_model.model.{name}.lora_A.default.weight")
        b = lora.get(f"base_model.model.{name}.lora_B.default.weight")
        want = base.get_submodule(name).weight + 0.5 * (b @ a)
        torch.testing.assert_close(merged.get_submodule(name).weight, want, rtol=0, atol=1e-6)
    assert torch.equal(merged.text_embedding[0].weight, base.text_embedding[0].weight)
    zero = load_dit(ckpt, "cpu", torch.float32, lora_strength=0.0)
    assert all(torch.equal(p, q) for p, q in zip(zero.parameters(), base.parameters()))
