"""Regenerate the example inputs in this folder.

    python assets/make_assets.py            # writes avatar.png and speech.wav next to this file

avatar.png: a cartoon head-and-shoulders portrait drawn with Pillow, 704x384 (the default output
size, so no crop happens). speech.wav: one sentence spoken by espeak-ng
(``apt-get install espeak-ng``), resampled to 16 kHz mono 16-bit with PyAV.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
SIZE = (704, 384)
TEXT = "Hello, I am a live avatar made with ComfyUI."
RATE = 16000


def draw_avatar(size: tuple[int, int] = SIZE) -> Image.Image:
    w, h = size
    # soft vertical background gradient
    top, bottom = np.array([70, 110, 160], np.float32), np.array([170, 200, 225], np.float32)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    bg = (top * (1 - t) + bottom * t).repeat(w, 1).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(img)
    cx = w // 2
    skin, skin_dark = (236, 192, 160), (214, 160, 128)
    hair, shirt = (70, 45, 30), (40, 90, 70)
    # shoulders and neck
    d.ellipse((cx - 190, 300, cx + 190, 520), fill=shirt)
    d.polygon([(cx - 40, 300), (cx + 40, 300), (cx, 345)], fill=skin_dark)
    d.rectangle((cx - 34, 230, cx + 34, 305), fill=skin_dark)
    # hair behind the head, ears, face
    d.ellipse((cx - 100, 28, cx + 100, 250), fill=hair)
    d.ellipse((cx - 98, 125, cx - 70, 175), fill=skin_dark)
    d.ellipse((cx + 70, 125, cx + 98, 175), fill=skin_dark)
    d.ellipse((cx - 80, 55, cx + 80, 265), fill=skin)
    d.chord((cx - 86, 36, cx + 86, 150), 180, 360, fill=hair)  # fringe
    # eyes, brows, nose, mouth
    for sx in (-1, 1):
        ex = cx + sx * 34
        d.ellipse((ex - 17, 130, ex + 17, 150), fill=(250, 250, 250))
        d.ellipse((ex - 8, 131, ex + 8, 149), fill=(60, 90, 60))
        d.ellipse((ex - 4, 136, ex + 4, 144), fill=(15, 15, 15))
        d.line((ex - 18, 118, ex + 16, 114 if sx < 0 else 118), fill=hair, width=5)
    d.line((cx, 150, cx - 8, 190, cx + 4, 193), fill=skin_dark, width=3)
    d.chord((cx - 30, 205, cx + 30, 235), 0, 180, fill=(170, 70, 70))
    d.line((cx - 30, 220, cx + 30, 220), fill=(130, 50, 50), width=2)
    # cheeks
    for sx in (-1, 1):
        d.ellipse((cx + sx * 52 - 14, 185, cx + sx * 52 + 14, 203), fill=(240, 170, 150))
    return img.filter(ImageFilter.SMOOTH)


def speak(text: str = TEXT, rate: int = RATE) -> np.ndarray:
    """espeak-ng -> int16 mono samples at `rate` Hz."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
        out = []
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        with av.open(str(raw)) as c:
            for frame in c.decode(audio=0):
                out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())


def main() -> int:
    draw_avatar().save(HERE / "avatar.png", optimize=True)
    write_wav(HERE / "speech.wav", speak())
    for name in ("avatar.png", "speech.wav"):
        print(name, (HERE / name).stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
