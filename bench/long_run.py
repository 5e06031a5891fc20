"""An hour of avatar video on the tiny checkpoint: flat memory, A/V sync, a playable file (issue 18).

    python -m bench.long_run --minutes 60 --device cuda     # the GPU run (bash bench/long_run.sh)
    python -m bench.long_run --minutes 2 --device cpu       # a short run anywhere

Steps: a tiny random checkpoint (`liveavatar.loading.tiny`), a reference image and `--minutes` of
speech-like audio (bench/speechlike.py, 16 kHz mono WAV written chunk by chunk) are made in
`--work`; the audio is opened with `open_audio` (streamed decode, spooled: constant memory) and the
video generated block by block through the library (`LiveAvatar.generate`, audio features window by
window) into the streamed fragmented mp4 (`VideoWriter`). A sampler thread reads the process RSS
and the GPU memory (allocated, reserved, device-wide used) every `--sample-s`, and every block
records them too. After the run, the mp4 is read back: frame count and durations (video = audio
within one frame), A/V drift at the start, middle and end (cross-correlation of the decoded AAC
against the source audio), and decodes at cut points (1 min, middle, 1 min before the end).

Speed: at 64*64 a block is thousands of tiny kernels, so on CUDA the steady-state DiT and VAE
decoder calls are replayed from CUDA graphs (`--cuda-graphs`, on by default on CUDA;
bench/long_run_graphs.py); the first `--parity-blocks` blocks are generated with and without them
first and must be the same bits (`graphs_parity` in the result).

Budget: generation stops after `--budget-s` seconds (the run must fit a device call); the result
then says so (`complete: false`) and gives the measured rate and the time the full length would
take. Output: one JSON line appended to `bench/results/<date>_<device>_long_run.jsonl` and a PNG
plot of memory over time beside it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
AV_HELP = ("PyAV (`av`) is not installed: it writes and reads the mp4 and decodes the audio. For the device "
           "machine (Python 3.12, no PyAV): run `bash bench/long_run.sh prepare` here (downloads "
           "av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl and diffusers into .whl/), then `bash bench/long_run.sh` "
           "there with carry ['.whl'].")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.long_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="audio length (default 60)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--dtype", default=None, help="bf16 on CUDA, fp32 on the CPU by default")
    p.add_argument("--size", default="64*64", help="output size (default 64*64, the smallest)")
    p.add_argument("--work", default="/tmp/liveavatar_long_run", help="folder for the checkpoint, audio, mp4")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop generating after this (default 420)")
    p.add_argument("--sample-s", type=float, default=1.0, help="memory sampling period (default 1 s)")
    p.add_argument("--results", default=str(RESULTS), help="folder of the JSON line and the plot")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="replay the steady DiT / VAE calls from CUDA graphs (auto: on CUDA)")
    p.add_argument("--parity-blocks", type=int, default=12,
                   help="with graphs: blocks generated with and without them first, compared bitwise (0: skip)")
    return p.parse_args(argv)


class MemorySampler(threading.Thread):
    """Samples (t, rss, gpu allocated, gpu reserved, gpu device-wide used) every `period` s, bytes."""

    def __init__(self, device, period: float):
        super().__init__(daemon=True)
        import psutil
        import torch

        self.proc, self.torch, self.device, self.period = psutil.Process(), torch, device, period
        self.rows: list[tuple[float, int, int, int, int]] = []
        self.t0 = time.perf_counter()
        self.stop_event = threading.Event()

    def sample(self) -> tuple[float, int, int, int, int]:
        t = time.perf_counter() - self.t0
        rss = self.proc.memory_info().rss
        if self.device.type == "cuda":
            tc = self.torch.cuda
            free, total = tc.mem_get_info(self.device)
            return t, rss, tc.memory_allocated(self.device), tc.memory_reserved(self.device), total - free
        return t, rss, 0, 0, 0

    def run(self) -> None:
        while not self.stop_event.wait(self.period):
            self.rows.append(self.sample())

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def _prepare(work: Path, minutes: float) -> tuple[Path, Path, Path, float]:
    from PIL import Image

    from bench.speechlike import write_speechlike_wav
    from liveavatar.loading.tiny import make_tiny_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").is_file():
        make_tiny_checkpoint(ckpt, seed=0)
    image = work / "face.png"
    Image.new("RGB", (256, 256), (200, 150, 120)).save(image)
    wav = work / f"speech_{minutes:g}min.wav"
    t = time.perf_counter()
    write_speechlike_wav(wav, minutes * 60.0)
    return ckpt, image, wav, time.perf_counter() - t


def run(args: argparse.Namespace) -> dict:
    import torch

    from bench.benchlib import device_name
    from bench.long_run_checks import av_drift_ms, decode_at, downsample, growth, plot_memory
    from liveavatar.media.audio import num_video_frames, open_audio
    from liveavatar.media.video_writer import VideoWriter, probe_video
    from liveavatar.pipeline.model import LiveAvatar, resolve_device

    device = resolve_device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    work = Path(args.work)
    ckpt, image_path, wav, wav_s = _prepare(work, args.minutes)
    res: dict = {"bench": "long_run", "command": "python -m bench.long_run " + " ".join(sys.argv[1:]),
                 "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "device": device_name(device), "torch": torch.__version__, "dtype": dtype, "size": args.size,
                 "minutes": args.minutes, "wav_write_s": round(wav_s, 2),
                 "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    sampler = MemorySampler(device, args.sample_s)
    t = time.perf_counter()
    model = LiveAvatar.from_checkpoint(ckpt, device=device, dtype=dtype)
    audio = open_audio(wav)  # streamed decode, spooled to disk
    res["open_audio_s"] = round(time.perf_counter() - t, 2)
    res["audio"] = {"samples": audio.num_samples, "rate": audio.sample_rate, "seconds": audio.duration_s,
                    "kind": type(audio).__name__}
    from PIL import Image

    img = model.prepare_image(Image.open(image_path).convert("RGB"), args.size, "exact")
    ctx, aud = model.encode_prompt("a person talking"), model.encode_audio(audio)
    graphs = args.cuda_graphs == "on" or (args.cuda_graphs == "auto" and device.type == "cuda")
    res["cuda_graphs"] = graphs
    if graphs:
        from bench.long_run_graphs import parity, set_graphs

        res["graphs_parity"] = parity(model, ctx, aud, img, args.parity_blocks) if args.parity_blocks else None
        if res["graphs_parity"] is not None and not res["graphs_parity"]["equal"]:
            print("warning: CUDA graphs changed the frames of the first blocks; running eagerly", file=sys.stderr)
            graphs = res["cuda_graphs"] = False
        set_graphs(model, graphs)  # counts from zero for the run
    fps, spf = model.stream.fps, audio.sample_rate // model.stream.fps
    out = work / "long_run.mp4"
    blocks, frames_written, samples_written, bad_audio_blocks = [], 0, 0, 0
    spent = {"dit": 0.0, "decode": 0.0, "write": 0.0, "sample": 0.0}  # seconds, summed over blocks
    sampler.start()
    t_gen = time.perf_counter()
    complete, total_blocks = True, None
    gen = model.generate(ctx, aud, img, seed=0)
    with VideoWriter(out, img.width, img.height, fps=fps, audio_rate=audio.sample_rate) as writer:
        for blk in gen:
            total_blocks = blk.total_blocks
            t_w = time.perf_counter()
            writer.write_frames(blk.frames)
            writer.write_audio(blk.audio)
            t_s = time.perf_counter()
            n = blk.frames.shape[0]
            if blk.audio.shape[0] != n * spf:  # exactly 640 samples per frame at 16 kHz / 25 fps
                bad_audio_blocks += 1
            frames_written += n
            samples_written += blk.audio.shape[0]
            blocks.append((blk.index, *sampler.sample()))
            spent["write"] += t_s - t_w
            spent["sample"] += time.perf_counter() - t_s
            spent["dit"] += blk.timings.get("dit", 0.0)
            spent["decode"] += blk.timings.get("decode", 0.0)
            if blk.index % 500 == 0:
                print(f"block {blk.index + 1}/{blk.total_blocks} at {time.perf_counter() - t_gen:.1f} s, "
                      f"rss {blocks[-1][2] / 2**20:.0f} MiB", flush=True)
            if time.perf_counter() - t_gen > args.budget_s:
                complete = blk.index + 1 == blk.total_blocks
                gen.close()
                break
        info = writer.close()
    gen_s = time.perf_counter() - t_gen
    sampler.stop()
    done = len(blocks)
    res.update({"complete": complete, "blocks": done, "total_blocks": total_blocks, "generate_s": round(gen_s, 2),
                "blocks_per_s": round(done / gen_s, 3), "video_s_per_s": round(frames_written / fps / gen_s, 3),
                "projected_full_s": round(gen_s * total_blocks / done, 1) if done else None,
                "audio_windows_computed": getattr(aud.features, "windows_computed", None),
                "frames_written": frames_written, "audio_samples_written": samples_written,
                "blocks_with_wrong_audio_samples": bad_audio_blocks, "writer": info,
                "ms_per_block": {k: round(1e3 * v / max(done, 1), 2) for k, v in spent.items()}})
    if graphs:
        from bench.long_run_graphs import stats

        res["graphs"] = stats(model)
    # --- the file, read back
    probe = probe_video(out)
    expect_frames = num_video_frames(audio, fps=fps)
    video_s, audio_s = probe["frames"] / fps, audio.duration_s
    res["file"] = {"path": str(out), "bytes": out.stat().st_size, **probe}
    res["duration_check"] = {
        "video_frames": probe["frames"], "expected_frames": expect_frames, "video_s": video_s,
        "source_audio_s": audio_s, "audio_track_s": probe["audio_duration_s"],
        "video_minus_source_audio_s": round(video_s - audio_s, 6),
        "within_one_frame": complete and abs(video_s - audio_s) < 1 / fps and probe["frames"] == expect_frames,
        "audio_track_minus_video_s": round(probe["audio_duration_s"] - video_s, 6),
    }
    dur = video_s
    res["av_drift"] = [av_drift_ms(out, audio, at) for at in (min(2.0, dur / 4), dur / 2, max(0.0, dur - 2.5))]
    cuts = [min(60.0, dur * 0.1), dur / 2, max(0.0, dur - 60.0) if dur > 120 else dur * 0.9]
    res["cut_points"] = [decode_at(out, at) for at in cuts]
    # --- memory over time
    rows = sorted(sampler.rows + [b[1:] for b in blocks])
    t_s = [r[0] - (blocks[0][1] if blocks else 0.0) for r in rows]
    keep = [i for i, x in enumerate(t_s) if x >= 0]
    t_s = [t_s[i] for i in keep]
    rss = [rows[i][1] for i in keep]
    block_t = [b[1] for b in blocks]
    res["memory"] = {"rss": growth(block_t, [b[2] for b in blocks]),
                     "gpu_allocated": growth(block_t, [b[3] for b in blocks]),
                     "gpu_reserved": growth(block_t, [b[4] for b in blocks]),
                     "gpu_device_used": growth(block_t, [b[5] for b in blocks]),
                     "warm_up": "first 10 % of the blocks", "samples": len(rows)}
    res["memory"]["flat"] = all(abs(res["memory"][k]["growth_fraction"] or 0.0) <= 0.01
                                for k in ("rss", "gpu_allocated", "gpu_reserved"))
    res["memory_series"] = [[round(x, 2), r[1], r[2], r[3]] for x, r in downsample(list(zip(t_s, [rows[i] for i in keep])))]
    stem = f"{_dt.date.today().isoformat()}_{_short_device(device)}_long_run{('_' + args.tag) if args.tag else ''}"
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    series = {"RSS": rss}
    if device.type == "cuda":
        series.update({"GPU allocated": [rows[i][2] for i in keep], "GPU reserved": [rows[i][3] for i in keep]})
    title = (f"{res['device']}: {args.minutes:g} min of audio, tiny checkpoint {args.size}, {done}/{total_blocks} "
             f"blocks in {gen_s:.0f} s")
    res["plot"] = str((results / f"{stem}.png").relative_to(REPO) if results.is_relative_to(REPO) else results / f"{stem}.png")
    res["plot_backend"] = plot_memory(results / f"{stem}.png", title, t_s, series)
    with open(results / f"{stem}.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    return res


def _short_device(device) -> str:
    if device.type != "cuda":
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(device).lower()
    return next((k for k in ("h200", "h100", "a100", "l40", "b200") if k in name), "cuda")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        import av  # noqa: F401
    except ImportError:
        print("error: " + AV_HELP, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    res = run(args)
    summary = {k: res.get(k) for k in ("device", "complete", "blocks", "total_blocks", "generate_s", "blocks_per_s",
                                       "projected_full_s", "ms_per_block", "graphs_parity", "graphs", "duration_check",
                                       "av_drift", "cut_points", "plot")}
    summary["memory"] = {k: v for k, v in res["memory"].items()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
