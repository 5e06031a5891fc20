"""Thumbnails for ComfyUI's template browser: `example_workflows/<workflow>.jpg`.

ComfyUI frontend 1.27.10 shows a custom node pack's template `example_workflows/<name>.json` with
the image `/api/workflow_templates/<pack>/<name>.jpg` (served from the same folder) and titles it
with the file name; each thumbnail therefore carries the workflow's title (`build.TITLES`), the
reference image the workflows load (assets/avatar.png) and a real frame of a tiny run, captioned
as noise (the tiny checkpoint has random weights; no real weights were available here).

    ./dev.sh demo                                   # writes output/demo.mp4 (tiny model, CPU)
    python workflows/thumbnails.py output/demo.mp4  # needs Pillow and PyAV

Not standard-library only (unlike build.py / check.py): run it with the pack's environment.
"""

from __future__ import annotations

import sys
from pathlib import Path

import av
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import TITLES  # noqa: E402
from check import REPO, UI_DIR  # noqa: E402

SIZE = 512  # square: the template card shows a 256 px square (2x for sharp screens)
BACKGROUND = (30, 32, 36)
TEXT = (235, 235, 235)
DIM = (160, 164, 170)
CAPTION = "Frame of the tiny random model: noise, not the real model's video"


def video_frame(path: Path, at: float = 0.5) -> Image.Image:
    """The frame at fraction `at` of the video (decoded with PyAV)."""
    with av.open(str(path)) as box:
        frames = [f.to_image() for f in box.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return frames[min(len(frames) - 1, int(len(frames) * at))]


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: same look on every machine


def _fit(img: Image.Image, width: int) -> Image.Image:
    return img.convert("RGB").resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int, fill: tuple[int, int, int]) -> None:
    """Draw one line; ValueError if it would run past the card's margin."""
    font = _font(size)
    if xy[0] + draw.textlength(text, font=font) > SIZE - 12:
        raise ValueError(f"{text!r} is too long for the {SIZE} px thumbnail")
    draw.text(xy, text, font=font, fill=fill)


def thumbnail(title: str, line: str, setup: str, reference: Image.Image, frame: Image.Image) -> Image.Image:
    """[SIZE, SIZE] RGB card: title, what for, reference -> tiny frame, model and output, caption."""
    card = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(card)
    _text(draw, (24, 22), "Live Avatar", 22, DIM)
    _text(draw, (24, 52), title, 36, TEXT)
    _text(draw, (24, 100), line, 17, DIM)
    side = (SIZE - 3 * 24) // 2
    ref, gen = _fit(reference, side), _fit(frame, side)
    top = 150
    card.paste(ref, (24, top))
    card.paste(gen, (48 + side, top))
    below = top + max(ref.height, gen.height) + 8
    _text(draw, (24, below), "reference image", 15, DIM)
    _text(draw, (48 + side, below), "video frame (tiny model)", 15, DIM)
    _text(draw, (24, below + 48), setup, 17, TEXT)
    _text(draw, (24, SIZE - 70), CAPTION, 15, DIM)
    _text(draw, (24, SIZE - 44), "ComfyUI-LiveAvatar workflow", 15, DIM)
    return card


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    frame = video_frame(Path(argv[0]))
    reference = Image.open(REPO / "assets" / "avatar.png")
    for name, (title, line, setup) in TITLES.items():
        out = UI_DIR / f"{name}.jpg"
        thumbnail(title, line, setup, reference, frame).save(out, quality=88)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
