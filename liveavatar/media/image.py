"""Reference-image loading and preprocessing.

Decisions (documented here, tested in tests/test_image.py):

* ``load_image`` applies the EXIF orientation (the reference does not), converts every PIL mode to
  8-bit RGB (palette, greyscale, CMYK, 16-bit and 32-bit integer greyscale, float), and composites
  transparency on WHITE (the reference drops alpha, which shows whatever colour hides under
  transparent pixels: usually black for cut-outs). White because a cut-out portrait on white is
  the common studio look and black would merge with dark hair and clothes.
* ``prepare_reference(img, W, H, mode)`` gives the pixels the VAE encodes, ``[1, 3, 1, H, W]``:
  - mode ``"exact"`` (default, pairs with ``sizes.resolve_output_size(mode="exact")``): scale the
    image to COVER ``W x H`` (scale = max(W/w, H/h)), bilinear with antialiasing, centre-crop.
    The frame is always filled; nothing is padded, at most one side is cut.
  - mode ``"area"`` (the reference's rule, pairs with ``mode="area"``): scale so the SHORTER image
    side equals ``min(W, H)`` (long side truncated to int), bilinear with antialiasing, then
    centre-crop to ``H x W``; where the scaled image is smaller than the crop, pad with black
    (left/top get the floor of the half, right/bottom the ceiling). A 720x400 image at 704x384
    becomes 691x384 plus 6 + 7 black columns.
  Values: ``x / 255 * 2 - 1`` in float32, so [-1, 1].
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger("liveavatar")

FIT_MODES: tuple[str, ...] = ("exact", "area")
BACKGROUND = (255, 255, 255)  # transparency is composited on white
MAX_IMAGE_PIXELS = 8192 * 8192  # larger files are refused before decoding (memory, decompression bombs)


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 8 bits ('L')."""
    arr = np.asarray(img)
    if img.mode == "F":
        top = float(np.nanmax(arr)) if arr.size else 1.0
        scale = 255.0 if top <= 1.0 else 1.0
        arr = np.nan_to_num(arr.astype(np.float64) * scale)
    else:  # I;16*, I: 16-bit data, or 8-bit data stored in int32
        arr = arr.astype(np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if top > 255:
            arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any PIL image -> 8-bit RGB; transparency composited over `background`."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit_grey(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB with its EXIF orientation applied (see module notes).

    Relative paths are taken from the current directory. Raises ``FileNotFoundError`` or
    ``ValueError`` naming the path.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        where = p if p.is_absolute() else f"{p} (= {p.resolve()})"
        raise FileNotFoundError(f"image: no file at {where}")
    try:
        with Image.open(p) as raw:
            if raw.width * raw.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image: {p} is {raw.width}x{raw.height} pixels, more than {MAX_IMAGE_PIXELS} "
                                 "(8192x8192); scale it down (the video is at most 1280 pixels wide)")
            raw.load()
            img = ImageOps.exif_transpose(raw)
            return to_rgb(img)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked when the header is read
        raise ValueError(f"image: {p} is too large to decode ({exc}); scale it down") from None
    except UnidentifiedImageError as exc:
        raise ValueError(f"image: {p} is not an image Pillow can read (use PNG, JPEG or WebP)") from exc
    except OSError as exc:
        raise ValueError(f"image: {p} could not be decoded ({exc})") from exc


def image_from_tensor(t: torch.Tensor | np.ndarray) -> Image.Image:
    """ComfyUI IMAGE -> PIL RGB. `t`: ``[H, W, 3]`` or ``[B, H, W, 3]`` float in 0..1.

    A batch uses its first image (logged). Values are clamped and rounded to 8 bits.
    """
    arr = t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)
    if arr.ndim == 4:
        if arr.shape[0] == 0:
            raise ValueError("image: the IMAGE batch is empty")
        if arr.shape[0] > 1:
            logger.warning("image: IMAGE batch of %d, using the first image", arr.shape[0])
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image: expected an IMAGE tensor [H, W, 3] or [B, H, W, 3], got shape {tuple(arr.shape)}")
    u8 = np.clip(np.rint(np.nan_to_num(arr) * 255.0), 0, 255).astype(np.uint8)
    if u8.shape[-1] == 1:
        return Image.fromarray(u8[..., 0], mode="L").convert("RGB")
    if u8.shape[-1] == 4:
        return to_rgb(Image.fromarray(u8, mode="RGBA"))
    return Image.fromarray(u8, mode="RGB")


def _reference_resize_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """The reference's rule: shorter side -> min(W, H), then centre crop with black padding."""
    w, h = img.size
    short = min(width, height)
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if new_w < width or new_h < height:
        pad_w, pad_h = max(0, width - new_w), max(0, height - new_h)
        canvas = Image.new("RGB", (new_w + pad_w, new_h + pad_h), (0, 0, 0))
        canvas.paste(img, (pad_w // 2, pad_h // 2))
        img, (new_w, new_h) = canvas, canvas.size
    # Python's round() (half to even), as in the crop the reference uses.
    top = int(round((new_h - height) / 2.0))
    left = int(round((new_w - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def fit_image(img: Image.Image, width: int, height: int, mode: str = "exact") -> Image.Image:
    """Resize and crop an RGB image to exactly ``width x height`` by the rule of `mode`."""
    if mode not in FIT_MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(FIT_MODES)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"size: {width}x{height} must be positive")
    img = to_rgb(img)
    if mode == "exact":
        w, h = img.size
        kept = min(w / h * height / width, h / w * width / height)  # share of the image kept
        if kept < 0.75:
            side = "height" if w / h < width / height else "width"
            logger.warning(
                "reference image %dx%d is cropped to fill %dx%d: only %d%% of its %s is kept; "
                "use an image closer to that shape or mode 'area'", w, h, width, height, round(100 * kept), side,
            )
        return ImageOps.fit(img, (width, height), method=Image.Resampling.BILINEAR, centering=(0.5, 0.5))
    return _reference_resize_crop(img, width, height)


def pil_to_unit_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``[3, H, W]`` float32 in [-1, 1] (``x / 255 * 2 - 1``)."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div(255.0)
    return x * 2 - 1.0


def prepare_reference(img: Image.Image, width: int, height: int, mode: str = "exact") -> torch.Tensor:
    """Reference image -> VAE input ``[1, 3, 1, H, W]`` float32 in [-1, 1], exactly ``H x W``.

    mode "exact": cover + centre crop; mode "area": the reference's shorter-side resize + centre
    crop with black padding (module notes).
    """
    x = pil_to_unit_tensor(fit_image(img, width, height, mode))
    return x[None, :, None]


__all__ = [
    "FIT_MODES", "BACKGROUND", "to_rgb", "load_image", "image_from_tensor", "fit_image",
    "pil_to_unit_tensor", "prepare_reference",
]
