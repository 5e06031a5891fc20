"""Loading places the DiT (issue 15): `weights=stream` packs the streamed blocks into host memory
while loading (official folder and ComfyUI single files) and gives the frames of `weights=resident`."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from liveavatar.config import OFFICIAL_FILES
from liveavatar.loading.tiny import make_tiny_checkpoint
from liveavatar.media.audio import audio_from_waveform
from liveavatar.models.block_packing import PACK_ALIGN
from liveavatar.models.layer_stream import LayerResidency
from liveavatar.pipeline import LiveAvatar

BLOCKS = 2  # generated blocks compared (the second one reads the first one's caches)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=5)


def frames(model: LiveAvatar) -> torch.Tensor:
    """uint8 frames [N, 64, 64, 3] of the first `BLOCKS` blocks (fixed prompt, tone, grey image)."""
    t = torch.arange(int(1.5 * 16000)) / 16000
    audio = audio_from_waveform((0.3 * torch.sin(2 * math.pi * 200 * t) * (t * 3 % 1 > 0.4))[None], 16000)
    image = model.prepare_image(Image.new("RGB", (64, 64), (180, 120, 90)), "64*64")
    gen = model.generate(model.encode_prompt("a person"), model.encode_audio(audio), image, seed=3)
    return torch.cat([b.frames for b in itertools.islice(gen, BLOCKS)])


@pytest.fixture(scope="module")
def resident(ckpt):
    model = LiveAvatar.from_checkpoint(ckpt, device="cpu", dtype="fp32", weights="resident")
    assert model.dit.layer_stream is None
    return model, frames(model)


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _packed_range(module: torch.nn.Module) -> range:
    """The bytes one packed buffer of `module` may hold: its tensors' bytes, plus a gap under
    PACK_ALIGN bytes after each (every tensor starts aligned)."""
    count = sum(1 for _ in (*module.parameters(), *module.buffers()))
    return range(_nbytes(module), _nbytes(module) + count * PACK_ALIGN)


def assert_streamed_from_host(model: LiveAvatar, reference: LiveAvatar) -> None:
    """The layer stream's bookkeeping: the second half streamed, each streamed block's tensors
    views of its one host buffer (from the stream's arena), the bytes those of the block."""
    from liveavatar.pipeline.memory import block_bytes

    dit, n = model.dit, model.dit.cfg.num_layers
    stream = dit.layer_stream
    assert stream.residency == LayerResidency(n // 2, 0, 3)
    assert stream.streamed == list(range(n // 2, n))
    for i in range(n // 2):
        assert getattr(dit.blocks[i], "_stream_flat", None) is None
    for i in stream.streamed:
        flat = dit.blocks[i]._stream_flat
        lo = flat.data_ptr()
        for t in (*dit.blocks[i].parameters(), *dit.blocks[i].buffers()):
            assert t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
            assert lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= lo + flat.numel()
        ref = dict(reference.dit.blocks[i].state_dict())
        assert all(torch.equal(v, ref[k]) for k, v in dit.blocks[i].state_dict().items())
    per_block = block_bytes(dit.cfg, torch.float32, False)
    assert stream.host_bytes() == (n - n // 2) * per_block == sum(_nbytes(reference.dit.blocks[i]) for i in stream.streamed)
    assert stream.stats.weight_bytes > 0 and stream.stats.weight_bytes % per_block == 0


def test_stream_loads_half_to_host_and_gives_the_resident_frames(ckpt, resident):
    ref_model, ref_frames = resident
    model = LiveAvatar.from_checkpoint(ckpt, device="cpu", dtype="fp32", weights="stream")
    got = frames(model)
    assert got.shape == ref_frames.shape and torch.equal(got, ref_frames)
    assert_streamed_from_host(model, ref_model)


def test_single_files_stream_too(ckpt, resident, tmp_path):
    """ComfyUI single files: the prefixed one-file DiT (as ComfyUI ships it) loads streamed."""
    from liveavatar.loading.safetensors_io import open_tensor_source

    ref_model, ref_frames = resident
    official = open_tensor_source(ckpt / OFFICIAL_FILES.dit_index)
    dit = tmp_path / "wan2.2_s2v_14B_bf16.safetensors"
    save_file({"model.diffusion_model." + k: official.get(k) for k in official.keys()}, str(dit))
    model = LiveAvatar.from_files(dit=dit, t5=ckpt / OFFICIAL_FILES.t5, vae=ckpt / OFFICIAL_FILES.vae,
                                  wav2vec=ckpt / OFFICIAL_FILES.wav2vec_dir, tokenizer_dir=ckpt / OFFICIAL_FILES.tokenizer_dir,
                                  lora=ckpt / OFFICIAL_FILES.lora, config=ckpt / OFFICIAL_FILES.config,
                                  device="cpu", dtype="fp32", weights="stream")
    assert torch.equal(frames(model), ref_frames)
    assert_streamed_from_host(model, ref_model)


def test_fp8_blocks_are_converted_then_packed_while_loading(ckpt):
    """fp8 while loading: a streamed block holds the e4m3 weights and scales of the resident load."""
    from liveavatar.loading.official import build_dit_from_source, find_official_checkpoint
    from liveavatar.models.fp8 import FP8Linear

    found = find_official_checkpoint(ckpt)
    kw = dict(lora_path=found.lora_path, fp8="tensor", fp8_allow_cpu=True)
    ref = build_dit_from_source(found.dit, found.config, "cpu", torch.bfloat16, **kw)
    dit = build_dit_from_source(found.dit, found.config, "cpu", torch.bfloat16, residency=LayerResidency(1, 0, 2), **kw)
    block = dit.blocks[1]
    assert isinstance(block.ffn[0], FP8Linear) and block.ffn[0].weight_fp8.dtype == torch.float8_e4m3fn
    assert block.ffn[0].weight_fp8.untyped_storage().data_ptr() == block._stream_flat.untyped_storage().data_ptr()
    want = ref.blocks[1].state_dict()
    got = block.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8)) for k in want)
    assert dit.layer_stream.host_bytes() in _packed_range(ref.blocks[1])


def test_bad_weights_mode_is_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match=r"weights: 'half' is not one of auto, resident, stream"):
        LiveAvatar.from_checkpoint(tmp_path / "absent", device="cpu", weights="half")


def test_cli_weights_option(tmp_path, capsys):
    from liveavatar.cli import main

    args = ["generate", "--image", "i.png", "--audio", "a.wav", "--prompt", "p", "--ckpt-dir", str(tmp_path),
            "--out", str(tmp_path / "o.mp4"), "--gpus", "cpu,cpu"]
    assert main(args + ["--weights", "stream"]) == 2
    assert "--weights stream: one device only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(args + ["--weights", "half"])
    assert exc.value.code == 2 and "invalid choice: 'half'" in capsys.readouterr().err


def test_bench_load_placement_plumbing(tmp_path, capsys):
    """bench/load_placement.py (the GPU proof of bounded loading) on the CPU: random sharded
    checkpoint written, placed (stream: half), loaded block by block with fp8, one JSON line."""
    import json

    from bench.load_placement import main

    assert main(["--tiny", "--device", "cpu", "--weights", "stream", "--fp8", "--dir", str(tmp_path)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["resident_layers"] == row["num_layers"] // 2 and row["fp8"] == "tensor"
    assert row["host_streamed_gib"] > 0 and row["load_estimate_gib"] > 0
