"""Output-size parsing and the rule that maps (reference image, requested size) to the video size.

Sizes are written width first: ``"704*384"`` means 704 pixels wide, 384 high. ``parse_size`` accepts
``W*H``, ``WxH``, ``WXH`` (and the typographic ``W×H``) with optional spaces around the separator
and at the ends.

Which sizes are accepted (our decision, see the spec "Our decisions"):

* every key the reference ships (``StreamConfig.sizes``: ``704*384``, ``720*400``, ...), and
* any ``W*H`` whose sides are positive multiples of ``StreamConfig.size_multiple`` (64), at most
  the largest trained side (1280), and whose area is at most the largest trained area (the largest
  key, 1280*720 = 921,600 pixels).

How a size becomes the output size (``resolve_output_size``), two modes:

* ``"area"`` (default; the reference's behaviour, as decided in the spec): see below.
* ``"exact"``: the video is exactly the ``W x H`` that was typed. Both
  sides must be multiples of 64 (the reference always produces multiples of 64); otherwise a
  ``SizeError`` names the nearest valid sizes. The reference image is scaled to cover the frame and
  centre-cropped (``liveavatar.media.image.prepare_reference``), so nothing is padded.
* ``"area"``: the string is only an area budget ``W*H``; the image's
  aspect ratio decides the shape and both sides are snapped to multiples of 64 by the reference's
  search (``area_fit``), e.g. a 720x400 image with ``"704*384"`` gives 704x384, a 640x480 image
  with ``"720*400"`` gives 640x448.

The resolved size is logged once per call at INFO on the ``liveavatar`` logger as
``effective size 704x384 (requested '704x384', mode area)``; callers call this once per job.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Sequence

from .config import DEFAULT_STREAM, StreamConfig

logger = logging.getLogger("liveavatar")

MODES: tuple[str, ...] = ("area", "exact")
DEFAULT_MODE = "area"  # the one default of the library, the CLI and the nodes (the reference's rule)

# Width, separator, height; the separator may be "*", "x", "X" or the multiplication sign.
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[*xX\u00d7]\s*(\d+)\s*$")


class SizeError(ValueError):
    """A size the model cannot produce. `field` is the argument name; the message lists valid sizes."""

    def __init__(self, message: str, field: str = "size") -> None:
        super().__init__(message)
        self.field = field


def _key_dims(stream: StreamConfig) -> list[tuple[int, int]]:
    dims = []
    for key in stream.sizes:
        w, h = key.split("*")
        dims.append((int(w), int(h)))
    return dims


def max_area(stream: StreamConfig = DEFAULT_STREAM) -> int:
    """Largest accepted area in pixels: the largest of the reference's size keys (1280*720)."""
    return max(w * h for w, h in _key_dims(stream))


def max_side(stream: StreamConfig = DEFAULT_STREAM) -> int:
    """Largest accepted side in pixels: the longest side among the reference's size keys (1280)."""
    return max(max(w, h) for w, h in _key_dims(stream))


def valid_sizes(stream: StreamConfig = DEFAULT_STREAM) -> list[str]:
    """The named sizes, as ``"W*H"`` strings (the reference's keys, in its order).

    Any other ``W*H`` is accepted too when both sides are multiples of ``stream.size_multiple`` and
    the area is at most ``max_area(stream)``; ``size_rule(stream)`` words that rule for messages.
    """
    return list(stream.sizes)


def exact_sizes(stream: StreamConfig = DEFAULT_STREAM) -> list[str]:
    """The named sizes that mode "exact" can produce as typed (both sides multiples of 64)."""
    m = stream.size_multiple
    return [f"{w}*{h}" for w, h in _key_dims(stream) if w % m == 0 and h % m == 0]


def size_rule(stream: StreamConfig = DEFAULT_STREAM) -> str:
    """One sentence describing every accepted size (used in error messages)."""
    m = stream.size_multiple
    return (
        f"valid sizes: {', '.join(valid_sizes(stream))}; or any W*H whose sides are multiples "
        f"of {m} (from {m} to {max_side(stream)}) with W*H <= {max_area(stream)} pixels"
    )


def _is_valid(w: int, h: int, stream: StreamConfig) -> bool:
    if (w, h) in _key_dims(stream):
        return True
    m = stream.size_multiple
    top = max_side(stream)
    return (
        m <= w <= top and m <= h <= top and w % m == 0 and h % m == 0 and w * h <= max_area(stream)
    )


def nearest_valid(w: int, h: int, stream: StreamConfig = DEFAULT_STREAM, count: int = 4) -> list[str]:
    """Up to `count` sizes with both sides multiples of 64 closest to ``w x h`` (as ``"WxH"``)."""
    m = stream.size_multiple
    limit, top = max_area(stream), max_side(stream) // m * m

    def around(v: int) -> list[int]:
        lo = min(top, max(m, (v // m) * m))
        return sorted({lo, min(top, lo + m), max(m, lo - m)})

    options = [(cw, ch) for cw in around(w) for ch in around(h) if cw * ch <= limit]
    options.sort(key=lambda s: (abs(s[0] - w) + abs(s[1] - h), -s[0] * s[1]))
    return [f"{cw}x{ch}" for cw, ch in options[:count]]


def parse_size(text: str | Sequence[int], stream: StreamConfig = DEFAULT_STREAM) -> tuple[int, int]:
    """Parse ``"W*H"`` / ``"WxH"`` / ``"W X H"`` into ``(W, H)`` pixels and check it is accepted.

    A ``(W, H)`` pair of ints is accepted as well. Raises ``SizeError`` (field ``"size"``) naming
    the valid sizes, and the nearest valid ones when the numbers were readable.
    """
    if isinstance(text, (tuple, list)) and len(text) == 2 and all(isinstance(v, int) for v in text):
        w, h = int(text[0]), int(text[1])
        shown = f"{w}*{h}"
    elif isinstance(text, str):
        match = _SIZE_RE.match(text)
        if not match:
            raise SizeError(
                f"size: {text!r} is not a size; write it as W*H or WxH, width first "
                f"(e.g. '704*384' or '704x384'); {size_rule(stream)}"
            )
        w, h = int(match.group(1)), int(match.group(2))
        shown = text.strip()
    else:
        raise SizeError(f"size: expected a string like '704*384', got {type(text).__name__}; {size_rule(stream)}")
    if w <= 0 or h <= 0:
        raise SizeError(f"size: {shown!r} has a zero side; {size_rule(stream)}")
    if not _is_valid(w, h, stream):
        near = nearest_valid(w, h, stream)
        hint = f" (nearest valid: {', '.join(near)})" if near else ""
        raise SizeError(f"size: {shown!r} is not supported{hint}; {size_rule(stream)}")
    return w, h


@dataclass(frozen=True)
class OutputSize:
    """A resolved output size: the video is `width` x `height` pixels (multiples of 64).

    mode: how the reference image is fitted to it ("exact": scaled to cover and centre-cropped;
    "area": scaled, aspect kept); requested: the size text the user typed (for messages).
    Resolved once at the edge (`resolve_size`) and passed down, also to worker ranks.
    """

    width: int
    height: int
    mode: str = DEFAULT_MODE
    requested: str = ""

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(h, w) of the latent grid: pixels / 8."""
        return self.height // 8, self.width // 8


def resolve_size(image_wh: tuple[int, int], size: "str | Sequence[int] | OutputSize", mode: str = DEFAULT_MODE,
                 stream: StreamConfig = DEFAULT_STREAM) -> OutputSize:
    """`resolve_output_size` as an `OutputSize` (an `OutputSize` is returned as it is)."""
    if isinstance(size, OutputSize):
        return size
    w, h = resolve_output_size(image_wh, size, mode=mode, stream=stream)
    requested = size.strip() if isinstance(size, str) else f"{w}*{h}"
    return OutputSize(w, h, mode, requested)


def _round_up(v: int, divisor: int) -> int:
    return -(-v // divisor) * divisor


def area_fit(width: int, height: int, area: int, divisor: int = 64) -> tuple[int, int]:
    """The reference's size search: the largest ``(W, H)``, multiples of `divisor`, that keeps the
    image's aspect ratio and whose area is at most `area` pixels.

    Behaviour reproduced from the reference (including its oddities):

    * images already within the budget are scaled by at most 1, so the result is at most the image
      size rounded UP to the next multiple (a 300x300 image gives 320x320);
    * otherwise the scale runs from ``sqrt(area / (w h))`` down to the root of the worst-case
      padding quadratic, computed with ``b^2 - 2ac`` under the root (not ``4ac``), in 100 steps;
    * each candidate truncates ``w*s``, ``h*s`` to ints and rounds them up to the divisor; the first
      that fits is returned;
    * if none fits, the fallback floors ``sqrt(area * ar)``, ``sqrt(area / ar)`` (``ar = w/h``) to
      the divisor, or the image size floored to the divisor when that would not be smaller.

    Args: `width`, `height` of the image in pixels; `area` budget in pixels. Returns ``(W, H)``.
    """
    if width <= 0 or height <= 0:
        raise SizeError(f"image size {width}x{height} must be positive", field="image")
    w, h = width, height
    if w * h <= area:
        low, high = 0.1, 1.0
    else:
        d = divisor - 1
        a = w * h
        b = d * (w + h)
        c = d * d - area
        low = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)
        high = math.sqrt(area / a)
    for i in range(100):
        s = high - (high - low) * i / 100
        nw = _round_up(int(w * s), divisor)
        nh = _round_up(int(h * s), divisor)
        if nw * nh <= area:
            out = (nw, nh)
            break
    else:
        ratio = w / h
        tw = int((area * ratio) ** 0.5 // divisor * divisor)
        th = int((area / ratio) ** 0.5 // divisor * divisor)
        if tw >= w or th >= h:
            tw, th = w // divisor * divisor, h // divisor * divisor
        out = (tw, th)
    if min(out) < divisor:
        raise SizeError(
            f"image {width}x{height}: its aspect ratio is too extreme for an area of {area} pixels "
            f"(result {out[0]}x{out[1]}); crop the image or use mode 'exact'",
            field="image",
        )
    return out


MIN_IMAGE_SIDE = 32  # pixels: a smaller reference image carries no face to animate


def _check_image_size(image_wh) -> None:
    """A reference image of at least `MIN_IMAGE_SIDE` pixels per side (SizeError, field "image")."""
    try:
        iw, ih = int(image_wh[0]), int(image_wh[1])
    except (TypeError, ValueError, IndexError) as exc:
        raise SizeError(f"image_wh: expected (width, height), got {image_wh!r}", field="image") from exc
    if min(iw, ih) < MIN_IMAGE_SIDE:
        raise SizeError(f"image: {iw}x{ih} is too small, the reference needs at least {MIN_IMAGE_SIDE} pixels "
                        f"per side; use a photo of the person (e.g. 512x512 or larger)", field="image")


def resolve_output_size(
    image_wh: tuple[int, int],
    size: str | Sequence[int],
    mode: str = DEFAULT_MODE,
    stream: StreamConfig = DEFAULT_STREAM,
) -> tuple[int, int]:
    """Output video size ``(W, H)`` in pixels for a reference image of ``image_wh = (w, h)``.

    mode ``"exact"``: exactly the typed size (both sides multiples of 64, else ``SizeError`` with
    the nearest valid sizes); the image does not matter. mode ``"area"``: ``area_fit(w, h, W*H)``,
    the reference's rule. Logs ``effective size WxH (...)`` once at INFO on ``liveavatar``.
    """
    if mode not in MODES:
        raise SizeError(f"mode: {mode!r} is not one of {', '.join(MODES)}", field="mode")
    _check_image_size(image_wh)
    w_req, h_req = parse_size(size, stream)
    requested = size.strip() if isinstance(size, str) else f"{w_req}*{h_req}"
    m = stream.size_multiple
    if mode == "exact":
        if w_req % m or h_req % m:
            near = nearest_valid(w_req, h_req, stream)
            raise SizeError(
                f"size: {requested!r} cannot be produced exactly: both sides must be multiples of "
                f"{m}; nearest valid: {', '.join(near)} (or use mode 'area' to treat "
                f"{requested!r} as an area budget and keep the image's aspect ratio)"
            )
        out = (w_req, h_req)
        logger.info("effective size %dx%d (requested %r, mode exact)", out[0], out[1], requested)
        return out
    try:
        iw, ih = int(image_wh[0]), int(image_wh[1])
    except (TypeError, ValueError, IndexError) as exc:
        raise SizeError(f"image_wh: expected (width, height), got {image_wh!r}", field="image") from exc
    out = area_fit(iw, ih, w_req * h_req, m)
    logger.info(
        "effective size %dx%d (requested %r, mode area, image %dx%d)", out[0], out[1], requested, iw, ih
    )
    return out


__all__ = [
    "SizeError", "MODES", "DEFAULT_MODE", "OutputSize", "resolve_size", "parse_size", "valid_sizes", "exact_sizes", "size_rule", "max_area", "max_side",
    "nearest_valid", "area_fit", "resolve_output_size",
]
