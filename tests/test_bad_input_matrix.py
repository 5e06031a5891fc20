"""The bad-input matrix (issue 17): one table, each case through the real CLI and, where the input
can arrive there, through the nodes in a real ComfyUI server (the session's, via /prompt).

CLI column: `python -m liveavatar generate` in a process of its own on the tiny checkpoint (forked
from one interpreter that imported the CLI, tests/cli_forks.py). A valid input
runs with `--check` (every input checked, nothing loaded) and prints `inputs ok: effective size WxH,
N frames ...`; rows marked `MP4` run for real and the mp4 is probed. An invalid input exits 2 with
exactly one `error:` line, last, holding the expected words (naming the option or file and the fix),
no traceback, no log line of a model load, and no output file.

ComfyUI column: a small graph per case (the tiny checkpoint's loader, cached across cases, and the
node the input reaches, read by a PreviewAny). Expected: refused at queue time (400, the node's
`node_errors`), an `execution_error` naming the node, or the node's text; the server keeps running
and a real job after the batch writes its mp4.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from cli_forks import run_cli_forked
from comfy_server import needs_server
from PIL import Image
from test_audio import _write as write_audio
from test_cli_e2e import REPO
from test_loading_errors import CASES as BROKEN_CHECKPOINTS

from liveavatar.loading.tiny import make_tiny_checkpoint
from liveavatar.media.video_writer import probe_video

pytestmark = pytest.mark.slow

MP4 = "mp4"  # a row whose CLI run writes a real video (1 block, 64x64)
SPACED = "dir with spaces ü"  # a folder with a space and non-ASCII letters
VOICE = "stimme 音声.wav"
FACE = "gesicht ü 顔.png"


@dataclass(frozen=True)
class Case:
    """args: options over the defaults (`{d}`: the media folder, `{c}`: the checkpoints folder).
    want: "ok: <regular expression found in the summary line>" or "error: <start of the error line>",
    where " ... " separates further words the error line holds after that start.
    comfy: (graph, {node id: {input: value}}, expected) or None where the input cannot arrive in a
    node; expected: ("queue" | "run", node id, words) or ("ok", node id, words of its text)."""

    args: tuple[str, ...]
    want: str
    comfy: tuple | None = None
    run: str | None = None


def _image(name: str, size: str = "704*384", mode: str = "area") -> dict:
    return {"1": {"image": name}, "13": {"size": size, "size_mode": mode}}


def _audio(name: str) -> dict:
    return {"2": {"audio": name}}


def _sampler(key: str, value) -> dict:
    return {"20": {key: value}}


def _loader(**inputs) -> dict:
    return {"10": inputs}


SIZE_RULE = "or any W*H whose sides are multiples of 64"
CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- valid but unusual
    "size 704x384 exact": Case(("--size", "704x384", "--size-mode", "exact"), "ok: effective size 704x384, 25 frames",
                               ("image", _image("face.png", "704x384", "exact"), ("ok", "13", "effective size 704x384"))),
    "8 kHz mono wav": Case(("--audio", "{d}/mono_8k.wav"), "ok: 25 frames",
                           ("audio", _audio("mono_8k.wav"), ("ok", "90", "25$"))),
    "48 kHz stereo wav": Case(("--audio", "{d}/stereo_48k.wav"), "ok: 25 frames",
                              ("audio", _audio("stereo_48k.wav"), ("ok", "90", "25$"))),
    "24-bit wav": Case(("--audio", "{d}/pcm24.wav"), "ok: 25 frames", ("audio", _audio("pcm24.wav"), ("ok", "90", "25$"))),
    "float wav": Case(("--audio", "{d}/float.wav"), "ok: 25 frames", ("audio", _audio("float.wav"), ("ok", "90", "25$"))),
    "flac": Case(("--audio", "{d}/speech.flac"), "ok: 25 frames", ("audio", _audio("speech.flac"), ("ok", "90", "25$"))),
    # lossy codecs add encoder priming / padding: 1.0 s decodes to 25 or 26 frames
    "ogg opus": Case(("--audio", "{d}/speech.ogg"), "ok: 2[56] frames",
                     ("audio", _audio("speech.ogg"), ("ok", "90", "2[56]$"))),
    "mp3": Case(("--audio", "{d}/speech.mp3"), "ok: 2[56] frames", ("audio", _audio("speech.mp3"), ("ok", "90", "2[56]$"))),
    "RGBA png": Case(("--image", "{d}/rgba.png"), "ok: effective size 320x192",
                     ("image", _image("rgba.png"), ("ok", "13", "effective size 320x192"))),
    "greyscale png": Case(("--image", "{d}/grey.png"), "ok: effective size 256x128",
                          ("image", _image("grey.png"), ("ok", "13", "effective size 256x128"))),
    "16-bit png": Case(("--image", "{d}/grey16.png"), "ok: effective size 256x128",
                       ("image", _image("grey16.png"), ("ok", "13", "effective size 256x128"))),
    # stored 320x192, EXIF orientation 6 (shown rotated): the portrait shape decides the size
    "EXIF-rotated jpeg": Case(("--image", "{d}/exif.jpg"), "ok: effective size 192x320",
                              ("image", _image("exif.jpg"), ("ok", "13", "effective size 192x320"))),
    "spaces and non-ASCII paths": Case(
        ("--image", f"{{d}}/{SPACED}/{FACE}", "--audio", f"{{d}}/{SPACED}/{VOICE}", "--size", "64*64",
         "--size-mode", "exact", "--out", f"{{d}}/{SPACED}/vidéo ü.mp4"), "ok: 9 frames", None, run=MP4),
    "EXIF jpeg + 48 kHz flac, one block": Case(
        ("--image", "{d}/exif.jpg", "--audio", "{d}/block_48k.flac", "--size", "64*64", "--size-mode", "exact",
         "--steps", "3", "--seed", str(2**53 - 1)), "ok: 9 frames", None, run=MP4),
    # ---------------------------------------------------------------- sizes
    "size 704*385": Case(("--size", "704*385"), "error: size: '704*385' is not supported (nearest valid: 704x384",
                         ("image", _image("face.png", "704*385"), ("queue", "13", "is not supported"))),
    "size 0*0": Case(("--size", "0*0"), "error: size: '0*0' has a zero side",
                     ("image", _image("face.png", "0*0"), ("queue", "13", "has a zero side"))),
    "size abc": Case(("--size", "abc"), "error: size: 'abc' is not a size; write it as W*H",
                     ("image", _image("face.png", "abc"), ("queue", "13", "is not a size"))),
    "size negative": Case(("--size=-704*384",), "error: size: '-704*384' is not a size",
                          ("image", _image("face.png", "-704*384"), ("queue", "13", "is not a size"))),
    "size absurdly large": Case(("--size", "100000*100000"), "error: size: '100000*100000' is not supported; valid sizes",
                                ("image", _image("face.png", "100000*100000"), ("queue", "13", SIZE_RULE))),
    "size too thin": Case(("--size", "64*14400"), "error: size: '64*14400' is not supported (nearest valid: 64x1280",
                          ("image", _image("face.png", "64*14400"), ("queue", "13", "nearest valid: 64x1280"))),
    "size 704-384": Case(("--size", "704-384"), "error: size: '704-384' is not a size",
                         ("image", _image("face.png", "704-384"), ("queue", "13", "is not a size"))),
    "size 700x384 exact": Case(("--size", "700x384", "--size-mode", "exact"),
                               "error: size: '700x384' is not supported (nearest valid: 704x384",
                               ("image", _image("face.png", "700x384", "exact"), ("queue", "13", "nearest valid: 704x384"))),
    "size 720*400 exact": Case(("--size", "720*400", "--size-mode", "exact"), "error: size: '720*400' cannot be produced exactly",
                               ("image", _image("face.png", "720*400", "exact"), ("run", "13", "multiples of 64"))),
    # ---------------------------------------------------------------- paths
    "image missing": Case(("--image", "{d}/nope.png"), "error: --image: no file at {d}/nope.png",
                          ("image", _image("nope.png"), ("queue", "1", "Invalid image file"))),
    "image is a folder": Case(("--image", "{d}"), "error: --image: {d} is a directory; name a file"),
    "image unreadable": Case(("--image", "{u}/locked.png", "--out", "{u}/video.mp4"), "error: --image: cannot read {u}/locked.png (Permission denied)"),
    "audio missing": Case(("--audio", "nope.wav"), "error: --audio: no file at nope.wav (= ",
                          ("audio", _audio("nope.wav"), ("queue", "2", "Invalid audio file"))),
    "audio is a folder": Case(("--audio", "{d}"), "error: --audio: {d} is a directory"),
    "pose video missing": Case(("--pose-video", "{d}/pose.mp4"), "error: --pose-video: no file at {d}/pose.mp4"),
    "out not .mp4": Case(("--out", "{d}/video.avi"), "error: --out: {d}/video.avi must end in .mp4"),
    "out is a folder": Case(("--out", "{d}/taken.mp4"), "error: --out: {d}/taken.mp4 is a directory"),
    "out not writable": Case(("--out", "/proc/video.mp4"), "error: --out: cannot write /proc/video.mp4"),
    # ---------------------------------------------------------------- audio
    "audio empty": Case(("--audio", "{d}/empty.wav"), "error: audio file {d}/empty.wav is empty (0 bytes)",
                        ("audio", _audio("empty.wav"), ("run", "2", ""))),
    "text file named .wav": Case(("--audio", "{d}/text.wav"), "error: cannot decode audio file {d}/text.wav",
                                 ("audio", _audio("text.wav"), ("run", "2", ""))),
    "audio shorter than one block": Case(("--audio", "{d}/short.wav"), "error: audio: 0.200 s (5 frames at 25 fps) "
                                         "is shorter than one block (9 frames, 0.36 s)",
                                         ("audio", _audio("short.wav"), ("run", "12", "shorter than one block"))),
    # ---------------------------------------------------------------- images
    "image 1x1": Case(("--image", "{d}/one.png"), "error: image: 1x1 is too small",
                      ("image", _image("one.png"), ("run", "13", "input 'image': image: 1x1 is too small"))),
    # ComfyUI's Load Image reads cut-short files (Pillow's LOAD_TRUNCATED_IMAGES): the rest is black
    "image corrupt": Case(("--image", "{d}/corrupt.png"), "error: image: {d}/corrupt.png could not be decoded",
                          ("image", _image("corrupt.png"), ("ok", "13", "effective size 192x128"))),
    "image huge": Case(("--image", "{d}/huge.png"), "error: image: {d}/huge.png is too large to decode",
                       ("image", _image("huge.png"), ("run", "1", "decompression bomb"))),
    # ---------------------------------------------------------------- checkpoints
    **{f"checkpoint: {name}": Case(("--ckpt-dir", f"{{c}}/{slug}"), f"error: {{c}}/{slug}/ ... {words}",
                                   ("image", _loader(checkpoint=slug), ("run", "10", words)))
       for name, slug, words in (("truncated shard", "truncated", "truncated"),
                                 ("DiT file holding wav2vec2", "wav2vec_as_dit", "holds no DiT tensors"),
                                 ("T2V DiT", "t2v", "without the S2V audio modules"),
                                 ("config.json not JSON", "garbage_config", "not valid JSON"),
                                 ("LoRA for another model", "other_lora", "Is this a LoRA for this model?"))},
    "checkpoint folder missing": Case(("--ckpt-dir", "{c}/absent"), "error: {c}/absent: checkpoint folder not found",
                                      ("image", _loader(checkpoint="absent"), ("queue", "10", "is not in models/liveavatar"))),
    "LoRA missing": Case(("--lora", "{d}/nope.safetensors"), "error: --lora: no file at {d}/nope.safetensors",
                         ("image", _loader(lora="nope.safetensors"), ("queue", "10", "'lora'"))),
    # ---------------------------------------------------------------- numbers
    "steps 9": Case(("--steps", "9"), "error: argument --steps: invalid choice: 9",
                    ("sampler", _sampler("steps", 9), ("queue", "20", "steps"))),
    "steps 0": Case(("--steps", "0"), "error: argument --steps: invalid choice: 0",
                    ("sampler", _sampler("steps", 0), ("queue", "20", "steps"))),
    "num_clip 0": Case(("--num-clip", "0"), "error: --num-clip: must be >= 1"),
    "num_clip negative": Case(("--num-clip", "-3"), "error: --num-clip: must be >= 1",
                              ("sampler", _sampler("num_clip", -3), ("queue", "20", "num_clip"))),
    "seed negative": Case(("--seed", "-1"), "error: argument --seed: -1 is outside 0 .. 9007199254740991",
                          ("sampler", _sampler("seed", -1), ("queue", "20", "seed"))),
    "seed too large": Case(("--seed", str(2**64)), f"error: argument --seed: {2**64} is outside 0 .. 9007199254740991",
                           ("sampler", _sampler("seed", 2**64), ("queue", "20", "seed"))),
    "seed not a number": Case(("--seed", "abc"), "error: argument --seed: 'abc' is not an integer"),
    "lora strength nan": Case(("--lora-strength", "nan"), "error: argument --lora-strength: 'nan' is not a finite number",
                              ("image", _loader(lora_strength=float("nan")), ("run", "10", "'lora_strength': nan is not a finite"))),
    "lora strength inf": Case(("--lora-strength", "inf"), "error: argument --lora-strength: 'inf' is not a finite number",
                              ("image", _loader(lora_strength=float("inf")), ("queue", "10", "lora_strength"))),
    "lora strength -inf": Case(("--lora-strength=-inf",), "error: argument --lora-strength: '-inf' is not a finite number"),
    "lora strength out of range": Case(("--lora-strength", "5"), "error: argument --lora-strength: '5' is outside 0.0 .. 2.0",
                                       ("image", _loader(lora_strength=5.0), ("queue", "10", "lora_strength"))),
    "lora strength negative": Case(("--lora-strength=-1",), "error: argument --lora-strength: '-1' is outside 0.0 .. 2.0"),
    "lora strength abc": Case(("--lora-strength", "abc"), "error: argument --lora-strength: 'abc' is not a finite number"),
    # ---------------------------------------------------------------- options, backends, devices
    "unknown option": Case(("--frobnicate",), "error: unrecognized arguments: --frobnicate"),
    # a V3 combo is not checked against its options at queue time: the loader refuses it when it runs
    "attention efficient": Case(("--attn", "efficient"), "error: argument --attn: invalid choice: 'efficient'",
                                ("image", _loader(attention="efficient"), ("run", "10", "input 'attention': 'efficient' is not one of"))),
    "attention unknown": Case(("--attn", "xformers"), "error: argument --attn: invalid choice: 'xformers'",
                              ("image", _loader(attention="xformers"), ("run", "10", "input 'attention': 'xformers' is not one of"))),
    "dtype unknown": Case(("--dtype", "fp64"), "error: argument --dtype: invalid choice: 'fp64'",
                          ("image", _loader(precision="fp64"), ("run", "10", "input 'precision': 'fp64' is not one of"))),
    "kv offload unknown": Case(("--kv-offload", "maybe"), "error: argument --kv-offload: invalid choice: 'maybe'"),
    "kv dtype unknown": Case(("--kv-dtype", "fp16"), "error: argument --kv-dtype: invalid choice: 'fp16'"),
    "fp8 mode unknown": Case(("--fp8", "maybe"), "error: argument --fp8: invalid choice: 'maybe'"),
    "fp8 on the CPU": Case(("--fp8",), "error: fp8"),
    "device unknown": Case(("--device", "tpu"), "error: device: 'tpu' is not a device; use cpu, cuda, cuda:N or auto",
                           ("image", _loader(devices="tpu"), ("queue", "10", "'devices'"))),
    "device cuda without GPU": Case(("--device", "cuda:7"), "error: device: 'cuda' was asked for but no CUDA GPU is visible"),
    "gpus that do not exist": Case(("--gpus", "0,1"), "error: --gpus: cuda:0 does not exist; visible GPUs: none",
                                   ("image", _loader(devices="0,1", gpu_mode="tpp"), ("queue", "10", "does not exist"))),
    "gpus tpp without CUDA": Case(("--gpus", "0,1", "--gpu-mode", "tpp"), "error: --gpus: cuda:0 does not exist"),
    "gpus not a list": Case(("--gpus", "0,x"), "error: --gpus: 'x' is not a device",
                            ("image", _loader(devices="0,x"), ("queue", "10", "'x' is not a device"))),
    "gpus mixed with cpu": Case(("--gpus", "cpu,0"), "error: --gpus: 'cpu,0' mixes 'cpu' with GPUs"),
    "gpu mode tpp without gpus": Case(("--gpu-mode", "tpp"), "error: --gpu-mode tpp: needs --gpus"),
}


# --------------------------------------------------------------------------- media


def _speech(seconds: float, rate: int, channels: int) -> np.ndarray:
    """A 220 Hz tone with a syllable-rate envelope, float32 [channels, T]."""
    t = np.arange(int(round(seconds * rate))) / rate
    mono = (0.3 * np.sin(2 * math.pi * 220 * t) * (1 - np.cos(2 * math.pi * 4 * t)) / 2).astype(np.float32)
    return np.repeat(mono[None], channels, axis=0)


def _huge_png_header(src: Path, dest: Path, side: int = 30000) -> None:
    """A PNG whose header claims side x side pixels (the data is a small image's)."""
    import struct
    import zlib

    data = bytearray(src.read_bytes())
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    dest.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    """Every file of the table: images, audio, broken checkpoints (folder `ckpts`), the tiny one."""
    d = tmp_path_factory.mktemp("matrix")
    face = Image.new("RGB", (160, 96), (200, 150, 120))
    face.paste((40, 40, 40), (60, 30, 100, 60))
    face.save(d / "face.png")
    write_audio(d / "speech.wav", _speech(1.0, 16000, 1), 16000, "pcm_s16le")
    write_audio(d / "mono_8k.wav", _speech(1.0, 8000, 1), 8000, "pcm_s16le")
    write_audio(d / "stereo_48k.wav", _speech(1.0, 48000, 2), 48000, "pcm_s16le")
    write_audio(d / "pcm24.wav", _speech(1.0, 44100, 2), 44100, "pcm_s24le")
    write_audio(d / "float.wav", _speech(1.0, 22050, 1), 22050, "pcm_f32le")
    write_audio(d / "speech.flac", _speech(1.0, 48000, 2), 48000, "flac")
    write_audio(d / "block_48k.flac", _speech(0.38, 48000, 2), 48000, "flac")
    write_audio(d / "speech.ogg", _speech(1.0, 48000, 2), 48000, "libopus", "ogg")
    write_audio(d / "speech.mp3", _speech(1.0, 44100, 2), 44100, "libmp3lame")
    write_audio(d / "short.wav", _speech(0.2, 16000, 1), 16000, "pcm_s16le")
    (d / "empty.wav").write_bytes(b"")
    (d / "text.wav").write_text("this is a text file, not audio\n")
    Image.new("RGBA", (320, 192), (200, 150, 120, 128)).save(d / "rgba.png")
    Image.new("L", (200, 100), 120).save(d / "grey.png")
    Image.fromarray((np.arange(256 * 128, dtype=np.uint16).reshape(128, 256) * 2)).save(d / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.new("RGB", (320, 192), (180, 140, 110)).save(d / "exif.jpg", exif=exif.tobytes())
    Image.new("RGB", (1, 1), (200, 150, 120)).save(d / "one.png")
    (d / "corrupt.png").write_bytes((d / "face.png").read_bytes()[:60])
    _huge_png_header(d / "face.png", d / "huge.png")
    (d / "taken.mp4").mkdir()
    (d / SPACED).mkdir()
    shutil.copy(d / "face.png", d / SPACED / FACE)
    write_audio(d / SPACED / VOICE, _speech(0.38, 8000, 1), 8000, "pcm_s16le")
    # checkpoints: the tiny one and broken copies (test_loading_errors' makers)
    c = d / "ckpts"
    tiny = make_tiny_checkpoint(c / "tiny", seed=3)
    for name, slug in (("truncated shard", "truncated"), ("DiT file holding wav2vec2", "wav2vec_as_dit"),
                       ("T2V DiT", "t2v"), ("config.json not JSON", "garbage_config"),
                       ("LoRA for another model", "other_lora")):
        BROKEN_CHECKPOINTS[name][0](shutil.copytree(tiny, c / slug))
    # unreadable: chmod 000 (root reads anything: the CLI then runs without the DAC capabilities, see `_cli`)
    u = Path(tempfile.mkdtemp(prefix="matrix_locked_"))
    u.chmod(0o755)
    shutil.copy(d / "face.png", u / "locked.png")
    (u / "locked.png").chmod(0)
    yield {"dir": d, "ckpts": c, "tiny": tiny, "locked": u}
    shutil.rmtree(u, ignore_errors=True)


# --------------------------------------------------------------------------- CLI column


def _cli_argv(media: dict, case: Case, out: Path) -> list[str]:
    """The case's `python -m liveavatar generate` arguments; `--check` unless it runs."""
    d, c, u = media["dir"], media["ckpts"], media["locked"]
    args = {"--image": str(d / "face.png"), "--audio": str(d / "speech.wav"), "--prompt": "a person talking",
            "--ckpt-dir": str(media["tiny"]), "--device": "cpu", "--dtype": "fp32", "--out": str(out)}
    extra = [a.format(d=d, c=c, u=u) for a in case.args]
    for i, a in enumerate(extra):  # an option of the case replaces the default
        if a in args and i + 1 < len(extra):
            args[a] = extra[i + 1]
    flat = [x for kv in args.items() for x in kv]
    rest = [a for i, a in enumerate(extra) if a not in args and (i == 0 or extra[i - 1] not in args)]
    return ["generate", *flat, *rest] + ([] if case.run == MP4 or case.want.startswith("error") else ["--check"])


def _unprivileged(case: Case) -> bool:
    """Root reads a mode-000 file through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: such a case runs as
    root without them (still the owner of the repository and of pytest's 0700 tmp folders, where a
    switch to `nobody` could not even import the package)."""
    return "{u}" in "".join(case.args) and os.geteuid() == 0


def _cli_without_dac(argv: list[str]) -> subprocess.CompletedProcess:
    drop = "-dac_override,-dac_read_search"
    return subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable,
                           "-m", "liveavatar", *argv], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), **NO_GPU})


NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def _selected(request, test: str) -> list[str]:
    """The case names of `test` that this session runs (all of them unless -k chose some)."""
    return [item.callspec.params["name"] for item in request.session.items
            if getattr(item, "originalname", "") == test and item.module.__name__ == __name__]


@pytest.fixture(scope="module")
def cli_results(request, media, tmp_path_factory) -> dict:
    """The selected cases' CLI runs, two at a time, each a process of its own: forked from one
    interpreter that imported the CLI (tests/cli_forks.py), or, for the unreadable-file cases as
    root, a fresh interpreter without the DAC capabilities."""
    names = _selected(request, "test_cli")
    outs = {name: media["dir"] / "out" / f"case{i}.mp4" for i, name in enumerate(CASES)}
    for name, case in CASES.items():
        if "--out" in case.args:
            outs[name] = Path(case.args[case.args.index("--out") + 1].format(d=media["dir"], u=media["locked"]))
    argvs = {name: _cli_argv(media, CASES[name], outs[name]) for name in names}
    forked = [name for name in names if not _unprivileged(CASES[name])]
    done = run_cli_forked([{"argv": argvs[name], "env": NO_GPU} for name in forked], 2,
                          tmp_path_factory.mktemp("cli_forks"))
    results = dict(zip(forked, done))
    results.update({name: _cli_without_dac(argvs[name]) for name in names if name not in results})
    return {name: (results[name], outs[name]) for name in names}


@pytest.mark.parametrize("name", list(CASES))
def test_cli(cli_results, media, name):
    import re

    case = CASES[name]
    res, out = cli_results[name]
    err = res.stderr.strip().splitlines()
    want = case.want.format(d=media["dir"], c=media["ckpts"], u=media["locked"])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    if want.startswith("error: "):
        assert res.returncode == 2, res.stderr[-3000:]
        errors = [ln for ln in err if "error:" in ln]
        assert len(errors) == 1 and errors[0] == err[-1], err
        line = err[-1].split("generate: ", 1)[-1].split("liveavatar: ", 1)[-1]  # argparse's prefix
        start, *more = want.split(" ... ")
        assert line.startswith(start) and all(w in line for w in more), f"{line!r} is not {want!r}"
        # nothing loaded: at most the effective size, logged when the size is resolved at the edge
        assert all(ln.startswith(("error: ", "usage:", " ", "python -m liveavatar", "INFO liveavatar: effective size"))
                   for ln in err), err
        assert not out.exists() or out.is_dir()
        return
    assert res.returncode == 0, res.stderr[-3000:]
    if case.run == MP4:
        info = probe_video(out, decode=True)
        frames = int(re.search(r"(\d+) frames", want).group(1))
        assert (info["width"], info["height"], info["frames"]) == (64, 64, frames) and not info["truncated"]
        assert info["audio_duration_s"] == pytest.approx(frames / 25, abs=1 / 25)
        return
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith("inputs ok: ") and re.search(want[len("ok: "):], line), line
    assert not out.exists()


# --------------------------------------------------------------------------- ComfyUI column


def _graph(kind: str) -> dict:
    """The smallest prompt that runs the node a case's input reaches, its value read by PreviewAny."""
    from test_comfyui_integration import _api

    full = _api("liveavatar_tiny_cpu")
    loader = {"10": full["10"]}
    if kind == "sampler":
        return full
    if kind == "audio":
        return {**loader, "2": full["2"], "12": full["12"],
                "90": {"class_type": "PreviewAny", "inputs": {"source": ["12", 1]}}}
    return {**loader, "1": full["1"], "13": full["13"],
            "90": {"class_type": "PreviewAny", "inputs": {"source": ["13", 1]}}}


def _prompt(kind: str, changes: dict) -> dict:
    prompt = json.loads(json.dumps(_graph(kind)))
    for node_id, inputs in changes.items():
        prompt[node_id]["inputs"].update(inputs)
    return prompt


def _comfy_case(srv, client: str, comfy: tuple) -> tuple[str, str, str]:
    """-> (outcome "queue" / "run" / "ok", node id, text): what the server reports for one case."""
    kind, changes, _ = comfy
    status, body = srv.post("/prompt", {"prompt": _prompt(kind, changes), "client_id": client})
    if status != 200:
        errors = body.get("node_errors") or {}
        node = next(iter(errors), "")
        return "queue", node, json.dumps(errors.get(node, body))
    hist = srv.wait_history(body["prompt_id"])
    if hist["status"]["status_str"] == "error":
        err = dict(hist["status"]["messages"]).get("execution_error", {})
        return "run", str(err.get("node_id")), f"{err.get('exception_type')}: {err.get('exception_message')}"
    outputs = hist.get("outputs", {})
    return "ok", "", json.dumps({k: v.get("text") for k, v in outputs.items()})


COMFY = {name: case for name, case in CASES.items() if case.comfy}


@pytest.fixture(scope="module")
def comfy_results(request, comfyui_server, media) -> Iterator[dict]:
    """Every ComfyUI case on the session's server, one prompt each; then a real job on unusual inputs."""
    srv = comfyui_server
    d = media["dir"]
    added = []  # removed again afterwards: the session server is shared with the other ComfyUI tests
    for f in d.iterdir():
        if f.is_file() and not (srv.base / "input" / f.name).exists():
            added.append(srv.base / "input" / f.name)
            shutil.copy(f, added[-1])
    for name in (VOICE, FACE):
        if not (srv.base / "input" / name).exists():
            added.append(srv.base / "input" / name)
        shutil.copy(d / SPACED / name, srv.base / "input" / name)
    for slug in ("truncated", "wav2vec_as_dit", "t2v", "garbage_config", "other_lora"):
        dest = srv.base / "models" / "liveavatar" / slug
        if not dest.exists():
            added.append(dest)
            shutil.copytree(media["ckpts"] / slug, dest)
    client = str(uuid.uuid4())
    results = {}
    for name in _selected(request, "test_comfyui"):
        results[name] = _comfy_case(srv, client, COMFY[name].comfy)
        results[name] += (srv.proc.poll() is None,)
    # then a real job: the shipped tiny workflow on an RGBA image and a 48 kHz FLAC, non-ASCII names
    from test_comfyui_integration import _api

    prompt = _api("liveavatar_tiny_cpu")
    shutil.copy(d / "rgba.png", srv.base / "input" / FACE)
    prompt["1"]["inputs"]["image"] = FACE
    prompt["2"]["inputs"]["audio"] = "block_48k.flac"
    prompt["20"]["inputs"]["seed"] = 17
    hist = srv.wait_history(srv.queue(prompt, client))
    results["_after"] = hist
    yield results
    for path in added:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


@pytest.mark.comfyui
@needs_server()
@pytest.mark.parametrize("name", list(COMFY))
def test_comfyui(comfy_results, name):
    import re

    got = comfy_results
    outcome, node, text, alive = got[name]
    want_outcome, want_node, words = CASES[name].comfy[2]
    assert alive, "the server died"
    assert outcome == want_outcome, (outcome, node, text)
    if want_outcome != "ok":
        assert node == want_node and words in text, (node, text)
    else:
        shown = json.loads(text)[want_node]
        assert shown and re.search(words, shown[0]), shown


@pytest.mark.comfyui
@needs_server()
def test_comfyui_serves_a_real_job_after_the_matrix(comfy_results, comfyui_server):
    from test_comfyui_integration import _ok, _saved_file

    hist = comfy_results["_after"]
    _ok(hist)
    info = probe_video(_saved_file(comfyui_server, hist, "22"), decode=True)
    assert (info["width"], info["height"], info["frames"]) == (64, 64, 9)
