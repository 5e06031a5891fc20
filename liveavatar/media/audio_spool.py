"""Audio of any length at a constant host-memory cost: 16 kHz mono float32 spooled to a file.

An hour of 16 kHz mono float32 is 230 MB; holding it (and a resampler's copy of it) in RAM makes
memory grow with the length. Long inputs are instead decoded / mixed / resampled chunk by chunk
(libsoxr's streaming resampler, which gives bit-for-bit the samples of its one-shot call: checked in
tests/test_audio_windows.py) and appended to a temporary raw float32 file; readers fetch sample
ranges with `pread`, so what a job holds is one window of samples, never the clip.

`SpooledAudio16k` has the reading side of `Audio16k` (`num_samples`, `sample_rate`, `source`,
`duration_s`, `read(start, stop)`, `moments()`), so the pipeline takes either. It pickles as its
path and statistics (worker ranks of the same host read the same file); the process that spooled
it owns the file and removes it when the object is collected or the interpreter exits (a process
killed with SIGKILL leaves it in the temp folder: ~14 MB per minute of audio).
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

CHUNK_SAMPLES = 1 << 16  # samples per read while computing statistics (256 KiB of float32)
_BYTES = 4  # float32


def read_window(start: int, stop: int, num_samples: int, fetch) -> Tensor:
    """Samples `[start, stop)` of a clip of `num_samples` as `[stop - start]` float32, zeros outside
    `[0, num_samples)`; `fetch(lo, hi)` returns the stored samples `[lo, hi)` (the in-RAM clip and
    the spool file share this window rule)."""
    if stop < start:
        raise ValueError(f"read: stop ({stop}) < start ({start})")
    out = torch.zeros(stop - start, dtype=torch.float32)
    lo, hi = max(0, start), min(num_samples, stop)
    if hi > lo:
        out[lo - start:hi - start] = fetch(lo, hi)
    return out


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations (`m2`) of a sample sequence, in float64.

    Merged chunk by chunk (Chan et al.), so a streamed clip gets the statistics of the whole clip:
    variance = m2 / count (numpy's `var`, ddof 0).
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, x: np.ndarray) -> "Moments":
        if x.size == 0:
            return cls()
        x64 = x.astype(np.float64, copy=False)
        mean = float(x64.mean())
        return cls(int(x.size), mean, float(((x64 - mean) ** 2).sum()))

    def __add__(self, other: "Moments") -> "Moments":
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        return Moments(n, mean, self.m2 + other.m2 + delta * delta * self.count * other.count / n)

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 0.0


def moments_of_chunks(read, num_samples: int, chunk: int = CHUNK_SAMPLES) -> Moments:
    """`Moments` of samples `[0, num_samples)` fetched as `read(start, stop)` -> `[stop - start]`."""
    total = Moments()
    for s in range(0, num_samples, chunk):
        total = total + Moments.of(read(s, min(num_samples, s + chunk)).numpy())
    return total


class SpooledAudio16k:
    """Mono float32 samples at `sample_rate` in a raw file (see the module doc).

    num_samples: samples in the file (T). source: where the audio came from. path: the raw file.
    """

    def __init__(self, path: str, num_samples: int, sample_rate: int, source: str,
                 moments: Moments | None = None, owner: bool = False):
        self.path = path
        self.num_samples = int(num_samples)
        self.sample_rate = int(sample_rate)
        self.source = source
        self._moments = moments
        self._fd: int | None = None
        self._finalizer = weakref.finalize(self, _remove, path) if owner else None

    @property
    def duration_s(self) -> float:
        """Length in seconds (`T / sample_rate`)."""
        return self.num_samples / self.sample_rate

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            weakref.finalize(self, os.close, self._fd)
        return self._fd

    def read(self, start: int, stop: int) -> Tensor:
        """Samples `[start, stop)` -> `[stop - start]` float32, zeros outside `[0, num_samples)`."""
        def fetch(lo: int, hi: int) -> Tensor:
            data = os.pread(self._file(), (hi - lo) * _BYTES, lo * _BYTES)
            return torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy())

        return read_window(start, stop, self.num_samples, fetch)

    def moments(self) -> Moments:
        """Statistics of all samples (computed once, in chunks)."""
        if self._moments is None:
            self._moments = moments_of_chunks(self.read, self.num_samples)
        return self._moments

    def __getstate__(self) -> dict:
        return {"path": self.path, "num_samples": self.num_samples, "sample_rate": self.sample_rate,
                "source": self.source, "moments": self.moments()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["num_samples"], state["sample_rate"], state["source"],
                      state["moments"], owner=False)

    def __repr__(self) -> str:
        return f"SpooledAudio16k({self.source!r}, {self.duration_s:.2f} s at {self.sample_rate} Hz, {self.path})"


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def spool_mono(chunks: Iterable[np.ndarray], source_rate: int, target_rate: int, source: str) -> SpooledAudio16k:
    """Mono float32 chunks `[n]` at `source_rate` -> a `SpooledAudio16k` at `target_rate`.

    Resampled with libsoxr "HQ" as a stream (same samples as the one-shot call), then cut or
    zero-padded at the end to `ceil(T_in * target_rate / source_rate)` samples (librosa's rule).
    Memory: one chunk plus the resampler's state.
    """
    fd, path = tempfile.mkstemp(prefix="liveavatar-audio-", suffix=".f32")
    spooled_in = written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            stream = None
            if source_rate != target_rate:
                import soxr

                stream = soxr.ResampleStream(source_rate, target_rate, 1, dtype="float32", quality="soxr_hq")
            for x in chunks:
                spooled_in += x.shape[0]
                y = x if stream is None else stream.resample_chunk(np.ascontiguousarray(x, dtype=np.float32))
                f.write(np.ascontiguousarray(y, dtype=np.float32).tobytes())
                written += y.shape[0]
            if stream is not None:
                tail = stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
                f.write(np.ascontiguousarray(tail, dtype=np.float32).tobytes())
                written += tail.shape[0]
            n_out = spooled_in if stream is None else math.ceil(spooled_in * (float(target_rate) / source_rate))
            if written > n_out:
                f.truncate(n_out * _BYTES)
            elif written < n_out:
                f.write(bytes((n_out - written) * _BYTES))
    except BaseException:
        _remove(path)
        raise
    return SpooledAudio16k(path, n_out, target_rate, source, owner=True)


__all__ = ["Moments", "SpooledAudio16k", "moments_of_chunks", "read_window", "spool_mono", "CHUNK_SAMPLES"]
