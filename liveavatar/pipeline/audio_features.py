"""wav2vec2 features produced window by window, as the blocks ask for them.

The DiT reads the features of 12 video frames per block. Computing them for the whole clip up
front costs `n_states x C x frames` values (25 x 1024 x 25 fps in bf16: 1.3 MB per second, 4.6 GB
per hour) plus a wav2vec2 pass over the whole clip. `WindowedAudioFeatures` computes them for one
window of video columns at a time and keeps only that window, so host memory is a constant.

Timeline: the audio the features are computed from is the user's audio with `lead_in_samples` of
silence in front (the "padded" clip, N samples). Its one-pass features (the reference) are: encoder
frames `T50 = (N - 400) // 320 + 1` (50 per second); linear interpolation to
`T30 = int(T50 / 50 * 30)` frames with `align_corners=True` over the whole clip (feature i sits at
encoder position `i * (T50 - 1) / (T30 - 1)`); video column j takes feature `round(j * 30 / 25)`, or
zeros past T30; `clips * 48` columns in all.

Clips up to `max_single_pass_s` (60 s of encoder frames) take exactly that one-pass path
(`AudioFeatureExtractor.video_frame_features`, bit-exact with the reference fixtures). Longer
clips are cut into windows of `window_s` (30 s, rounded up to whole 48-frame clips) of video
columns. For a window, the encoder frames its columns interpolate from, `[a, b]`, are encoded with
`context_s` (5 s) more on each side (clipped at the ends): samples
`[(a - ctx) * 320, (b + ctx) * 320 + 400)`. Exact parts: the normalisation (the whole clip's mean
and variance, from `audio.moments()`), the conv features (windows start on the conv's 320-sample
grid, and the 400-sample receptive field is inside the window), the positional conv embedding
(kernel 128 frames = +-1.28 s, inside the 5 s context), the interpolation positions and the
bucketing (computed from the global T50 / T30). Not exact: self-attention, which in the single pass
sees the whole clip and here sees the window and its context. Measured (bench/audio_windows.py,
speech-like audio, see tests/test_audio_windows.py for the asserted bound).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from liveavatar.media.audio_spool import Moments
from liveavatar.models.wav2vec import bucket_indices, num_clips_for

MAX_SINGLE_PASS_S = 60.0  # clips up to this many seconds (of encoder frames) take the one-pass path
WINDOW_S = 30.0  # video columns per window, rounded up to whole clips
CONTEXT_S = 5.0  # extra audio encoded on each side of a window, dropped afterwards


def release_freed_host_memory() -> None:
    """Hand the pages glibc keeps after a window's wav2vec2 pass back to the OS (`malloc_trim`).

    A window's pass allocates and frees tens of MB (hundreds at full size) between the blocks'
    long-lived allocations; glibc keeps such freed heap pages, and measured on the tiny checkpoint
    (64x64, one CPU thread) the process RSS then rose by a step at each of the first windows
    (+50, +40, +25 MB at windows 2-4) although nothing was held. Trimming once per window (every
    ~30 s of video, well under a millisecond) keeps RSS flat. No-op where glibc is absent.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


class WindowedAudioFeatures:
    """Per-video-column wav2vec2 features of a clip of any length, computed lazily per window.

    extractor: an `AudioFeatureExtractor`. audio: `Audio16k` or `SpooledAudio16k` (16 kHz, read
    with `read(start, stop)`). lead_in_samples: silence in front of it. fps / feature_fps /
    pad_to_multiple: 25 / 30 / 48. dtype: the features' dtype (the model's; the reference holds
    them in bf16). `shape` = `[1, n_states, C, N]`; `columns(g0, g1)` gives `[1, n_states, C, g1 - g0]`
    on the CPU, zeros past N. Memory: one window of columns (window_s * fps of them) at a time.
    """

    def __init__(self, extractor, audio, *, lead_in_samples: int, fps: int, feature_fps: int,
                 pad_to_multiple: int, dtype: torch.dtype, max_single_pass_s: float = MAX_SINGLE_PASS_S,
                 window_s: float = WINDOW_S, context_s: float = CONTEXT_S):
        self.extractor = extractor
        self.audio = audio
        self.lead = int(lead_in_samples)
        self.fps, self.feature_fps, self.pad = fps, feature_fps, pad_to_multiple
        self.dtype = dtype
        n = self.lead + audio.num_samples
        need = extractor.receptive_field + extractor.stride
        if n < need:
            raise ValueError(f"audio too short: {audio.num_samples} samples ({audio.duration_s:.3f} s); at least "
                             f"{need - self.lead} samples ({(need - self.lead) / audio.sample_rate:.3f} s) are needed")
        self.num_samples = n
        self.t50 = extractor.num_frames_50(n)
        self.t30 = int(self.t50 / float(extractor.frame_rate) * feature_fps)  # interpolate_50_to_30's rule
        self.total = num_clips_for(self.t30, fps, feature_fps, pad_to_multiple) * pad_to_multiple
        self.single_pass = self.t50 / extractor.frame_rate <= max_single_pass_s
        self.window = max(1, math.ceil(window_s * fps / pad_to_multiple)) * pad_to_multiple
        self.context = max(0, round(context_s * extractor.frame_rate))
        # encoder frames per window pass: the core's frames (+3 for the interpolation's neighbours and
        # rounding) and the context on both sides; every pass has this length (shifted, not cut, at
        # the clip's ends), so every window runs the same shapes (same kernels, same allocations)
        core = math.ceil(self.window / fps * extractor.frame_rate) + 3
        self.frames_per_pass = min(self.t50, core + 2 * self.context)
        self.shape = (1, extractor.num_states, extractor.hidden_size, self.total)
        self._moments: Moments | None = None
        self._cached: tuple[int, Tensor] | None = None  # (window index, [1, n_states, C, columns])
        self.windows_computed = 0
        if self.single_pass:  # bounded by max_single_pass_s; exactly the reference's one pass
            feats = extractor.video_frame_features(self.padded(0, n), fps=fps, pad_to_multiple=pad_to_multiple,
                                                   feature_fps=feature_fps)
            self._cached = (0, feats.to(dtype).cpu())
            self.window = self.total
            self.windows_computed = 1

    # ------------------------------------------------------------------ samples
    def padded(self, start: int, stop: int) -> Tensor:
        """Samples `[start, stop)` of the padded clip (lead-in silence + audio): `[stop - start]` float32."""
        return self.audio.read(start - self.lead, stop - self.lead)

    def moments(self) -> Moments:
        """Mean / variance of the padded clip (its lead-in zeros included, as the processor sees it)."""
        if self._moments is None:
            self._moments = Moments(self.lead, 0.0, 0.0) + self.audio.moments()
        return self._moments

    # ------------------------------------------------------------------ columns
    def columns(self, first: int, stop: int) -> Tensor:
        """Features of video columns `[first, stop)`: `[1, n_states, C, stop - first]` in `dtype` (CPU)."""
        if first < 0 or stop < first:
            raise ValueError(f"columns: bad range [{first}, {stop})")
        parts = []
        col = first
        while col < min(stop, self.total):
            k = col // self.window
            w0 = k * self.window
            feats = self._window(k)
            end = min(stop, w0 + feats.shape[-1])
            parts.append(feats[..., col - w0:end - w0])
            col = end
        if stop > max(first, self.total):
            parts.append(torch.zeros(*self.shape[:3], stop - max(first, self.total), dtype=self.dtype))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def _window(self, k: int) -> Tensor:
        if self._cached is None or self._cached[0] != k:
            self._cached = None  # drop the old window before the new one exists
            self._cached = (k, self._compute(k * self.window, min(self.total, (k + 1) * self.window)))
            self.windows_computed += 1
            release_freed_host_memory()
        return self._cached[1]

    @torch.no_grad()
    def _compute(self, c0: int, c1: int) -> Tensor:
        """Columns `[c0, c1)` from the encoder frames they interpolate from, plus context."""
        ex = self.extractor
        out = torch.zeros(1, ex.num_states, ex.hidden_size, c1 - c0, dtype=self.dtype)
        idx = bucket_indices(c0, c1, self.total, self.fps, self.feature_fps)
        valid = idx < self.t30
        if not bool(valid.any()):
            return out
        scale = (self.t50 - 1) / (self.t30 - 1) if self.t30 > 1 else 0.0
        pos = idx[valid].double() * scale
        lo = pos.floor().long().clamp(max=self.t50 - 1)
        hi = (lo + 1).clamp(max=self.t50 - 1)
        weight = (pos - lo.double()).float()
        a, b = int(lo.min()), int(hi.max())
        f0 = max(0, a - self.context)
        f1 = min(self.t50, f0 + self.frames_per_pass)
        f0 = max(0, f1 - self.frames_per_pass)
        if not f0 <= a <= b < f1:
            raise RuntimeError(f"window columns [{c0}, {c1}) need encoder frames [{a}, {b}], outside the pass [{f0}, {f1})")
        s0, s1 = f0 * ex.stride, (f1 - 1) * ex.stride + ex.receptive_field
        m = self.moments()
        states = ex.encode_values(ex.normalize_with(self.padded(s0, s1), m.mean, m.var))
        if states.shape[1] != f1 - f0:
            raise RuntimeError(f"wav2vec2 window gave {states.shape[1]} frames, expected {f1 - f0}")
        states = states.float()
        w = weight.to(states.device)[None, :, None]
        lo_d, hi_d = (lo - f0).to(states.device), (hi - f0).to(states.device)
        feat = states[:, lo_d] * (1.0 - w) + states[:, hi_d] * w  # [n_states, valid, C]
        out[0][:, :, valid] = feat.transpose(1, 2).to(self.dtype).cpu()
        return out


__all__ = ["WindowedAudioFeatures", "MAX_SINGLE_PASS_S", "WINDOW_S", "CONTEXT_S"]
