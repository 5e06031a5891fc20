"""CUDA checks (skipped without a GPU; run on the device machine):

- bf16 on the GPU against fp32 on a small random DiT (quality guard for speed work);
- the in-process pipeline and a one-rank worker group give the same frames on CUDA;
- tearing a group down (normal close, killed controller) gives the GPU memory back;
- the overlapped decode (DiT thread + decode stream) gives the serial frames; cancel and close stop it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_support import gpu_pids, inprocess_blocks, max_pixel_difference, tiny_job, wait_gone_from_gpu  # noqa: E402


def _rollout(dtype: torch.dtype, blocks: int = 2, device: str = "cuda", prepare=None,
             kv_offload: bool | None = None, kv_prefetch: bool = False, steps: int = 4) -> torch.Tensor:
    from liveavatar.config import DiTConfig
    from liveavatar.loading.tiny import dit_key_shapes, draw_state_dict
    from liveavatar.models.dit import CausalS2VDiT
    from liveavatar.pipeline.plan import make_plan
    from liveavatar.pipeline.memory import CachePlan
    from liveavatar.pipeline.sampler import BlockInputs, StepRunner, make_schedule
    from liveavatar.config import DEFAULT_STREAM as S

    cfg = DiTConfig(dim=512, num_heads=4, num_layers=4, ffn_dim=1024, freq_dim=256, audio_dim=64,
                    text_dim=128, audio_inject_layers=(0, 2), audio_num_layers=5)
    sd = draw_state_dict(dit_key_shapes(cfg), torch.Generator().manual_seed(0))
    model = CausalS2VDiT(cfg)
    model.load_state_dict(sd)
    model = model.to(device, dtype).eval()
    if prepare is not None:
        prepare(model)
    g = torch.Generator().manual_seed(1)
    hw = (24, 40)
    ctx = torch.randn(11, cfg.text_dim, generator=g)
    ref = torch.randn(1, 16, 1, *hw, generator=g)
    motion = torch.randn(1, 16, 19, *hw, generator=g)
    with torch.no_grad():
        text = model.encode_text(ctx.to(device, dtype))
        caches = CachePlan(offload=bool(kv_offload), prefetch=bool(kv_prefetch and kv_offload))
        runner = StepRunner(model, text, hw, make_schedule(steps, S), range(steps), S, 0, device, dtype, caches=caches)
        assert runner.kv_prefetch == caches.prefetch
        runner.prefill(ref, motion)
        outs = []
        for block in make_plan(blocks * 12 - 3, S).blocks:
            x = torch.randn(16, 3, *hw, generator=g)
            audio = torch.randn(1, 5, cfg.audio_dim, 12, generator=g)
            outs.append(runner.run(x, block, BlockInputs(audio=audio)).float().cpu())
    return torch.cat(outs, dim=1)


def test_bf16_close_to_fp32_on_gpu():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref = _rollout(torch.float32)
    finally:  # later tests compare against worker processes that run with the defaults
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    low = _rollout(torch.bfloat16)
    rel = (low - ref).norm() / ref.norm()
    print(f"bf16 vs fp32 relative error over 2 blocks x 4 steps: {rel:.3e}")
    assert torch.isfinite(low).all()
    assert rel < 2e-2


def test_fa4_backend_close_to_sdpa_on_gpu():
    """attn_backend 'fa4' (flash-attn-4) through the streaming pipeline (ring + sink self-attention, text
    and audio cross-attention, head dim 128) gives the 'sdpa' rollout up to bf16 kernel rounding."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        pytest.skip("flash-attn-4 is not installed (bench/attn_routes_device.sh installs it on the device)")
    ref = _rollout(torch.bfloat16)
    out = _rollout(torch.bfloat16, prepare=lambda model: setattr(model, "attn_backend", "fa4"))
    rel = (out - ref).norm() / ref.norm()
    print(f"fa4 vs sdpa (bf16) relative difference over 2 blocks x 4 steps: {rel:.3e}")
    assert torch.isfinite(out).all()
    assert rel < 2e-2


def _dit_device_bytes(model) -> int:
    """Bytes of the DiT's CUDA storages (each counted once) plus its layer stream's device slots."""
    storages = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.is_cuda:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    stream = model.layer_stream
    return sum(storages.values()) + (stream.device_bytes() if stream is not None else 0)


def test_weights_round_trip_to_host_with_streaming():
    """ComfyUI takes the GPU back and returns it (`move_weights`): every DiT byte leaves the GPU
    (stream slots included) and the allocator gets it back, only the resident blocks come back (the
    streamed ones stay pinned on the host), and the frames are those of a model that never moved."""
    import gc

    from liveavatar.models.layer_stream import LayerResidency

    want = _rollout(torch.bfloat16, prepare=lambda m: m.stream_layers(LayerResidency(2, 4, 2)))
    seen = {}

    def round_trip(model):
        model.stream_layers(LayerResidency(2, 4, 2))
        gc.collect()  # the earlier rollout's model and stream (reference cycles) are garbage by now
        torch.cuda.synchronize()
        seen["held"] = _dit_device_bytes(model)
        seen["before"] = torch.cuda.memory_allocated()
        model.move_weights("cpu")
        seen["held_away"] = _dit_device_bytes(model)
        seen["away"] = torch.cuda.memory_allocated()
        model.move_weights("cuda")
        seen["held_back"] = _dit_device_bytes(model)
        seen["streamed_pinned"] = all(t.device.type == "cpu" and t.is_pinned()
                                      for i in (2, 3) for t in model.blocks[i].parameters())

    got = _rollout(torch.bfloat16, prepare=round_trip)
    assert seen["held_away"] == 0, seen
    assert seen["before"] - seen["away"] >= seen["held"], seen  # freed, not only unreferenced
    assert seen["held_back"] <= seen["held"], seen
    assert seen["streamed_pinned"], seen
    assert torch.equal(got, want)


def test_cuda_graphs_replay_bitwise_equal():
    """compile_blocks + use_cuda_graphs: steady-state calls are captured and replayed (ring offsets
    through the rows index), and the frames are bitwise those of the same compiled layers without graphs."""
    graphs = {}

    def compiled(model):
        model.compile_blocks()

    def graphed(model):
        model.compile_blocks()
        model.use_cuda_graphs()
        graphs["g"] = model.cuda_graphs

    plain = _rollout(torch.bfloat16, blocks=8, prepare=compiled)
    replayed = _rollout(torch.bfloat16, blocks=8, prepare=graphed)
    g = graphs["g"]
    print(f"cuda graphs: {g.captures} captures, {g.replays} replays, disabled: {g.disabled_reason}")
    assert g.disabled_reason is None
    assert g.captures >= 4 and g.replays >= 4 * 3
    assert torch.equal(replayed, plain)


def test_cuda_graphs_eager_layers_replay_bitwise_equal():
    """use_cuda_graphs without compile_blocks: the eager layers' steady calls are captured and
    replayed, and the latents are bitwise those of the eager layers."""
    graphs = {}

    def graphed(model):
        model.use_cuda_graphs()
        graphs["g"] = model.cuda_graphs

    plain = _rollout(torch.bfloat16, blocks=8)
    replayed = _rollout(torch.bfloat16, blocks=8, prepare=graphed)
    g = graphs["g"]
    assert g.disabled_reason is None and g.captures >= 4 and g.replays >= 4 * 3
    assert torch.equal(replayed, plain)


def test_vae_cuda_graphs_stream_decode_bitwise_equal():
    """WanVAE.use_cuda_graphs: the streaming decoder's steady frames come from replayed graphs
    (static caches updated in place), bitwise the eager decoder's, block after block."""
    from liveavatar.config import VAEConfig
    from liveavatar.loading.tiny import draw_state_dict, vae_key_shapes
    from liveavatar.models.vae import WanVAE

    cfg = VAEConfig(base_dim=8)
    vae = WanVAE.from_official_state_dict(draw_state_dict(vae_key_shapes(cfg), torch.Generator().manual_seed(0)),
                                          cfg, device="cuda", dtype=torch.bfloat16)
    latents = torch.randn(1, 16, 7 + 3 * 6, 8, 8, generator=torch.Generator().manual_seed(1))

    def stream() -> torch.Tensor:
        dec = vae.streaming_decoder()
        return torch.cat([dec.decode(latents[:, :, :7])] + [dec.decode(latents[:, :, a:a + 3])
                                                            for a in range(7, latents.shape[2], 3)], dim=2)

    plain = stream()
    vae.use_cuda_graphs()
    replayed = stream()
    counts = vae.graph_counts
    assert counts.disabled is None and counts.captures == 1 and counts.replays >= 3 * 5
    assert torch.equal(replayed, plain)


@pytest.mark.parametrize("steps", [4, 3])
def test_kv_offload_pinned_paging_bitwise_equal(steps):
    """Offloaded step caches (pinned host rows, non-blocking copies) give the frames of resident
    caches over 6 blocks (the ring wraps), paged on the compute stream and with the prefetch on a
    copy stream (4 steps: buffers alternate; 3 steps: the block boundary reuses a buffer)."""
    resident = _rollout(torch.bfloat16, blocks=6, kv_offload=False, steps=steps)
    assert torch.equal(_rollout(torch.bfloat16, blocks=6, kv_offload=True, steps=steps), resident)
    assert torch.equal(_rollout(torch.bfloat16, blocks=6, kv_offload=True, kv_prefetch=True, steps=steps), resident)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_job(tmp_path_factory.mktemp("ckpt"), 1.5)


def test_group_matches_inprocess_and_frees_memory(tiny):
    from parallel import open_worker_group

    ckpt, audio, img = tiny
    want = inprocess_blocks(ckpt, audio, img, seed=4)
    before = gpu_pids()
    group = open_worker_group("checkpoint", ["cuda:0"], mode="single", ckpt_dir=str(ckpt), dtype="fp32")
    # an interrupted job first: the group stops within a block and takes the next job
    from liveavatar.pipeline import GenerationCancelled

    seen = []
    with pytest.raises(GenerationCancelled):
        for blk in group.generate(group.encode_prompt("hi"), group.encode_audio(audio),
                                  group.prepare_image(img, "128*64"), seed=4, cancel=lambda: bool(seen)):
            seen.append(blk)
    got = list(group.generate(group.encode_prompt("hi"), group.encode_audio(audio),
                              group.prepare_image(img, "128*64"), seed=4))
    workers = gpu_pids() - before
    group.close()
    assert [b.index for b in got] == [b.index for b in want]
    worst = max_pixel_difference(got, want)
    print(f"one-rank group vs in-process on CUDA: max pixel difference {worst}")
    assert worst <= 1
    assert not wait_gone_from_gpu(workers, 20), "worker processes still hold GPU memory after close()"


def test_killed_controller_frees_gpu(tiny, tmp_path):
    ckpt, _, _ = tiny
    script = tmp_path / "ctl.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, math, torch
        sys.path.insert(0, {str(REPO)!r})
        from PIL import Image
        from liveavatar.media.audio import audio_from_waveform
        from parallel import open_worker_group
        g = open_worker_group("checkpoint", ["cuda:0"], mode="single", ckpt_dir={str(ckpt)!r}, dtype="fp32")
        t = torch.arange(16000 * 20) / 16000
        a = audio_from_waveform((0.3 * torch.sin(2 * math.pi * 200 * t))[None], 16000)
        for i, b in enumerate(g.generate(g.encode_prompt("hi"), g.encode_audio(a),
                                         g.prepare_image(Image.new("RGB", (64, 64)), "64*64"), seed=1)):
            print("block", i, flush=True)
    """))
    before = gpu_pids()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("block"), "controller produced no block"
    workers = gpu_pids() - before - {proc.pid}
    assert workers, "no worker process on the GPU"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not wait_gone_from_gpu(workers, 30), "orphaned workers keep GPU memory after the controller died"


def test_cli_generate_on_cuda(tiny, tmp_path):
    ckpt, _, _ = tiny
    out = tmp_path / "cuda.mp4"
    res = subprocess.run([sys.executable, "-m", "liveavatar", "generate", "--image", str(REPO / "assets/avatar.png"),
                          "--audio", str(REPO / "assets/speech.wav"), "--prompt", "hi", "--ckpt-dir", str(ckpt),
                          "--size", "256*128", "--device", "cuda", "--dtype", "bf16", "--num-clip", "1",
                          "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    print(res.stdout, res.stderr[-2000:])
    assert res.returncode == 0
    from liveavatar.media.video_writer import probe_video

    info = probe_video(out)
    assert (info["width"], info["height"]) == (256, 128) and info["frames"] == 45


def _dit_threads() -> list:
    import threading

    from liveavatar.pipeline.overlap import THREAD_NAME

    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


def test_overlapped_decode_matches_serial_on_cuda(tiny):
    from liveavatar.pipeline import GenerationCancelled, LiveAvatar

    ckpt, audio, img = tiny
    m = LiveAvatar.from_checkpoint(ckpt, device="cuda:0", dtype="fp32")
    args = (m.encode_prompt("hi"), m.encode_audio(audio), m.prepare_image(img, "128*64"))
    serial = list(m.generate(*args, seed=4, overlap_decode=False))
    events = []
    over = list(m.generate(*args, seed=4, progress=events.append, overlap_decode=True))
    assert [b.index for b in over] == [b.index for b in serial] and len(over) >= 2
    diffs = [int((a.frames.int() - b.frames.int()).abs().max()) for a, b in zip(over, serial)]
    exact = all(torch.equal(a.frames, b.frames) for a, b in zip(over, serial))
    print(f"overlapped vs serial decode on CUDA: max pixel difference per block {diffs}, bitwise equal {exact}")
    print("timings overlapped", [{k: round(v * 1000, 2) for k, v in b.timings.items()} for b in over])
    assert max(diffs) <= 1
    assert all(set(b.timings) == {"dit", "decode"} and min(b.timings.values()) > 0 for b in over)
    assert sum(e["event"] == "step" for e in events) == 4 * len(over)
    assert [e["block"] for e in events if e["event"] == "block"] == [b.index for b in over]
    # cancel from the DiT thread reaches the caller; early close stops the thread; ComfyUI's inference mode
    got = []
    with pytest.raises(GenerationCancelled):
        for b in m.generate(*args, seed=4, cancel=lambda: bool(got), overlap_decode=True):
            got.append(b)
    assert len(got) == 1 and not _dit_threads()
    gen = m.generate(*args, seed=4, overlap_decode=True)
    first = next(gen)
    gen.close()
    assert int((first.frames.int() - serial[0].frames.int()).abs().max()) <= 1
    assert not _dit_threads(), "the DiT thread outlived the closed generator"
    with torch.inference_mode():
        inf = list(m.generate(*args, seed=4, overlap_decode=True))
    assert max(int((a.frames.int() - b.frames.int()).abs().max()) for a, b in zip(inf, serial)) <= 1
    assert not _dit_threads()


def test_fp8_while_loading_keeps_the_load_peak_near_the_fp8_size(tmp_path):
    """A DiT of 12 x 2048-wide layers (bf16 file): loading with fp8 converts layer by layer, so the
    GPU peak stays well under the bf16 weight size, and the result equals convert-after-load."""
    from liveavatar.config import DiTConfig
    from liveavatar.loading.official import build_dit_from_source, find_official_checkpoint
    from liveavatar.loading.tiny import make_tiny_checkpoint
    from liveavatar.pipeline.memory import dit_param_counts

    cfg = DiTConfig(dim=2048, num_heads=16, num_layers=12, ffn_dim=8192, freq_dim=256, audio_dim=64,
                    text_dim=128, audio_inject_layers=(0, 6), audio_num_layers=5)
    ckpt = find_official_checkpoint(make_tiny_checkpoint(tmp_path / "ck", dit=cfg, dtype=torch.bfloat16))
    total, linear = dit_param_counts(ckpt.config)
    dev = torch.device("cuda:0")
    torch.empty(1, device=dev)  # the allocator's stats exist once the device is in use
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    model = build_dit_from_source(ckpt.dit, ckpt.config, dev, torch.bfloat16, ckpt.lora_path, fp8=True)
    peak = torch.cuda.max_memory_allocated(dev) - base
    bf16_bytes, fp8_bytes = 2 * total, linear + 2 * (total - linear)
    print(f"fp8 load peak {peak / 2**20:.0f} MiB; fp8 size {fp8_bytes / 2**20:.0f} MiB, bf16 {bf16_bytes / 2**20:.0f} MiB")
    assert peak < fp8_bytes + 0.25 * (bf16_bytes - fp8_bytes)
    assert type(model.blocks[0].self_attn.q).__name__ == "FP8Linear"
