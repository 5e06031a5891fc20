"""Security: no loader unpickles code, the worker control channel is loopback-only, and no shell
command is built anywhere (a scan of the sources)."""

from __future__ import annotations

import ast
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liveavatar.loading.official import find_official_checkpoint, load_components, load_components_from_files
from liveavatar.loading.safetensors_io import CheckpointError, load_pth_state_dict, open_tensor_source
from liveavatar.loading.tiny import make_tiny_checkpoint
from liveavatar.models.text_encoder import load_official_t5_file
from liveavatar.models.vae import load_official_vae_file
from liveavatar.models.wav2vec import AudioFeatureExtractor, Wav2VecLoadError

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this writes the marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _evil(path: Path, marker: Path, legacy: bool = False) -> Path:
    obj = {"weight": torch.zeros(2), "payload": Payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("sec") / "ckpt", seed=1)


def test_the_payload_is_live(tmp_path):
    """Control: unpickled without weights_only, the file writes its marker (so the tests below mean something)."""
    marker = tmp_path / "marker"
    evil = _evil(tmp_path / "evil.pth", marker)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
                   check=False, capture_output=True, cwd=tmp_path)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pth_through_every_pth_loader(tiny, tmp_path, legacy):
    marker = tmp_path / "marker"
    evil = _evil(tmp_path / "evil.pth", marker, legacy)

    def refused(named: str, call, *args, **kwargs):
        with pytest.raises((CheckpointError, Wav2VecLoadError)) as err:
            call(*args, **kwargs)
        msg = str(err.value)
        assert named in msg and "not a weights-only checkpoint" in msg and "refusing to unpickle" in msg

    refused("evil.pth", load_pth_state_dict, evil)
    refused("evil.pth", open_tensor_source, evil)
    refused("evil.pth", load_official_vae_file, evil)
    refused("evil.pth", load_official_t5_file, evil)
    w2v = shutil.copytree(tiny / "wav2vec2-large-xlsr-53-english", tmp_path / "w2v")
    (w2v / "model.safetensors").unlink()
    shutil.copy(evil, w2v / "pytorch_model.bin")
    refused("pytorch_model.bin", AudioFeatureExtractor.from_pretrained, w2v)
    for part in ("dit", "t5", "vae"):  # ComfyUI single files (a .pth is accepted for each)
        files = {"dit": tiny / "diffusion_pytorch_model.safetensors.index.json",
                 "t5": tiny / "models_t5_umt5-xxl-enc-bf16.pth", "vae": tiny / "Wan2.1_VAE.pth",
                 "wav2vec": tiny / "wav2vec2-large-xlsr-53-english", "config": tiny / "config.json",
                 "tokenizer_dir": tiny / "google" / "umt5-xxl", part: evil}
        refused("evil.pth", load_components_from_files, **files)
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):  # the official folder
        ckpt = shutil.copytree(tiny, tmp_path / f"ckpt-{name}")
        shutil.copy(evil, ckpt / name)
        refused(str(ckpt / name), lambda c: load_components(find_official_checkpoint(c), "cpu", torch.float32), ckpt)
    assert not marker.exists()


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


def test_worker_control_channel_listens_on_loopback_only():
    from parallel.channel import ControlListener
    from parallel.group import GroupConfig

    lis = ControlListener(*GroupConfig.__dataclass_fields__["listen"].default)  # what every group binds
    try:
        host, port = lis.address
        assert host == "127.0.0.1"
        other = _non_loopback_address()
        if other is None:
            pytest.skip("this machine has no non-loopback IPv4 address to try")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((other, port), timeout=5).close()
    finally:
        lis.close()


_SHELLS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"), ("os", "spawnl")}
_SUBPROCESS = {"run", "call", "check_call", "check_output", "Popen", "popen", "getoutput", "getstatusoutput"}


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if (owner, name) in _SHELLS or name in ("getoutput", "getstatusoutput"):
            out.append(f"{where}: {owner}.{name} runs a shell")
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                out.append(f"{where}: shell={ast.unparse(kw.value)}")
        if name in _SUBPROCESS and node.args and isinstance(node.args[0], (ast.JoinedStr, ast.BinOp)) \
                or name in _SUBPROCESS and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            out.append(f"{where}: {name} given one command string (use an argument list)")
    return out


def test_no_shell_command_is_built_from_strings():
    files = [p for p in REPO.rglob("*.py") if ".venv" not in p.parts and ".cache" not in p.parts
             and "tests" not in p.parts and "third_party" not in p.parts]  # third_party: a local reference copy (bench), not ours
    assert len(files) > 40
    findings = [f for p in files for f in _findings(p)]
    assert findings == []
    # the scanner does see the patterns it forbids
    probe = REPO / "tests" / "_shell_probe.py"
    try:
        probe.write_text("import os, subprocess\nos.system('ls ' + x)\nsubprocess.run(f'ls {x}', shell=True)\n")
        assert len(_findings(probe)) == 3
    finally:
        probe.unlink()
