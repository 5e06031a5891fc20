"""Audio input: any file or in-memory waveform -> mono float32 at 16 kHz.

Live Avatar's audio path starts from 16 kHz mono samples (what wav2vec2 was trained on). This
module brings any input there:

- files are decoded in-process with PyAV (wav, mp3, flac, ogg/vorbis/opus, m4a/aac, the audio
  track of a video, ...), converted to planar float32 at the stream's own rate and channel layout;
- channels are mixed down to mono as their plain mean;
- the rate is changed with libsoxr at high quality (`soxr.resample(x, sr_in, sr_out, "soxr_hq")`
  on float32), which is what the reference's `librosa.load(path, sr=16000)` calls (librosa's
  default `res_type="soxr_hq"`, `fix=True`, `scale=False`, result cast back to the input dtype).

Length rule of resampling (librosa's `fix`): `T_out = ceil(T_in * target_rate / source_rate)`
samples; soxr's own output is cut or zero-padded at the end to that length. At equal rates the
samples pass through untouched.

Frames and samples: video frame `j` (at `fps`) owns the samples
`[round(j * sr / fps), round((j + 1) * sr / fps))`; at 16 kHz and 25 fps that is exactly 640
samples per frame.

Length. `load_audio` / `audio_from_waveform` hold the whole clip in RAM (`Audio16k`). The
pipeline's entry points `open_audio` (a file) and `audio_from_waveform(..., in_memory_s=...)`
(ComfyUI's AUDIO) keep clips up to `IN_MEMORY_S` in RAM and spool longer ones, chunk by chunk, to a
raw 16 kHz file (`audio_spool.SpooledAudio16k`): the same samples, a constant host-memory cost.
Both kinds offer `num_samples`, `sample_rate`, `read(start, stop)` and `moments()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
from torch import Tensor

from liveavatar.media.audio_spool import Moments, SpooledAudio16k, moments_of_chunks, read_window, spool_mono

DEFAULT_SAMPLE_RATE = 16000
IN_MEMORY_S = 120.0  # longer clips are spooled to disk by open_audio / audio_from_waveform (7.7 MB at 16 kHz)
WAVEFORM_CHUNK = 1 << 16  # source samples mixed and resampled at a time when spooling a waveform

__all__ = [
    "Audio16k",
    "AudioLoadError",
    "AudioSamples",
    "SpooledAudio16k",
    "load_audio",
    "open_audio",
    "audio_from_waveform",
    "slice_for_frames",
    "num_video_frames",
]


class AudioLoadError(ValueError):
    """An audio file or waveform cannot be used (missing, undecodable, empty, wrong shape)."""


@dataclass
class Audio16k:
    """Mono audio ready for wav2vec2.

    samples: `[T]` float32, nominally in [-1, 1], at `sample_rate` Hz (16000 unless asked otherwise).
    source: where it came from (a file path, or a short description of an in-memory waveform).
    """

    samples: Tensor
    sample_rate: int = DEFAULT_SAMPLE_RATE
    source: str = "<waveform>"

    def __post_init__(self) -> None:
        if not isinstance(self.samples, Tensor) or self.samples.ndim != 1:
            shape = tuple(self.samples.shape) if isinstance(self.samples, Tensor) else type(self.samples)
            raise AudioLoadError(f"Audio16k.samples must be a 1-D tensor [T], got {shape} ({self.source})")
        if self.sample_rate <= 0:
            raise AudioLoadError(f"Audio16k.sample_rate must be positive, got {self.sample_rate}")

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def duration_s(self) -> float:
        """Length in seconds (`T / sample_rate`)."""
        return self.num_samples / self.sample_rate

    def read(self, start: int, stop: int) -> Tensor:
        """Samples `[start, stop)` -> `[stop - start]` float32, zeros outside `[0, T)`."""
        return read_window(start, stop, self.num_samples, lambda lo, hi: self.samples[lo:hi])

    def moments(self) -> Moments:
        """Count, mean and squared deviations of the samples (float64)."""
        return moments_of_chunks(self.read, self.num_samples)


AudioSamples = Union[Audio16k, SpooledAudio16k]  # what the pipeline reads audio from


def _resample_mono(mono: Tensor, source_rate: int, target_rate: int) -> Tensor:
    """`[T]` float32 at `source_rate` -> `[ceil(T * target / source)]` float32 at `target_rate`.

    libsoxr "HQ" in float32, then cut / zero-padded at the end to the length rule (as librosa does).
    """
    if source_rate == target_rate:
        return mono
    import soxr

    n_out = math.ceil(mono.shape[0] * (float(target_rate) / source_rate))  # librosa: ceil(T * ratio)
    y = soxr.resample(mono.numpy(), int(source_rate), int(target_rate), quality="soxr_hq")
    out = torch.zeros(n_out, dtype=torch.float32)
    keep = min(n_out, y.shape[0])
    out[:keep] = torch.from_numpy(np.ascontiguousarray(y[:keep], dtype=np.float32))
    return out


def _to_float32_waveform(waveform: Tensor, what: str) -> Tensor:
    if not torch.is_floating_point(waveform):
        raise AudioLoadError(
            f"{what}: expected a floating-point waveform (samples in [-1, 1]), got dtype {waveform.dtype}; "
            "convert integer PCM first (e.g. int16 / 32768)"
        )
    return waveform.detach().to(device="cpu", dtype=torch.float32)


def audio_from_waveform(
    waveform: Tensor, sample_rate: int, target_rate: int = DEFAULT_SAMPLE_RATE, source: str = "<waveform>",
    in_memory_s: float = IN_MEMORY_S,
) -> AudioSamples:
    """In-memory waveform -> `Audio16k`, or `SpooledAudio16k` when longer than `in_memory_s` seconds.

    waveform: `[T]`, `[C, T]` or `[B, C, T]` (ComfyUI's AUDIO `waveform`, with B == 1), float.
    sample_rate: its rate in Hz. Channels are averaged to mono, then resampled to `target_rate`.
    A long waveform is mixed and resampled `WAVEFORM_CHUNK` samples at a time straight into the
    spool file: no copy of the whole clip is made (the same samples as the in-RAM path).
    """
    if not isinstance(waveform, Tensor):
        waveform = torch.as_tensor(waveform)
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool):
        if isinstance(sample_rate, float) and sample_rate.is_integer():
            sample_rate = int(sample_rate)
        else:
            raise AudioLoadError(f"{source}: sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if sample_rate <= 0:
        raise AudioLoadError(f"{source}: sample_rate must be a positive integer (Hz), got {sample_rate}")
    if waveform.ndim == 3:
        if waveform.shape[0] != 1:
            raise AudioLoadError(
                f"{source}: waveform batch has {waveform.shape[0]} items; one audio track is expected "
                "(B must be 1 in [B, C, T]); split the batch first"
            )
        waveform = waveform[0]
    if waveform.ndim == 1:
        waveform = waveform[None]
    if waveform.ndim != 2:
        raise AudioLoadError(f"{source}: waveform must be [T], [C, T] or [1, C, T], got shape {tuple(waveform.shape)}")
    if waveform.shape[0] == 0 or waveform.shape[1] == 0:
        raise AudioLoadError(f"{source}: waveform is empty (shape {tuple(waveform.shape)})")
    if waveform.shape[1] / sample_rate > in_memory_s:
        return spool_mono(_mono_chunks(waveform, source), sample_rate, target_rate, source)
    wave = _to_float32_waveform(waveform, source)
    _check_finite(wave, source)
    mono = wave.mean(dim=0)
    return Audio16k(_resample_mono(mono, sample_rate, target_rate).contiguous(), target_rate, source)


def _check_finite(wave: Tensor, source: str) -> None:
    if not torch.isfinite(wave).all():
        raise AudioLoadError(f"{source}: waveform contains NaN or infinite samples")


def _mono_chunks(waveform: Tensor, source: str) -> Iterator[np.ndarray]:
    """`[C, T]` -> mono float32 chunks of `WAVEFORM_CHUNK` samples (a copy of one chunk at a time)."""
    for i in range(0, waveform.shape[1], WAVEFORM_CHUNK):
        part = _to_float32_waveform(waveform[:, i:i + WAVEFORM_CHUNK], source)
        _check_finite(part, source)
        yield part.mean(dim=0).numpy()


def _decoded_chunks(path: Path) -> Iterator[tuple[Tensor, int]]:
    """Decode the first audio stream of `path` frame by frame -> (`[C, n]` float32, rate in Hz)."""
    import av

    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, OSError) as exc:
        raise AudioLoadError(f"cannot decode audio file {path}: {exc}; is it an audio/video file?") from exc
    with container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            raise AudioLoadError(f"audio file {path} has no audio stream")
        stream = streams[0]
        resampler = None
        rate = 0
        try:
            for frame in container.decode(stream):
                if resampler is None:
                    # Keep the stream's own rate and channel layout; only the sample format changes
                    # (planar float32). Mixing and rate conversion are done in torch.
                    rate = int(frame.sample_rate)
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=rate)
                for out in resampler.resample(frame):
                    yield torch.from_numpy(out.to_ndarray().copy()), rate
            if resampler is not None:
                for out in resampler.resample(None):
                    yield torch.from_numpy(out.to_ndarray().copy()), rate
        except av.error.FFmpegError as exc:
            raise AudioLoadError(f"cannot decode audio file {path}: {exc}") from exc


def _decode_file(path: Path) -> tuple[Tensor, int]:
    """Decode the first audio stream of `path` -> (`[C, T]` float32, rate in Hz)."""
    chunks: list[Tensor] = []
    rate = None
    for chunk, rate in _decoded_chunks(path):
        chunks.append(chunk)
    if not chunks or rate is None:
        raise AudioLoadError(f"audio file {path} contains no audio samples")
    wave = torch.cat(chunks, dim=1)
    if wave.shape[1] == 0:
        raise AudioLoadError(f"audio file {path} contains no audio samples")
    return wave, rate


def _checked_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"audio file not found: {p} (absolute: {p.absolute()})")
    if p.is_dir():
        raise AudioLoadError(f"audio path {p} is a directory, expected an audio file")
    if p.stat().st_size == 0:
        raise AudioLoadError(f"audio file {p} is empty (0 bytes)")
    return p


def load_audio(path: str | Path, target_rate: int = DEFAULT_SAMPLE_RATE) -> Audio16k:
    """Read an audio file of any format, rate and channel count -> mono float32 at `target_rate`,
    all in RAM (see `open_audio` for clips of any length).

    Relative paths are taken from the current directory; `~` is expanded. Raises
    `FileNotFoundError` for a missing file and `AudioLoadError` (a ValueError) for a file that is
    not audio, has no audio stream, or holds no samples; every message names the path.
    """
    p = _checked_path(path)
    wave, rate = _decode_file(p)
    return audio_from_waveform(wave, rate, target_rate=target_rate, source=str(p), in_memory_s=math.inf)


def open_audio(path: str | Path, target_rate: int = DEFAULT_SAMPLE_RATE,
               in_memory_s: float = IN_MEMORY_S) -> AudioSamples:
    """Like `load_audio`, streamed: the file is decoded, mixed to mono and resampled frame by frame
    into a spool file (`SpooledAudio16k`), so host memory does not grow with the length. Clips up
    to `in_memory_s` seconds come back in RAM as an `Audio16k` (the same samples, bit for bit)."""
    p = _checked_path(path)
    rate = None

    def mono_chunks() -> Iterator[np.ndarray]:
        nonlocal rate
        for chunk, r in _decoded_chunks(p):
            if rate is not None and r != rate:
                raise AudioLoadError(f"audio file {p}: the sample rate changes mid-stream ({rate} -> {r} Hz)")
            rate = r
            yield chunk.mean(dim=0).numpy()

    chunks = mono_chunks()
    first = next((c for c in chunks if c.shape[0] > 0), None)
    if first is None or rate is None:
        raise AudioLoadError(f"audio file {p} contains no audio samples")
    spooled = spool_mono(_prepend(first, chunks), rate, target_rate, str(p))
    return _in_memory_if_short(spooled, in_memory_s)


def _prepend(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _in_memory_if_short(spooled: SpooledAudio16k, in_memory_s: float) -> AudioSamples:
    if spooled.duration_s > in_memory_s:
        return spooled
    return Audio16k(spooled.read(0, spooled.num_samples), spooled.sample_rate, spooled.source)


def _frame_to_sample(frame: int, sample_rate: int, fps: int) -> int:
    # Exact rational arithmetic; Python's round() on a Fraction rounds halves to even.
    return round(Fraction(frame * sample_rate, fps))


def slice_for_frames(audio: AudioSamples, first_frame: int, num_frames: int, fps: int = 25) -> Tensor:
    """Samples of video frames `[first_frame, first_frame + num_frames)` at `fps`.

    Returns `[round((first+n)*sr/fps) - round(first*sr/fps)]` float32 samples, zero-padded where the
    range runs past the end of the audio.
    """
    if first_frame < 0 or num_frames < 0:
        raise ValueError(f"first_frame ({first_frame}) and num_frames ({num_frames}) must be >= 0")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    start = _frame_to_sample(first_frame, audio.sample_rate, fps)
    stop = _frame_to_sample(first_frame + num_frames, audio.sample_rate, fps)
    return audio.read(start, stop)


def num_video_frames(audio: AudioSamples, fps: int = 25) -> int:
    """Whole video frames the audio covers: `floor(duration_s * fps)` (exact integer arithmetic)."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return audio.num_samples * fps // audio.sample_rate
