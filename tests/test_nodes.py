"""Node execute paths on the tiny checkpoint on CPU, inside ComfyUI's real modules (COMFYUI_DIR).

Each node's `execute` is called as ComfyUI calls it (V3 classmethods), with native values built the
way ComfyUI's own nodes build them (IMAGE [B, H, W, C] float, AUDIO {"waveform", "sample_rate"}).
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from test_nodes_support import (TINY_NAME, import_comfy, load_pack, make_tiny, needs_comfy, pack_submodule,
                                speech_like)

pytestmark = [needs_comfy(), pytest.mark.comfyui]

SECONDS = 0.44  # 11 frames at 25 fps -> 2 blocks (9 + 2 frames after the 3 lead-in frames)


def run(node, **inputs):
    """Call a node's execute as ComfyUI's executor does (under torch.inference_mode)."""
    with torch.inference_mode():
        return node.execute(**inputs)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder_paths, mm = import_comfy()
    root = tmp_path_factory.mktemp("models")
    make_tiny(root / "liveavatar" / TINY_NAME)
    out = tmp_path_factory.mktemp("output")
    folder_paths.set_output_directory(str(out))
    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("temp")))  # the Sampler's streamed mp4
    pack = load_pack()
    ext = asyncio.run(pack.comfy_entrypoint())
    nodes = {n.GET_SCHEMA().node_id: n for n in asyncio.run(ext.get_node_list())}
    folder_paths.add_model_folder_path("liveavatar", str(root / "liveavatar"), is_default=True)
    yield {"fp": folder_paths, "mm": mm, "nodes": nodes, "out": out, "root": root}
    pack_submodule("nodes.handle").close_all()


@pytest.fixture(scope="module")
def model(env):
    loader = env["nodes"]["LiveAvatarModelLoader"]
    out = run(loader, checkpoint=TINY_NAME, lora="auto", lora_strength=1.0, precision="fp32",
                         attention="sdpa", devices="cpu", gpu_mode="single", compile=False)
    return out.args[0]


@pytest.fixture(scope="module")
def conditioning(env, model):
    n = env["nodes"]
    text = run(n["LiveAvatarTextEncode"], model=model, prompt="a person talking").args[0]
    audio = {"waveform": speech_like(SECONDS, 22050, 2).unsqueeze(0), "sample_rate": 22050}
    aud_out = run(n["LiveAvatarAudioEncode"], model=model, audio=audio)
    image = torch.rand(2, 120, 160, 3)
    ref_out = run(n["LiveAvatarReferenceImage"], model=model, image=image, size="64x64", size_mode="exact")
    return {"text": text, "audio": aud_out, "ref": ref_out}


class Recorder:
    """Stands in for ComfyUI's progress hook (main.py's hook also raises on interrupt)."""

    def __init__(self, mm, interrupt_at: int | None = None):
        self.calls: list[tuple[int, int, object]] = []
        self.mm = mm
        self.interrupt_at = interrupt_at

    def __call__(self, value, total, preview, node_id=None):
        self.calls.append((value, total, preview))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            self.mm.interrupt_current_processing(True)


@pytest.fixture
def hook(env, monkeypatch):
    import comfy.utils

    def install(interrupt_at=None):
        rec = Recorder(env["mm"], interrupt_at)
        monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", rec)
        return rec

    yield install
    env["mm"].interrupt_current_processing(False)


def test_entrypoint_registers_all_nodes(env):
    assert sorted(env["nodes"]) == sorted([
        "LiveAvatarModelLoader", "LiveAvatarModelLoaderFiles", "LiveAvatarTextEncode", "LiveAvatarAudioEncode",
        "LiveAvatarReferenceImage", "LiveAvatarSampler", "LiveAvatarSaveMP4"])
    schema = env["nodes"]["LiveAvatarModelLoader"].GET_SCHEMA()
    checkpoint = next(i for i in schema.inputs if i.id == "checkpoint")
    assert TINY_NAME in checkpoint.options


def test_loader_reuses_the_live_model(env, model):
    loader = env["nodes"]["LiveAvatarModelLoader"]
    again = run(loader, checkpoint=TINY_NAME, lora="auto", lora_strength=1.0, precision="fp32",
                           attention="sdpa", devices="cpu", gpu_mode="single", compile=False).args[0]
    assert again is model and not model.closed
    assert model.mode == "single" and model.spec.lora and model.spec.lora.endswith("liveavatar.safetensors")


def test_loader_errors_name_the_input(env):
    loader = env["nodes"]["LiveAvatarModelLoader"]
    errors = pack_submodule("nodes.errors")
    with pytest.raises(errors.LiveAvatarInputError, match="'checkpoint'"):
        run(loader, checkpoint="missing-folder", lora="auto", lora_strength=1.0, precision="fp32",
                       attention="sdpa", devices="cpu", gpu_mode="single", compile=False)
    for strength in (float("nan"), float("inf")):  # nan passes ComfyUI's min/max check
        with pytest.raises(errors.LiveAvatarInputError, match="'lora_strength'.*finite"):
            run(loader, checkpoint=TINY_NAME, lora="auto", lora_strength=strength, precision="fp32",
                attention="sdpa", devices="cpu", gpu_mode="single", compile=False)
    msg = loader.validate_inputs(devices="cpu", gpu_mode="tpp")
    assert isinstance(msg, str) and "gpu_mode" in msg
    msg = loader.validate_inputs(devices="7", gpu_mode="single")
    assert isinstance(msg, str) and "'devices'" in msg and "cuda:7" in msg
    assert loader.validate_inputs(devices="cpu", gpu_mode="auto") is True

def test_checkpoint_combo_lists_only_checkpoints(env, tmp_path):
    """The combo offers folders holding config.json + DiT weights, not a checkpoint's own sub-folders
    (its wav2vec2 folder has a config.json too); such a sub-folder is refused by name."""
    mf = pack_submodule("nodes.model_files")
    loader = env["nodes"]["LiveAvatarModelLoader"]
    wav2vec = f"{TINY_NAME}/wav2vec2-large-xlsr-53-english"
    assert (env["root"] / "liveavatar" / wav2vec / "config.json").is_file()
    extra = tmp_path / "more"
    nested = extra / "vendor" / "copy"  # two levels deep: still found
    nested.mkdir(parents=True)
    (nested / "config.json").write_text("{}")
    (nested / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (extra / "notes").mkdir()
    (extra / "notes" / "config.json").write_text("{}")  # config.json without DiT weights: not listed
    paths = env["fp"].folder_names_and_paths["liveavatar"][0]
    paths.append(str(extra))
    try:
        assert mf.checkpoint_folders() == [TINY_NAME, "vendor/copy"]
        checkpoint = next(i for i in loader.GET_SCHEMA().inputs if i.id == "checkpoint")
        assert checkpoint.options == [TINY_NAME, "vendor/copy"]
    finally:
        paths.remove(str(extra))
    assert mf.checkpoint_path(wav2vec) is None
    # ComfyUI does not check a V3 combo value against its options: the loaders refuse absent files at queue time
    assert loader.validate_inputs(checkpoint=TINY_NAME, lora="auto", devices="cpu", gpu_mode="single") is True
    for bad in (wav2vec, "Wan2.2-S2V-14B"):
        msg = loader.validate_inputs(checkpoint=bad, lora="auto", devices="cpu", gpu_mode="single")
        assert isinstance(msg, str) and "'checkpoint'" in msg and repr(bad) in msg and "models/liveavatar" in msg
    msg = loader.validate_inputs(checkpoint=TINY_NAME, lora="nope.safetensors")
    assert isinstance(msg, str) and "'lora'" in msg and "models/loras" in msg
    files = env["nodes"]["LiveAvatarModelLoaderFiles"]
    msg = files.validate_inputs(dit="wan2.2_s2v_14B_bf16.safetensors", lora="none")
    assert isinstance(msg, str) and "'dit'" in msg and "models/diffusion_models" in msg
    assert files.validate_inputs(dit=None, lora="none", devices="cpu", gpu_mode="single") is True  # linked
    errors = pack_submodule("nodes.errors")
    with pytest.raises(errors.LiveAvatarInputError, match="'checkpoint'"):
        run(loader, checkpoint=wav2vec, lora="auto", lora_strength=1.0, precision="fp32",
            attention="sdpa", devices="cpu", gpu_mode="single", compile=False)



def test_text_encode_prompt_and_native_conditioning(env, model, conditioning):
    node = env["nodes"]["LiveAvatarTextEncode"]
    text = conditioning["text"]
    assert text.ndim == 2 and text.shape[1] == model.text_dim and torch.isfinite(text).all()
    native = [[torch.randn(1, 512, model.text_dim), {"pooled_output": None}]]
    out = run(node, model=model, prompt="ignored", conditioning=native).args[0]
    assert torch.equal(out, native[0][0][0])
    errors = pack_submodule("nodes.errors")
    with pytest.raises(errors.LiveAvatarInputError, match="'conditioning'.*4096"):
        run(node, model=model, prompt="x", conditioning=[[torch.zeros(1, 512, 4096), {}]])


def test_audio_encode_any_rate_and_channels(env, model, conditioning):
    out = conditioning["audio"]
    cond, frames = out.args[0], out.args[1]
    assert frames == cond.num_frames == math.floor(SECONDS * 25)
    assert cond.audio.sample_rate == 16000 and cond.audio.samples.ndim == 1
    assert "11 frames" in out.ui.as_dict()["text"][0]
    node = env["nodes"]["LiveAvatarAudioEncode"]
    errors = pack_submodule("nodes.errors")
    with pytest.raises(errors.LiveAvatarInputError, match="'audio'"):
        run(node, model=model, audio={"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000})


def test_reference_image_size_validation(env, model, conditioning):
    out = conditioning["ref"]
    ref, w, h = out.args
    assert (w, h) == (64, 64) and ref.pixels.shape == (1, 3, 1, 64, 64)
    assert "effective size 64x64" in out.ui.as_dict()["text"][0]
    node = env["nodes"]["LiveAvatarReferenceImage"]
    assert node.validate_inputs(size="704x384") is True
    msg = node.validate_inputs(size="700*400")
    assert isinstance(msg, str) and "'size'" in msg
    errors = pack_submodule("nodes.errors")
    with pytest.raises(errors.LiveAvatarInputError, match="'size'"):
        run(node, model=model, image=torch.rand(1, 64, 64, 3), size="65*64", size_mode="exact")
    area = run(node, model=model, image=torch.rand(1, 120, 240, 3), size="128*128", size_mode="area").args
    assert area[1] > area[2]  # the image's 2:1 aspect ratio decides the shape


def test_reference_image_size_auto_and_kv_dtype_auto(env, model, conditioning):
    """size "auto": the largest of the reference's sizes (resolved for the image's aspect ratio) whose
    estimate fits what ComfyUI can give on the model's device (here the CPU: the host's available
    memory; the tiny model fits the largest). kv_dtype "auto": bf16 caches fit, so not fp8."""
    from liveavatar.pipeline.fit import size_candidates

    node = env["nodes"]["LiveAvatarReferenceImage"]
    assert node.validate_inputs(size="auto") is True
    out = run(node, model=model, image=torch.rand(1, 120, 240, 3), size="auto", size_mode="area")
    _, w, h = out.args
    _, bw, bh = size_candidates((240, 120))[0]
    assert (w, h) == (bw, bh) and w > h
    text = out.ui.as_dict()["text"][0]
    assert f"effective size {w}x{h} (requested 'auto'" in text and "size auto: the largest" in text
    sampler = pack_submodule("nodes.sampler")
    ref = conditioning["ref"].args[0]
    assert sampler._kv_fp8("LiveAvatar Sampler", model, ref, "auto", 4) is False
    assert sampler._kv_fp8("LiveAvatar Sampler", model, ref, "fp8", 4) is True
    # ComfyUI's model management has the in-process model registered (its DiT loaded)
    assert model.patcher is not None and model.patcher.loaded
    assert any(m.model is model.patcher for m in env["mm"].current_loaded_models)


def test_sampler_returns_native_frames_and_audio(env, model, conditioning, hook):
    rec = hook()
    out = run(env["nodes"]["LiveAvatarSampler"],
        model=model, text=conditioning["text"], audio=conditioning["audio"].args[0],
        reference=conditioning["ref"].args[0], seed=3, steps=3, num_clip=0, keep_frames=True, ram_limit_gb=1.0)
    frames, audio, fps, streamed = out.args
    n = conditioning["audio"].args[1]
    assert frames.shape == (n, 64, 64, 3) and frames.dtype == torch.float32
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0 and float(frames.std()) > 0
    assert audio["sample_rate"] == 16000 and audio["waveform"].shape == (1, 1, n * 640)
    assert fps == 25.0
    shown = out.ui.as_dict()["text"][0]  # what the node shows after the run (and /history carries)
    assert shown.startswith(f"{n} frames ({n / 25:.2f} s at 25 fps), 2 blocks in ") and "s per block" in shown
    assert f"{n} frames as IMAGE: about 0.00 GB of RAM" in shown
    assert streamed.get_dimensions() == (64, 64)  # the VIDEO output is there with the frames too
    values = [v for v, _, _ in rec.calls]
    assert values == sorted(values) and values[-1] == rec.calls[-1][1] == 2 * 4  # 2 blocks x (3 steps + decode)
    previews = [p for _, _, p in rec.calls if p is not None]
    assert len(previews) == 2 and previews[0][0] == "JPEG" and previews[0][1].size == (64, 64)

    # native Create Video -> mp4 (what Save Video does)
    from comfy_extras.nodes_video import CreateVideo

    video = run(CreateVideo, images=frames, fps=fps, audio=audio).args[0]
    path = env["out"] / "native.mp4"
    video.save_to(str(path), format="mp4", codec="h264")
    from liveavatar.media.video_writer import probe_video

    info = probe_video(path)
    assert info["frames"] == n and (info["width"], info["height"]) == (64, 64)
    assert info["audio_duration_s"] == pytest.approx(n / 25, abs=0.05)


def sampler_with_prompt(env, prompt: dict, node_id: str = "20"):
    """The Sampler class as ComfyUI's executor prepares it: hidden PROMPT (the API graph) and UNIQUE_ID."""
    from comfy_api.latest import io

    return env["nodes"]["LiveAvatarSampler"].PREPARE_CLASS_CLONE({io.Hidden.prompt: prompt,
                                                                   io.Hidden.unique_id: node_id})


def test_sampler_video_output_keeps_no_frames(env, model, conditioning, hook):
    """keep_frames off: the VIDEO is the streamed mp4 in the temp folder; the IMAGE / AUDIO outputs
    block their users with the fix; a graph that connects them is refused before generating."""
    from comfy_execution.graph_utils import ExecutionBlocker

    from liveavatar.media.video_writer import probe_video

    rec = hook()
    video_only = {"20": {"class_type": "LiveAvatarSampler", "inputs": {}},
                  "22": {"class_type": "SaveVideo", "inputs": {"video": ["20", 3]}}}
    kw = dict(model=model, text=conditioning["text"], audio=conditioning["audio"].args[0],
              reference=conditioning["ref"].args[0], seed=3, steps=3, num_clip=0)
    out = run(sampler_with_prompt(env, video_only), **kw, keep_frames=False, ram_limit_gb=8.0)
    frames, audio, fps, video = out.args
    assert isinstance(frames, ExecutionBlocker) and isinstance(audio, ExecutionBlocker)
    assert "keep_frames" in frames.message and "video output" in frames.message and fps == 25.0
    path = video.get_stream_source()
    assert str(path).startswith(env["fp"].get_temp_directory()) and str(path).endswith(".mp4")
    n = conditioning["audio"].args[1]
    info = probe_video(path)
    assert info["frames"] == n and info["audio_duration_s"] == pytest.approx(n / 25, abs=0.05)
    assert len([p for _, _, p in rec.calls if p is not None]) == 2  # the per-block preview is still there

    # keep_frames on but over ram_limit_gb, frames not connected: a warning with the estimate, no frames
    out = run(sampler_with_prompt(env, video_only), **kw, keep_frames=True, ram_limit_gb=0.0)
    shown = out.ui.as_dict()["text"][0]
    assert "warning: frames not kept" in shown and "GB of RAM" in shown and "ram_limit_gb = 0" in shown
    assert isinstance(out.args[0], ExecutionBlocker) and "ram_limit_gb" in out.args[0].message

    # frames connected: refused before any block, naming the input to change
    errors = pack_submodule("nodes.errors")
    with_frames = {**video_only, "21": {"class_type": "CreateVideo", "inputs": {"images": ["20", 0]}}}
    rec = hook()
    with pytest.raises(errors.LiveAvatarInputError, match="'keep_frames'.*connected"):
        run(sampler_with_prompt(env, with_frames), **kw, keep_frames=False, ram_limit_gb=8.0)
    with pytest.raises(errors.LiveAvatarInputError, match="'ram_limit_gb'.*GB of RAM"):
        run(sampler_with_prompt(env, with_frames), **kw, keep_frames=True, ram_limit_gb=0.0)
    with pytest.raises(errors.LiveAvatarInputError, match="'ram_limit_gb'.*finite"):
        run(sampler_with_prompt(env, with_frames), **kw, keep_frames=True, ram_limit_gb=float("nan"))
    assert rec.calls == []


def test_save_mp4_streams_to_the_output_folder(env, model, conditioning, hook):
    hook()
    out = run(env["nodes"]["LiveAvatarSaveMP4"],
        model=model, text=conditioning["text"], audio=conditioning["audio"].args[0],
        reference=conditioning["ref"].args[0], seed=3, steps=3, num_clip=0, filename_prefix="LiveAvatar/test")
    video, rel = out.args
    path = env["out"] / rel
    assert path.is_file() and rel.startswith("LiveAvatar")
    from liveavatar.media.video_writer import probe_video

    n = conditioning["audio"].args[1]
    info = probe_video(path)
    assert info["frames"] == n and (info["width"], info["height"]) == (64, 64)
    assert info["audio_duration_s"] == pytest.approx(n / 25, abs=0.05)
    assert video.get_dimensions() == (64, 64)
    shown = out.ui if isinstance(out.ui, dict) else out.ui.as_dict()
    saved = shown["images"][0]
    assert saved["filename"] == path.name and saved["type"] == "output"
    assert shown["text"][0].startswith(f"{n} frames ({n / 25:.2f} s at 25 fps), 2 blocks")


def test_interrupt_stops_between_steps(env, model, conditioning, hook):
    rec = hook(interrupt_at=2)  # interrupt right after the second step of block 0
    mm = env["mm"]
    with pytest.raises(mm.InterruptProcessingException):
        run(env["nodes"]["LiveAvatarSampler"],
            model=model, text=conditioning["text"], audio=conditioning["audio"].args[0],
            reference=conditioning["ref"].args[0], seed=3, steps=3, num_clip=0)
    assert len(rec.calls) <= 3 and not mm.processing_interrupted()  # flag consumed, server can go on


def test_sampler_rejects_wrong_sockets(env, model, conditioning):
    errors = pack_submodule("nodes.errors")
    with pytest.raises(errors.LiveAvatarInputError, match="'reference'"):
        run(env["nodes"]["LiveAvatarSampler"],
            model=model, text=conditioning["text"], audio=conditioning["audio"].args[0],
            reference=torch.zeros(1, 64, 64, 3), seed=0, steps=4, num_clip=0)


def test_files_loader_tokenizer_from_the_umt5_file(env, tmp_path):
    """A umT5 file without the embedded SentencePiece model and no tokenizer folder: the error names
    the `tokenizer` input before anything is loaded; with `spiece_model` inside, the check passes."""
    from safetensors.torch import save_file

    loader, errors = env["nodes"]["LiveAvatarModelLoaderFiles"], pack_submodule("nodes.errors")
    names = {}
    for folder in ("diffusion_models", "text_encoders", "vae", "audio_encoders"):
        (tmp_path / folder).mkdir()
        names[folder] = f"la_test_{folder}.safetensors"
        save_file({"x": torch.zeros(1)}, str(tmp_path / folder / names[folder]))
        env["fp"].add_model_folder_path(folder, str(tmp_path / folder))
    kw = dict(dit=names["diffusion_models"], t5=names["text_encoders"], vae=names["vae"],
              wav2vec=names["audio_encoders"], tokenizer=pack_submodule("nodes.loader").EMBEDDED_TOKENIZER,
              lora="none", lora_strength=1.0, precision="fp32", attention="sdpa", devices="cpu",
              gpu_mode="single", compile=False)
    with pytest.raises(errors.LiveAvatarInputError, match="'tokenizer'.*spiece_model"):
        run(loader, **kw)
    has = pack_submodule("nodes.loader").has_embedded_tokenizer
    assert not has(str(tmp_path / "text_encoders" / names["text_encoders"]))
    save_file({"spiece_model": torch.zeros(4, dtype=torch.uint8)}, str(tmp_path / "with_tok.safetensors"))
    assert has(str(tmp_path / "with_tok.safetensors"))


def test_loader_weights_option(env, model):
    """The optional `weights` input (default auto): checked by name, and a "stream" spec loads the
    DiT with its second half in host memory (CPU: half the layers streamed)."""
    import dataclasses

    from liveavatar.options import WEIGHTS_MODES

    loader = env["nodes"]["LiveAvatarModelLoader"]
    weights = next(i for i in loader.GET_SCHEMA().inputs if i.id == "weights")
    assert list(weights.options) == list(WEIGHTS_MODES) and weights.default == "auto" and weights.optional
    assert model.spec.weights == "auto"
    errors = pack_submodule("nodes.errors")
    base = dict(checkpoint=TINY_NAME, lora="auto", lora_strength=1.0, precision="fp32", attention="sdpa",
                devices="cpu", gpu_mode="single", compile=False)
    with pytest.raises(errors.LiveAvatarInputError, match="'weights'.*'half'"):
        run(loader, **base, weights="half")
    assert not model.closed  # refused before any load: the live model stays
    streamed = pack_submodule("nodes.handle")._open_in_process(dataclasses.replace(model.spec, weights="stream"))
    n = streamed.dit.cfg.num_layers
    assert streamed.dit.layer_stream.streamed == list(range(n // 2, n))
