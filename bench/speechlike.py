"""Speech-like synthetic audio of any length, generated and written chunk by chunk.

Voiced harmonics (5 partials) with a drifting pitch (140 +- 40 Hz at 0.3 Hz), a syllable-rate
envelope (~4 Hz, frequency-modulated) and a little white noise: enough structure for wav2vec2's
attention to behave like on speech, no recordings needed. The phase is integrated analytically, so
any sample range is computed on its own (`speechlike(start, n)`); the noise of chunk k is drawn from
a generator seeded with (seed, k) over fixed `CHUNK` blocks, so the signal does not depend on how it
is cut. `write_speechlike_wav` writes 16-bit PCM with the standard library (no PyAV needed).
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np

CHUNK = 1 << 16  # samples per noise block (and per write)


def speechlike(start: int, n: int, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Samples `[start, start + n)` of the signal at `rate` Hz: `[n]` float32 in about [-0.6, 0.6]."""
    t = np.arange(start, start + n, dtype=np.float64) / rate
    # phase = 2 pi * integral of f0(t) = 140 + 40 sin(2 pi 0.3 t)
    phase = 2 * math.pi * (140 * t - 40 / (2 * math.pi * 0.3) * (np.cos(2 * math.pi * 0.3 * t) - 1))
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = (0.5 + 0.5 * np.sin(2 * math.pi * 4 * t + 3 * np.sin(2 * math.pi * 0.7 * t))) ** 2
    noise = np.empty(n)
    for k in range(start // CHUNK, (start + n - 1) // CHUNK + 1 if n else start // CHUNK):
        block = np.random.default_rng([seed, k]).standard_normal(CHUNK)
        lo, hi = max(start, k * CHUNK), min(start + n, (k + 1) * CHUNK)
        noise[lo - start:hi - start] = block[lo - k * CHUNK:hi - k * CHUNK]
    return (0.3 * env * voiced + 0.02 * noise).astype(np.float32)


def write_speechlike_wav(path: str | Path, seconds: float, rate: int = 16000, seed: int = 0) -> int:
    """Write `seconds` of the signal as a mono 16-bit WAV at `rate`; returns the sample count."""
    total = int(round(seconds * rate))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        for s in range(0, total, CHUNK):
            x = speechlike(s, min(CHUNK, total - s), rate, seed)
            w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return total


__all__ = ["speechlike", "write_speechlike_wav", "CHUNK"]
