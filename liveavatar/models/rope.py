"""3-axis rotary position embedding of the S2V DiT (spec §3.4).

Each head vector of size `D` is read as `D/2` consecutive (real, imag) pairs. The pairs are split
into three axes, `[c - 2(c//3), c//3, c//3]` with `c = D/2` (time, height, width); pair `j` of an
axis with `n` pairs turns by `position * theta^(-2j / 2n)` radians, `theta = 10000`.

Positions are integer triples (t, h, w) per token. A negative temporal position (FramePack motion
tokens) turns the other way: the reference conjugates the factor of `|t|`, we do the same.

Precision, as in the reference:
- angles and their cos/sin are float64;
- the reference keeps the per-token factors in a complex-half buffer, so cos and sin are rounded
  to float16 before use. `fp16_tables=True` (default) reproduces that; `False` keeps float64;
- the rotation itself is done in `compute_dtype` (float64 in the reference), the result is rounded
  to float32 and then to the caller's dtype.

Nothing here builds a fixed-size table: factors are computed for the positions asked for, so
there is no upper limit on the temporal index (the reference's table stops at 45,000 frames).
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import numpy as np
import torch

ROPE_THETA = 10000.0


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (time, height, width) for a head of `head_dim` channels."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    c = head_dim // 2
    return (c - 2 * (c // 3), c // 3, c // 3)


@functools.lru_cache(maxsize=16)
def rope_inv_freqs(head_dim: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, ...]:
    """Angular speed per pair, one float64 CPU tensor per axis: `theta ** (-2j / (2n))`.
    Kept per (head_dim, theta): the same tensors every call (read only)."""
    out = []
    for n in rope_axis_pairs(head_dim):
        exps = torch.arange(0, 2 * n, 2, dtype=torch.float64).div(2 * n)
        out.append(1.0 / torch.pow(theta, exps))
    return tuple(out)


def linspace_int(start: float, stop: float, num: int) -> list[int]:
    """`num` points from `start` to `stop` (inclusive), truncated toward zero (numpy semantics).

    This is how the reference spreads a compressed token grid over a larger position range
    (e.g. 2x-compressed motion tokens over the full height).
    """
    return np.linspace(start, stop, num).astype(int).tolist()


def grid_positions(t: list[int], h: list[int], w: list[int]) -> torch.Tensor:
    """All (t, h, w) triples of a token grid in t-major, then h, then w order -> int64 `[T*H*W, 3]`."""
    tt, hh, ww = torch.meshgrid(
        torch.tensor(t, dtype=torch.int64),
        torch.tensor(h, dtype=torch.int64),
        torch.tensor(w, dtype=torch.int64),
        indexing="ij",
    )
    return torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)], dim=1)


@dataclass(frozen=True)
class RopeFactors:
    """cos/sin of every (token, pair) angle, `[L, 1, D/2]` each (the 1 broadcasts over heads).

    Their dtype is the dtype the rotation is computed in (float64 in the reference).
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def to(self, device: torch.device | str) -> "RopeFactors":
        return RopeFactors(self.cos.to(device), self.sin.to(device))

    def __len__(self) -> int:
        return self.cos.shape[0]


def rope_factors(
    positions: torch.Tensor,
    head_dim: int,
    fp16_tables: bool = True,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype = torch.float64,
    theta: float = ROPE_THETA,
) -> RopeFactors:
    """Rotation factors for integer positions `[L, 3]` (t, h, w); see the module docstring.

    `compute_dtype` is the dtype of the returned factors and of the rotation done with them.
    The factors are computed on `device` (CPU if None). Callers that stream should keep the
    result (they depend only on the positions): see `CausalS2VDiT._rope`.
    """
    # Built where they are used (no host->device copy); the float64 math is the same on any device.
    work = torch.device(device) if device is not None else torch.device("cpu")
    positions = positions.to(work, torch.int64)
    cos_parts, sin_parts = [], []
    for axis, inv in enumerate(rope_inv_freqs(head_dim, theta)):
        inv = inv.to(work)
        p = positions[:, axis]
        angle = torch.outer(p.abs().to(torch.float64), inv)
        factor = torch.polar(torch.ones_like(angle), angle)
        sign = torch.where(p < 0, -1.0, 1.0).to(torch.float64)[:, None]
        cos_parts.append(factor.real)
        sin_parts.append(factor.imag * sign)  # conjugate for negative positions
    cos = torch.cat(cos_parts, dim=1)
    sin = torch.cat(sin_parts, dim=1)
    if fp16_tables:
        # The reference's complex-half buffer: double -> float -> half per component.
        cos = cos.float().half().double()
        sin = sin.float().half().double()
    return RopeFactors(cos[:, None, :].to(device, compute_dtype), sin[:, None, :].to(device, compute_dtype))


def with_time(base: RopeFactors, rows: int, time: RopeFactors, t_pairs: int) -> RopeFactors:
    """`base` `[L, 1, D/2]` with the temporal pairs (the first `t_pairs`) of its first `rows` rows
    taken from `time` (`[1, 1, D/2]`, the factors of one position at the new temporal index).

    Every pair depends on its own axis's coordinate only, so this gives the factors of the same
    positions with those rows moved to the new temporal index, the same bits as `rope_factors`
    of them (two cats per table instead of recomputing every row)."""

    def one(b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        head = torch.cat([t[:, :, :t_pairs].expand(rows, -1, -1), b[:rows, :, t_pairs:]], dim=2)
        return head if rows == b.shape[0] else torch.cat([head, b[rows:]], dim=0)

    return RopeFactors(one(base.cos, time.cos), one(base.sin, time.sin))


def grid_factors(times: list[RopeFactors], plane: RopeFactors, t_pairs: int) -> RopeFactors:
    """Factors of a t-major token grid: for each entry of `times` (one position's factors
    `[1, 1, D/2]` at that frame's temporal index), the rows of `plane` (one frame's (h, w) grid,
    `[HW, 1, D/2]`) moved to it (`with_time`) -> `[len(times) * HW, 1, D/2]`."""
    parts = [with_time(plane, len(plane), t, t_pairs) for t in times]
    return RopeFactors(torch.cat([p.cos for p in parts]), torch.cat([p.sin for p in parts]))


def apply_rope(x: torch.Tensor, factors: RopeFactors, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate `x` `[B, L, H, D]` by `factors` (L rows); returns `out_dtype` (default: x's dtype).

    The product is formed in the factors' dtype, rounded to float32, then to `out_dtype`, the
    way the reference rounds (float64 -> float32 -> cache dtype).
    """
    if len(factors) != x.shape[1]:
        raise ValueError(f"RoPE: {len(factors)} position rows for {x.shape[1]} tokens")
    return rotate(x, factors.cos.to(x.device), factors.sin.to(x.device), out_dtype or x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The rotation of `apply_rope` with explicit factors (also traced by the compiled regions,
    models/compiled.py): x `[B, L, H, D]`, cos/sin `[L, 1, D/2]` -> `[B, L, H, D]` in `out_dtype`."""
    b, n, h, d = x.shape
    pairs = x.to(cos.dtype).reshape(b, n, h, d // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.reshape(b, n, h, d).float().to(out_dtype)


__all__ = [
    "ROPE_THETA", "rope_axis_pairs", "rope_inv_freqs", "linspace_int", "grid_positions", "with_time", "grid_factors",
    "RopeFactors", "rope_factors", "apply_rope", "rotate",
]
