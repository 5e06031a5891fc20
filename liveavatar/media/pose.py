"""Optional pose-video loader (the reference's ``--pose_video`` conditioning input).

Frames are taken from the start of the video, one every ``max(1, round(src_fps / fps))`` source
frames (Python rounding, half to even: 50 fps -> every 2nd, 30 fps -> every frame), scaled to
[-1, 1], resized and cropped to ``H x W``, and padded at the end with frames of -1 (black) up to
the requested count.

Resize and crop per mode (same meaning as ``liveavatar.media.image``):

* ``"exact"``: scale to cover ``W x H`` (bilinear, antialiased), centre-crop; no padding.
* ``"area"``: the reference's tensor path: shorter side -> ``min(W, H)`` (bilinear, antialiased),
  centre crop; where the frame is smaller than the crop the reference pads with 0 AFTER scaling to
  [-1, 1], i.e. mid-grey, not black. We keep that value in this mode for parity.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch
import torch.nn.functional as F

from .image import FIT_MODES


def frame_interval(src_fps: float, fps: float) -> int:
    """Source frames per sampled frame: ``max(1, round(src_fps / fps))``."""
    return max(1, round(src_fps / fps))


def _sampled_frames(path: Path, fps: float) -> Iterator[np.ndarray]:
    """uint8 ``[h, w, 3]`` frames from the start, one every `frame_interval` source frames."""
    with av.open(str(path)) as c:
        if not c.streams.video:
            raise ValueError(f"pose_video: {path} has no video stream")
        stream = c.streams.video[0]
        src_fps = float(stream.average_rate or stream.guessed_rate or fps)
        step = frame_interval(src_fps, fps)
        for k, frame in enumerate(c.decode(stream)):
            if k % step == 0:
                yield frame.to_ndarray(format="rgb24")


def _resize_crop(x: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    """``[n, 3, h, w]`` in [-1, 1] -> ``[n, 3, height, width]``."""
    h, w = x.shape[-2:]
    if mode == "exact":
        s = max(width / w, height / h)
        nh, nw = max(height, round(h * s)), max(width, round(w * s))
    else:
        short = min(width, height)
        nh, nw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    if nh < height or nw < width:  # only in mode "area": pad with 0, as the reference does
        ph, pw = max(0, height - nh), max(0, width - nw)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        nh, nw = x.shape[-2:]
    top = int(round((nh - height) / 2.0))
    left = int(round((nw - width) / 2.0))
    return x[..., top:top + height, left:left + width]


def iter_pose_chunks(
    path: str | os.PathLike,
    width: int,
    height: int,
    chunk_frames: int,
    num_chunks: int,
    fps: float = 25,
    mode: str = "exact",
) -> Iterator[torch.Tensor]:
    """Yield `num_chunks` tensors ``[1, 3, chunk_frames, H, W]`` in [-1, 1], streaming from disk.

    After the video ends the chunks are filled with -1 frames.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(FIT_MODES)}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"pose_video: no file at {p if p.is_absolute() else f'{p} (= {p.resolve()})'}")
    if chunk_frames <= 0 or num_chunks < 0 or width <= 0 or height <= 0:
        raise ValueError(f"pose_video: bad sizes (chunk_frames={chunk_frames}, num_chunks={num_chunks}, {width}x{height})")
    try:
        frames = _sampled_frames(p, fps)
        for _ in range(num_chunks):
            buf: list[np.ndarray] = []
            for arr in frames:
                buf.append(arr)
                if len(buf) == chunk_frames:
                    break
            out = torch.full((chunk_frames, 3, height, width), -1.0)
            if buf:
                x = torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1.0
                out[: len(buf)] = _resize_crop(x, width, height, mode)
            yield out.permute(1, 0, 2, 3).unsqueeze(0)
    except av.error.FFmpegError as exc:
        raise ValueError(f"pose_video: {p} could not be decoded ({exc})") from exc


def load_pose_video(
    path: str | os.PathLike,
    width: int,
    height: int,
    num_frames: int,
    fps: float = 25,
    mode: str = "exact",
) -> torch.Tensor:
    """Pose conditioning video -> ``[1, 3, num_frames, H, W]`` float32 in [-1, 1] (-1 padded).

    Holds all frames (about 3 MB per frame at 704x384); ``iter_pose_chunks`` streams instead.
    """
    return next(iter_pose_chunks(path, width, height, num_frames, 1, fps, mode))


__all__ = ["frame_interval", "iter_pose_chunks", "load_pose_video"]
