"""Checks and plot of a long run's mp4 (bench/long_run.py): A/V drift, cut points, memory slope.

All read the file back with PyAV (no ffmpeg binary). Times in seconds, memory in bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def av_drift_ms(mp4: Path, source, at_s: float, span_s: float = 1.0, max_lag_ms: float = 100.0) -> dict:
    """Lag (ms) of the mp4's audio track against the source audio around `at_s`.

    The decoded AAC samples presented from time t0 (PyAV frame times, the edit list applied) are
    matched against the source samples `source.read(...)` (16 kHz) at t0 + lag for lags within
    `max_lag_ms`; the best normalised correlation gives the lag. 0 = audio at presentation time t
    is the source's sample `t * rate`, i.e. the frame of video shown at t carries its own audio.
    """
    import av

    rate = source.sample_rate
    with av.open(str(mp4)) as c:
        a = c.streams.audio[0]
        c.seek(int(max(0.0, at_s - 1.0) / a.time_base), stream=a, backward=True)
        chunks, t0 = [], None
        have = 0
        for frame in c.decode(a):
            if frame.time is None:
                continue
            x = frame.to_ndarray().astype(np.float32).reshape(-1)
            if frame.time + x.shape[0] / frame.sample_rate <= at_s:
                continue
            if t0 is None:
                t0 = frame.time
            chunks.append(x)
            have += x.shape[0]
            if have >= span_s * rate:
                break
    if t0 is None or have < span_s * rate:
        return {"at_s": at_s, "lag_ms": None, "corr": None, "why": "no audio decoded there"}
    dec = np.concatenate(chunks)[: int(span_s * rate)].astype(np.float64)
    max_lag = int(max_lag_ms * rate / 1000)
    start = int(round(t0 * rate))
    src = source.read(start - max_lag, start + dec.shape[0] + max_lag).numpy().astype(np.float64)
    best, best_lag = -2.0, 0
    dn = np.linalg.norm(dec) + 1e-12
    for lag in range(-max_lag, max_lag + 1):
        seg = src[lag + max_lag: lag + max_lag + dec.shape[0]]
        corr = float(np.dot(dec, seg) / (dn * (np.linalg.norm(seg) + 1e-12)))
        if corr > best:
            best, best_lag = corr, lag
    return {"at_s": round(at_s, 3), "t0_s": round(float(t0), 4), "lag_ms": round(best_lag * 1000 / rate, 3),
            "corr": round(best, 4)}


def decode_at(mp4: Path, at_s: float, frames: int = 3) -> dict:
    """Seek to `at_s` and decode `frames` video frames from there: is the file playable at that cut?

    Returns the first decoded frame time, the frame index it implies, whether the times step by
    exactly one frame, and the frames' mean grey level (a decoded picture, not an empty buffer).
    """
    import av

    with av.open(str(mp4)) as c:
        v = c.streams.video[0]
        fps = float(v.average_rate or v.guessed_rate)
        c.seek(int(at_s / v.time_base), stream=v, backward=True)
        times, means = [], []
        for frame in c.decode(v):
            if frame.time is None or frame.time + 0.5 / fps < at_s:
                continue
            times.append(float(frame.time))
            means.append(float(frame.to_ndarray(format="rgb24").mean()))
            if len(times) == frames:
                break
    ok = len(times) == frames and all(abs((b - a) * fps - 1) < 1e-6 for a, b in zip(times, times[1:]))
    return {"at_s": round(at_s, 3), "first_frame_s": times[0] if times else None,
            "first_frame_index": round(times[0] * fps) if times else None, "decoded": len(times),
            "steps_by_one_frame": ok, "mean_level": round(float(np.mean(means)), 2) if means else None}


def growth(t: list[float], y: list[float], warm_fraction: float = 0.1) -> dict:
    """Least-squares slope of `y` over `t` after the first `warm_fraction` of the samples; the
    growth it implies over that span as a fraction of the value where the span starts."""
    n = len(t)
    k = min(n - 2, max(1, int(n * warm_fraction))) if n > 2 else 0
    if n - k < 2:
        return {"slope_per_s": None, "growth_fraction": None, "start": None, "max": None}
    tt, yy = np.asarray(t[k:], dtype=np.float64), np.asarray(y[k:], dtype=np.float64)
    slope = float(np.polyfit(tt, yy, 1)[0]) if tt[-1] > tt[0] else 0.0
    start = float(yy[0])
    return {"slope_per_s": slope, "growth_fraction": slope * float(tt[-1] - tt[0]) / start if start else None,
            "start": start, "max": float(yy.max()), "min": float(yy.min())}


def plot_memory(path: Path, title: str, t_s: list[float], series: dict[str, list[float]]) -> str:
    """PNG of memory (MiB) over time (minutes), one line per series; matplotlib, else PIL."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(path, title, t_s, series)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for name, ys in series.items():
        ax.plot([x / 60 for x in t_s], [v / 2**20 for v in ys], label=name, lw=1.2)
    ax.set_xlabel("time since the first block (min)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def _plot_pil(path: Path, title: str, t_s: list[float], series: dict[str, list[float]]) -> str:
    from PIL import Image, ImageDraw

    w, h, m = 990, 495, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((m, 10), title, fill="black")
    t_max = max(t_s[-1] if t_s else 1.0, 1e-9)
    y_max = max((max(v) for v in series.values() if v), default=1.0) * 1.1 / 2**20
    d.rectangle([m, m, w - m, h - m], outline="black")
    for i in range(6):
        y = h - m - i * (h - 2 * m) / 5
        d.text((5, y - 5), f"{y_max * i / 5:.0f}", fill="black")
        x = m + i * (w - 2 * m) / 5
        d.text((x - 10, h - m + 5), f"{t_max / 60 * i / 5:.1f}", fill="black")
    d.text((w // 2 - 80, h - 20), "time since the first block (min); y: MiB", fill="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for j, (name, ys) in enumerate(series.items()):
        pts = [(m + (x / t_max) * (w - 2 * m), h - m - (v / 2**20) / y_max * (h - 2 * m)) for x, v in zip(t_s, ys)]
        if len(pts) > 1:
            d.line(pts, fill=colors[j % len(colors)], width=2)
        d.text((w - m - 200, m + 10 + 14 * j), name, fill=colors[j % len(colors)])
    img.save(path)
    return "pil"


def downsample(rows: list, keep: int = 2000) -> list:
    """At most about `keep` rows, evenly spaced, the last one kept."""
    if len(rows) <= keep:
        return rows
    step = math.ceil(len(rows) / keep)
    return rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])


__all__ = ["av_drift_ms", "decode_at", "growth", "plot_memory", "downsample"]
