"""Layer slices of the DiT (`CausalS2VDiT(cfg, layers=range(a, b))`) chained equal the whole model.

A 5-layer tiny DiT (random weights, fp32) is cut into slices; each slice holds only its layers,
their audio injectors and caches of its layers; the tokens of one slice are the next one's input.
The sink prefill and a streaming rollout (window growing in clip 0, then the ring wrapping; two
denoising steps) must give bit-identical velocities to the unsliced model, eager and fused.
"""

from __future__ import annotations

import pytest
import torch

from liveavatar.config import DiTConfig
from liveavatar.models.dit import CausalS2VDiT

CFG = DiTConfig(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=5, text_len=16, audio_dim=32,
                audio_inject_layers=(0, 2, 4), text_dim=32, audio_num_layers=3)
HW = (16, 16)


def _full() -> CausalS2VDiT:
    torch.manual_seed(0)
    model = CausalS2VDiT(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():  # PyTorch's default init leaves zeros (modulation): fill them all
            p.copy_(torch.randn_like(p) / max(1, p.shape[-1]) ** 0.5)
    return model


def _slices(full: CausalS2VDiT, bounds: list[int]) -> list[CausalS2VDiT]:
    sd = full.state_dict()
    out = []
    for a, b in zip(bounds, bounds[1:]):
        part = CausalS2VDiT(CFG, layers=range(a, b)).eval()
        keys = set(part.state_dict())
        assert not any(k.startswith("blocks.") and int(k.split(".")[1]) not in range(a, b) for k in keys)
        part.load_state_dict({k: v for k, v in sd.items() if k in keys})
        out.append(part)
    return out


def _rollout(models: list[CausalS2VDiT], slot: bool, blocks: int = 5, steps: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ref, motion = torch.randn(1, 16, 1, *HW, generator=g), torch.randn(1, 16, 19, *HW, generator=g)
    context = torch.randn(7, CFG.text_dim, generator=g)
    texts = [m.encode_text(context) for m in models]
    sinks = [m.new_sink_cache(HW) for m in models]
    hidden = None
    for m, text, sink in zip(models, texts, sinks):
        hidden = m.prefill_sink(ref, motion, text, sink, hidden=hidden)
    assert hidden is None
    caches = [[m.new_step_cache(HW, sink_slot=slot) for _ in range(steps)] for m in models]
    outs = []
    for b in range(blocks):
        x = torch.randn(16, 3, *HW, generator=g)
        audio = torch.randn(1, CFG.audio_num_layers, CFG.audio_dim, 12, generator=g)
        for s in range(steps):
            hidden = None
            for m, text, sink, cs in zip(models, texts, sinks, caches):
                hidden = m.forward_block(x, 900.0 - 300 * s, text, audio, None, cs[s], sink, 3 * b, 5, hidden=hidden)
            outs.append(hidden)
    return torch.stack(outs)


@pytest.mark.parametrize("bounds", [[0, 2, 5], [0, 1, 2, 3, 4, 5]], ids=["2", "5"])
def test_slices_chain_equals_whole_model(bounds):
    full = _full()
    assert torch.equal(_rollout(_slices(full, bounds), slot=False), _rollout([full], slot=False))


def test_fused_slices_with_sink_slot_equal_whole_model():
    full = _full()
    parts = _slices(full, [0, 1, 3, 5])
    for m in (full, *parts):
        m.compile_blocks(compile=False)  # the fused regions, eagerly
    assert torch.equal(_rollout(parts, slot=True), _rollout([full], slot=True))


def test_slice_holds_only_its_weights_and_caches():
    part = CausalS2VDiT(CFG, layers=range(1, 3))
    whole = CausalS2VDiT(CFG)
    n_part, n_whole = (sum(p.numel() for p in m.parameters()) for m in (part, whole))
    block = sum(p.numel() for p in whole.blocks[0].parameters())
    inj = sum(p.numel() for p in whole.audio_injector.injector[0].parameters()) + sum(
        p.numel() for p in whole.audio_injector.injector_adain_layers[0].parameters())
    assert n_whole - n_part == 3 * block + 2 * inj  # layers 0, 3, 4 and the injectors of 0 and 4
    assert part.new_sink_cache(HW).kv.shape[0] == 2 and part.new_step_cache(HW).kv.shape[0] == 2
    assert not part.first_slice and not part.last_slice
    with pytest.raises(ValueError, match="layers"):
        CausalS2VDiT(CFG, layers=range(3, 7))
