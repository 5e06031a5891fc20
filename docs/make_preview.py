"""Make `assets/demo_preview.png` (the README picture) from the demo's own output.

    ./dev.sh demo                                  # writes output/demo.mp4
    .venv/bin/python docs/make_preview.py          # -> assets/demo_preview.png

Left: the inputs the demo uses (assets/avatar.png and the waveform of assets/speech.wav).
Right: five frames of output/demo.mp4 with their times, above the audio the mp4 carries.
Everything is drawn with Pillow from files the pack made; nothing else is read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
BG, FG, DIM = (250, 250, 250), (30, 30, 30), (120, 120, 120)


def decode(path: Path) -> tuple[list[Image.Image], float, np.ndarray]:
    """All video frames (PIL), fps, and the audio as one mono float array."""
    with av.open(str(path)) as c:
        fps = float(c.streams.video[0].average_rate)
        frames = [f.to_image() for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        chunks = [f.to_ndarray().mean(axis=0) for f in c.decode(audio=0)] if c.streams.audio else []
    return frames, fps, (np.concatenate(chunks) if chunks else np.zeros(1))


def waveform(samples: np.ndarray, width: int, height: int, color=(60, 90, 160)) -> Image.Image:
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    s = samples.astype(np.float64)
    peak = float(np.abs(s).max()) or 1.0
    edges = np.linspace(0, len(s), width + 1).astype(int)
    mid = height / 2
    for x in range(width):
        seg = s[edges[x]:max(edges[x + 1], edges[x] + 1)]
        lo, hi = float(seg.min()) / peak, float(seg.max()) / peak
        d.line([(x, mid - hi * (mid - 2)), (x, mid - lo * (mid - 2))], fill=color)
    return img


def main(out: Path = REPO / "assets" / "demo_preview.png") -> None:
    video = REPO / "output" / "demo.mp4"
    if not video.is_file():
        sys.exit(f"{video} not found: run ./dev.sh demo first")
    frames, fps, audio = decode(video)
    picks = np.linspace(0, len(frames) - 1, 5).round().astype(int)
    fw, fh = frames[0].size
    font = ImageFont.load_default(size=13)

    avatar = Image.open(REPO / "assets" / "avatar.png").convert("RGB")
    aw = round(avatar.width * fh / avatar.height)
    avatar = avatar.resize((aw, fh), Image.LANCZOS)
    with av.open(str(REPO / "assets" / "speech.wav")) as c:
        speech = np.concatenate([f.to_ndarray().mean(axis=0) for f in c.decode(audio=0)])

    gap, top, wave_h, pad = 8, 22, 40, 10
    right_x = pad + aw + 40
    width = right_x + len(picks) * (fw + gap) - gap + pad
    height = top + fh + gap + wave_h + 22 + pad
    canvas = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(canvas)

    d.text((pad, 4), "input: assets/avatar.png + speech.wav", fill=FG, font=font)
    canvas.paste(avatar, (pad, top))
    canvas.paste(waveform(speech, aw, wave_h), (pad, top + fh + gap))
    d.text((pad + aw + 12, top + fh // 2 - 8), "->", fill=FG, font=font)

    d.text((right_x, 4), f"./dev.sh demo -> output/demo.mp4 ({fw}x{fh}, {fps:g} fps, "
                         f"{len(frames)} frames; tiny RANDOM weights, so the frames are noise)",
           fill=FG, font=font)
    for i, k in enumerate(picks):
        x = right_x + i * (fw + gap)
        canvas.paste(frames[k], (x, top))
    strip_w = len(picks) * (fw + gap) - gap
    canvas.paste(waveform(audio, strip_w, wave_h, color=(160, 80, 60)), (right_x, top + fh + gap))
    for i, k in enumerate(picks):
        x = right_x + i * (fw + gap)
        d.text((x, top + fh + gap + wave_h + 4), f"frame {k} (t={k / fps:.2f} s)", fill=DIM, font=font)
    d.text((pad, top + fh + gap + wave_h + 4), "speech in", fill=DIM, font=font)

    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.quantize(colors=128, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB, {width}x{height})")


if __name__ == "__main__":
    main()
