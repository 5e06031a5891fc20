"""Streaming mp4 writer (H.264 + AAC) in-process with PyAV, and a PyAV probe.

``VideoWriter`` encodes frames and audio as they arrive; nothing but the encoder's own look-ahead
and a short audio buffer is held in memory, so a run of any length has constant memory.

The file is a fragmented mp4 written by ``mp4_fragments.FragmentFile``: every ``write_frames`` /
``write_audio`` call ends with its encoded packets on disk as whole fragments, so a process killed
at any moment leaves a file that players and PyAV open, holding every frame written before the
last call returned (the video encoder runs without look-ahead, ``tune=zerolatency``; the audio
waits for whole 1024-sample AAC frames and the encoder holds 2, so up to 3 frames, 192 ms at
16 kHz, reach the disk only with the next call or ``close()``). The
first write waits until both tracks have a packet. ``delay_moov`` (the header waits for the first
fragment) together with ``use_editlist=1`` lets the muxer record the real start of each track in an
edit list: the video starts at t = 0 and the AAC priming samples sit before t = 0, so audio and
video start together (without these flags the muxer shifts both tracks by different amounts and
the audio runs 16 ms late and 64 ms long).

Audio/video lock: audio is encoded only up to the duration of the frames written so far; on
``close()`` the audio is cut or padded with silence to exactly ``frames / fps`` seconds (rounded to
whole samples), so the audio track ends with the last video frame.
"""

from __future__ import annotations

import io
import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from .mp4_fragments import FragmentFile

logger = logging.getLogger("liveavatar")

H264_FALLBACKS: tuple[str, ...] = ("libx264", "libopenh264", "h264", "mpeg4")


def available_video_encoder(preferred: str = "libx264") -> str:
    """`preferred` if this PyAV build can encode with it, else the first of ``H264_FALLBACKS``."""
    for name in dict.fromkeys((preferred, *H264_FALLBACKS)):
        try:
            av.codec.Codec(name, "w")
        except Exception:  # unknown to this FFmpeg build
            continue
        return name
    raise RuntimeError(f"video: no H.264 or MPEG-4 encoder in this PyAV build (tried {preferred}, {H264_FALLBACKS})")


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """Model output ``[3, N, H, W]`` or ``[1, 3, N, H, W]`` in [-1, 1] -> ``uint8 [N, H, W, 3]``.

    ``(x + 1) / 2`` clamped to [0, 1], times 255, rounded (the reference truncates; rounding is the
    closer 8-bit value).
    """
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"video: batch of {video.shape[0]}; write one video at a time")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video: expected [3, N, H, W] or [1, 3, N, H, W], got {tuple(video.shape)}")
    x = ((video.detach().float() + 1.0) / 2.0).clamp_(0.0, 1.0).mul_(255.0).round_()
    return x.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu()


def _to_fraction(fps: float | int | Fraction) -> Fraction:
    f = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
    if f <= 0:
        raise ValueError(f"fps: must be positive, got {fps}")
    return f


class VideoWriter:
    """Stream frames (and mono audio) to an mp4 file. Use as a context manager.

    Args:
        path: output file (parent folders are created); relative paths are from the current dir.
        width, height: frame size in pixels (even numbers; H.264 4:2:0).
        fps: frames per second (int, float or Fraction).
        audio_rate: sample rate of the audio passed to ``write_audio`` in Hz (an AAC rate such as
            16000), or None for a silent video without an audio track.
        crf: libx264 quality (0 best .. 51 worst); other encoders get a bit rate instead.
        codec: preferred encoder; falls back to another available H.264 or MPEG-4 encoder.
        fragmented: write a fragmented mp4 (crash-safe, on disk after every write call); False
            writes a classic mp4 whose index is written only by ``close()``.
        keyframe_interval_s: seconds between keyframes.
        preset: libx264 speed preset ("veryfast": about 250 fps at 704x384 and 55 fps at 1280x704
            on 2 CPU cores, so the writer keeps up with real time; "fast" is 6x slower).
        audio_bitrate: AAC bit rate in bit/s.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: float | int | Fraction = 25,
        audio_rate: int | None = 16000,
        crf: int = 18,
        codec: str = "libx264",
        fragmented: bool = True,
        keyframe_interval_s: float = 1.0,
        preset: str = "veryfast",
        audio_bitrate: int = 64000,
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"video: size {width}x{height} must be positive even numbers")
        self.path = Path(path).expanduser()
        self.width, self.height = int(width), int(height)
        self.fps = _to_fraction(fps)
        self.audio_rate = int(audio_rate) if audio_rate else None
        if self.audio_rate is not None:
            rates = av.codec.Codec("aac", "w").audio_rates or ()
            if rates and self.audio_rate not in rates:
                raise ValueError(f"audio_rate: {self.audio_rate} Hz is not an AAC rate; use one of {sorted(rates)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fragments: FragmentFile | None = None
        try:
            if fragmented:
                # encoders only: packets are muxed per write call by FragmentFile
                self._container = av.open(io.BytesIO(), "w", format="mp4")
                self._sink = open(self.path, "wb", buffering=0)  # noqa: SIM115 (handed to FragmentFile)
            else:
                self._container = av.open(str(self.path), "w", format="mp4")
        except (OSError, av.error.FFmpegError) as exc:
            raise OSError(getattr(exc, "errno", None), f"video: cannot write {self.path} ({exc})") from exc

        self.codec = available_video_encoder(codec)
        v = self._container.add_stream(self.codec, rate=self.fps)
        v.width, v.height, v.pix_fmt = self.width, self.height, "yuv420p"
        v.codec_context.gop_size = max(1, round(float(self.fps) * keyframe_interval_s))
        if self.codec == "libx264":
            v.options = {"crf": str(int(crf)), "preset": preset}
            if fragmented:  # no look-ahead: every frame's packet exists when write_frames returns
                v.options["tune"] = "zerolatency"
        else:  # encoders without a constant-quality knob here: about 0.2 bit per pixel
            v.bit_rate = int(0.2 * self.width * self.height * float(self.fps))
        self._v = v
        self._a = None
        if self.audio_rate is not None:
            a = self._container.add_stream("aac", rate=self.audio_rate)
            a.layout = "mono"
            a.bit_rate = int(audio_bitrate)
            self._a = a
        if fragmented:
            self._container.start_encoding()  # opens the encoders (global headers, as in an mp4)
            self._fragments = FragmentFile(self._sink, self.path, [s for s in (self._v, self._a) if s is not None])
        self._frames = 0
        self._a_buf = np.zeros(0, np.float32)
        self._a_sent = 0  # samples handed to the encoder
        self._a_received = 0  # samples passed to write_audio
        self._closed = False
        self._info: dict[str, Any] | None = None

    # -- inputs -------------------------------------------------------------------------------
    def _frames_uint8(self, frames: Any) -> np.ndarray:
        arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1:3] != (self.height, self.width):
            raise ValueError(
                f"frames: got shape {tuple(arr.shape)}, expected [n, {self.height}, {self.width}, 3] "
                f"(uint8 0..255 or float 0..1, [n, H, W, RGB]) for a {self.width}x{self.height} video"
            )
        if arr.dtype == np.uint8:
            return np.ascontiguousarray(arr)
        if np.issubdtype(arr.dtype, np.floating):
            return np.clip(np.rint(np.nan_to_num(arr.astype(np.float32)) * 255.0), 0, 255).astype(np.uint8)
        raise ValueError(f"frames: dtype {arr.dtype} not supported; pass uint8 0..255 or float 0..1")

    def write_frames(self, frames: Any) -> None:
        """Encode frames: ``[n, H, W, 3]`` (or one ``[H, W, 3]``), uint8 or float in 0..1, numpy/torch."""
        self._check_open()
        arr = self._frames_uint8(frames)
        for img in arr:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = self._frames
            frame.time_base = 1 / self.fps
            self._mux(self._v.encode(frame))
            self._frames += 1
        self._drain_audio()
        self._flush()

    def write_audio(self, samples: Any) -> None:
        """Queue mono audio at ``audio_rate``: ``[n]`` (or ``[1, n]``) float in [-1, 1] (int16 ok),
        any chunk size. Encoded as far as the video written so far reaches."""
        self._check_open()
        if self._a is None:
            raise ValueError("audio: this writer was created with audio_rate=None (no audio track)")
        arr = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
        if arr.ndim == 2 and 1 in arr.shape:
            arr = arr.reshape(-1)
        if arr.ndim != 1:
            raise ValueError(f"audio: expected mono samples [n] or [1, n], got shape {tuple(arr.shape)}; downmix first")
        if arr.dtype == np.int16:
            arr = arr.astype(np.float32) / 32768.0
        elif not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"audio: dtype {arr.dtype} not supported; pass float32 in [-1, 1]")
        arr = np.clip(np.nan_to_num(arr.astype(np.float32)), -1.0, 1.0)
        self._a_received += arr.size
        self._a_buf = np.concatenate([self._a_buf, arr]) if self._a_buf.size else arr
        self._drain_audio()
        self._flush()

    # -- encoding -----------------------------------------------------------------------------
    def _audio_target(self) -> int:
        """Samples that match the frames written so far (``frames / fps`` seconds)."""
        assert self.audio_rate is not None
        return int(round(Fraction(self._frames) / self.fps * self.audio_rate))

    def _encode_audio(self, chunk: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk[None]), format="fltp", layout="mono")
        frame.sample_rate = self.audio_rate
        frame.pts = self._a_sent
        frame.time_base = Fraction(1, self.audio_rate)
        self._mux(self._a.encode(frame))
        self._a_sent += chunk.size

    def _mux(self, packets: list) -> None:
        if self._fragments is not None:
            self._fragments.add(packets)
        else:
            self._container.mux(packets)

    def _flush(self) -> None:
        """Put every packet encoded so far on disk (fragmented mode)."""
        if self._fragments is not None:
            self._fragments.flush()

    def _drain_audio(self, final: bool = False) -> None:
        if self._a is None:
            return
        target = self._audio_target()
        if final:
            missing = target - self._a_sent - self._a_buf.size
            if missing > 0:
                self._a_buf = np.concatenate([self._a_buf, np.zeros(missing, np.float32)])
        step = self._a.codec_context.frame_size or 1024
        n = min(self._a_buf.size, target - self._a_sent)
        if not final:
            n = n // step * step
        if n <= 0:
            return
        for start in range(0, n, step):
            self._encode_audio(self._a_buf[start:min(n, start + step)])
        self._a_buf = self._a_buf[n:].copy()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"video: {self.path} is already closed")

    @property
    def frames(self) -> int:
        """Frames written so far."""
        return self._frames

    def close(self) -> dict[str, Any]:
        """Flush both encoders, fit the audio to the video length, finish the file.

        Returns ``dict(path, width, height, fps, frames, audio_seconds, codec)``; idempotent.
        """
        if self._closed:
            assert self._info is not None
            return self._info
        self._closed = True
        try:
            self._mux(self._v.encode(None))
            if self._a is not None:
                target = self._audio_target()
                extra = self._a_received - target
                if abs(extra) * float(self.fps) > self.audio_rate:  # more than one frame off
                    what = "cut" if extra > 0 else "padded with silence"
                    logger.info("video: audio %s by %.3f s to match %d frames", what, abs(extra) / self.audio_rate, self._frames)
                self._drain_audio(final=True)
                self._mux(self._a.encode(None))
            if self._fragments is not None:
                self._fragments.close()
        finally:
            if self._fragments is not None:
                self._sink.close()
            self._container.close()
        self._info = {
            "path": str(self.path),
            "width": self.width,
            "height": self.height,
            "fps": float(self.fps),
            "frames": self._frames,
            "audio_seconds": self._a_sent / self.audio_rate if self.audio_rate else 0.0,
            "codec": self.codec,
        }
        return self._info

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def probe_video(path: str | os.PathLike, decode: bool = False) -> dict[str, Any]:
    """Read an mp4 back with PyAV (no ffmpeg binary needed).

    Frames are counted from the demuxed packets (or decoded frames with ``decode=True``); reading
    stops quietly at a truncated tail (``truncated`` is then True). Times in seconds: ``duration_s``
    = frames / fps; ``audio_duration_s`` = the audio track's presented length after t = 0 (packet
    end minus max(start, 0), so AAC priming before 0 does not count).

    Returns ``dict(width, height, fps, frames, duration_s, audio_duration_s, audio_rate, codecs,
    video_start_s, audio_start_s, truncated)``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"video: no file at {p}")
    with av.open(str(p)) as c:
        v = c.streams.video[0] if c.streams.video else None
        a = c.streams.audio[0] if c.streams.audio else None
        streams = [s for s in (v, a) if s is not None]
        frames = 0
        v_start: Fraction | None = None
        a_start: Fraction | None = None
        a_end: Fraction | None = None
        truncated = False
        try:
            for pkt in c.demux(*streams):
                if pkt.pts is None or pkt.size == 0:
                    continue
                t0 = pkt.pts * pkt.time_base
                if v is not None and pkt.stream.index == v.index:
                    v_start = t0 if v_start is None else min(v_start, t0)
                    if decode:
                        frames += len(pkt.decode())
                    else:
                        frames += 1
                else:
                    t1 = (pkt.pts + (pkt.duration or 0)) * pkt.time_base
                    a_start = t0 if a_start is None else min(a_start, t0)
                    a_end = t1 if a_end is None else max(a_end, t1)
            if decode and v is not None:
                frames += len(v.codec_context.decode(None))
        except (av.error.FFmpegError, OSError, EOFError):
            truncated = True
        fps = float(v.average_rate or v.guessed_rate or 0) if v is not None else 0.0
        audio_dur = float(a_end - max(a_start, 0)) if a_end is not None and a_start is not None else 0.0
        return {
            "width": v.codec_context.width if v is not None else 0,
            "height": v.codec_context.height if v is not None else 0,
            "fps": fps,
            "frames": frames,
            "duration_s": frames / fps if fps else 0.0,
            "audio_duration_s": audio_dur,
            "audio_rate": a.codec_context.sample_rate if a is not None else 0,
            "codecs": {"video": v.codec_context.name if v is not None else None,
                       "audio": a.codec_context.name if a is not None else None},
            "video_start_s": float(v_start) if v_start is not None else None,
            "audio_start_s": float(a_start) if a_start is not None else None,
            "truncated": truncated,
        }


__all__ = ["VideoWriter", "probe_video", "to_uint8_frames", "available_video_encoder"]
