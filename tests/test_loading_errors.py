"""Broken checkpoints: each is one `CheckpointError` naming the file and what is wrong, raised from
headers and JSON only (`find_official_checkpoint`, which the CLI calls before loading anything); the
real CLI's one `error:` line for them is in `test_bad_input_matrix.py`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from liveavatar.loading.official import find_official_checkpoint, load_components_from_files
from liveavatar.loading.safetensors_io import CheckpointError
from liveavatar.loading.tiny import make_tiny_checkpoint

SHARD1 = "diffusion_pytorch_model-00001-of-00002.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=3)


def _truncated(c: Path) -> str:
    p = c / SHARD1
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return SHARD1


def _holds_wav2vec(c: Path) -> str:
    for p in c.glob("diffusion_pytorch_model*"):
        p.unlink()
    shutil.copy(c / "wav2vec2-large-xlsr-53-english" / "model.safetensors", c / "diffusion_pytorch_model.safetensors")
    return "diffusion_pytorch_model.safetensors"


def _config_not_json(c: Path) -> str:
    (c / "config.json").write_text('{"dim": 64,, garbage')
    return "config.json"


def _config_a_list(c: Path) -> str:
    (c / "config.json").write_text("[1, 2]")
    return "config.json"


def _config_wrong_type(c: Path) -> str:
    cfg = json.loads((c / "config.json").read_text())
    (c / "config.json").write_text(json.dumps({**cfg, "dim": "abc"}))
    return "config.json"


def _weights_of_another_size(c: Path) -> str:
    cfg = json.loads((c / "config.json").read_text())
    (c / "config.json").write_text(json.dumps({**cfg, "dim": cfg["dim"] * 2}))
    return SHARD1


def _lora_for_another_model(c: Path) -> str:
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)},
              str(c / "liveavatar.safetensors"))
    return "liveavatar.safetensors"


def _lora_of_another_size(c: Path) -> str:
    sd = load_file(str(c / "liveavatar.safetensors"))
    save_file({k: torch.zeros(v.shape[0] + 1, v.shape[1] + 3) for k, v in sd.items()}, str(c / "liveavatar.safetensors"))
    return "liveavatar.safetensors"


def _t2v_dit(c: Path) -> str:
    """A Wan DiT without the S2V audio modules, as one file."""
    idx = json.loads((c / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    sd = {}
    for shard in set(idx.values()):
        sd.update(load_file(str(c / shard)))
        (c / shard).unlink()
    (c / "diffusion_pytorch_model.safetensors.index.json").unlink()
    save_file({k: v for k, v in sd.items() if not k.startswith(("casual_audio_encoder.", "audio_injector."))},
              str(c / "diffusion_pytorch_model.safetensors"))
    return "diffusion_pytorch_model.safetensors"


CASES = {
    "truncated shard": (_truncated, "truncated"),
    "DiT file holding wav2vec2": (_holds_wav2vec, "holds no DiT tensors, it holds wav2vec2"),
    "config.json not JSON": (_config_not_json, "not valid JSON"),
    "config.json a list": (_config_a_list, "expected a JSON object"),
    "config.json wrong type": (_config_wrong_type, "dim = 'abc' (expected an integer)"),
    "weights of another size": (_weights_of_another_size, "shape mismatch"),
    "LoRA for another model": (_lora_for_another_model, "Is this a LoRA for this model?"),
    "LoRA of another size": (_lora_of_another_size, "LoRA matrices do not fit"),
    "T2V DiT": (_t2v_dit, "without the S2V audio modules"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_checkpoint_is_one_error_naming_the_file(tiny, tmp_path, case):
    make, words = CASES[case]
    ckpt = shutil.copytree(tiny, tmp_path / "ckpt")
    name = make(ckpt)
    with pytest.raises(CheckpointError) as err:
        find_official_checkpoint(ckpt)
    msg = str(err.value)
    assert str(ckpt / name) in msg and words in msg and "\n" not in msg


def test_single_file_dit_is_checked_before_the_encoders(tiny, tmp_path):
    """ComfyUI single files: the DiT (and its LoRA) are checked before umT5 / VAE / wav2vec2 are opened
    (here they do not exist: the error is about the DiT all the same)."""
    dit = tmp_path / "dit.safetensors"
    shutil.copy(tiny / "wav2vec2-large-xlsr-53-english" / "model.safetensors", dit)
    gone = tmp_path / "missing"
    with pytest.raises(CheckpointError, match="expected dit weights, found layout 'hf_wav2vec2'"):
        load_components_from_files(dit=dit, t5=gone, vae=gone, wav2vec=gone)
    sd = {}
    for shard in tiny.glob("diffusion_pytorch_model-*.safetensors"):
        sd.update(load_file(str(shard)))
    save_file(sd, str(dit))
    _lora_for_another_model(tmp_path)
    with pytest.raises(CheckpointError, match="Is this a LoRA for this model") as err:
        load_components_from_files(dit=dit, t5=gone, vae=gone, wav2vec=gone, config=tiny / "config.json",
                                   lora=tmp_path / "liveavatar.safetensors")
    assert str(tmp_path / "liveavatar.safetensors") in str(err.value)


# Through the CLI (one `error:` line, exit 2, no mp4): tests/test_bad_input_matrix.py
