"""How our float32 CPU outputs are compared with the reference fixtures (`tests/fixtures/reference`).

The fixtures were made by the official code on one x86 machine. On a machine whose CPU kernels
round the same way our outputs equal them bit for bit (max |diff| 0 for every DiT, VAE and T5
tensor, seen on the development machines and in CI until 2026-12-03). Another instruction set
(AVX2 against AVX-512) or BLAS build sums float32 in another order, and the last bits move: an
AVX2-only AMD EPYC with torch 2.11.0 (2026-12-04) gave relative differences up to the numbers in
tests/README.md ("Fixture comparisons"). The real mistakes these tests exist for move outputs by
far more: the smallest, RoPE factors in float64 instead of the reference's fp16, moves the tiny
DiT's cache keys by 2.2e-4 of their scale (1.0e-3 on 4.5); a wrong mask, position or weight moves
them by whole units.

So a fixture comparison allows `FIXTURE_RTOL` times the reference tensor's largest magnitude, and
every comparison reports its relative difference, so a bitwise match stays visible:
`LIVEAVATAR_FIXTURE_REPORT=path` appends one JSON line per comparison (how the numbers in
tests/README.md were measured). Comparisons of our own code paths with each other stay bitwise
(`torch.equal`) in the tests themselves.
"""

from __future__ import annotations

import json
import os

import torch

# Relative to max |reference|: 4x the worst measured on a foreign CPU (1.0e-5, the DiT's sink keys
# after 4 layers on AVX2), 5x below the smallest reference quirk the DiT tests must catch (2.2e-4).
FIXTURE_RTOL = float(os.environ.get("LIVEAVATAR_FIXTURE_RTOL", "4e-5"))


def relative_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0.0 when bitwise equal); shapes must match."""
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    diff = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    return diff / scale if scale else diff


def assert_matches_fixture(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """`got` equals the fixture tensor `want` within FIXTURE_RTOL of max |want|; same dtype."""
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    rel = relative_diff(got, want)
    report = os.environ.get("LIVEAVATAR_FIXTURE_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"what": what, "relative_diff": rel,
                                "cpu": torch.backends.cpu.get_cpu_capability()}) + "\n")
    assert rel <= FIXTURE_RTOL, (
        f"{what}: max |diff| is {rel:.3g} of max |reference| (allowed {FIXTURE_RTOL:g}, "
        f"LIVEAVATAR_FIXTURE_RTOL); this CPU: {torch.backends.cpu.get_cpu_capability()}")
