"""Options resolved once at the edge (`liveavatar.options`, `liveavatar.sizes.resolve_size`)."""

from __future__ import annotations

import pytest
from PIL import Image

from liveavatar.options import (ATTENTION_BACKENDS, PRECISIONS, CachePolicy, Precision, finite_float, parse_gpus,
                                precision_from_flags, resolve_attention, resolve_fp8_scaling)
from liveavatar.sizes import DEFAULT_MODE, OutputSize, SizeError, resolve_size


def test_fp8_scaling_has_one_default_and_one_shape():
    assert resolve_fp8_scaling(True) == "tensor"  # the reference's scaling
    assert [resolve_fp8_scaling(v) for v in (False, None, "", "none")] == [None] * 4
    assert resolve_fp8_scaling("row") == "row" and resolve_fp8_scaling("tensor") == "tensor"
    with pytest.raises(ValueError, match="fp8"):
        resolve_fp8_scaling("block")
    # CLI flags and the node's precision string reach the same values
    assert precision_from_flags("bf16", True) == PRECISIONS["fp8"] == Precision("bf16", "tensor")
    assert precision_from_flags("bf16", True, "row") == PRECISIONS["fp8_row"]
    assert precision_from_flags("bf16", False, "row") == PRECISIONS["bf16"] == Precision("bf16", None)


def test_attention_cache_policy_gpus_and_numbers():
    assert resolve_attention("sdpa") == "sdpa" and "efficient" not in ATTENTION_BACKENDS
    with pytest.raises(ValueError, match="attn: 'efficient'"):
        resolve_attention("efficient")
    assert CachePolicy.from_choices("auto", "off") == CachePolicy(None, False)
    assert CachePolicy.from_choices("on", "auto") == CachePolicy(True, None)
    with pytest.raises(ValueError, match="maybe"):
        CachePolicy.from_choices("maybe")
    assert parse_gpus("0, cuda:1", 2) == ("cuda:0", "cuda:1")
    assert parse_gpus("cuda", 1) == ("cuda:0",)
    for text, count, words in (("0,1", 0, "none (no CUDA GPU"), ("2", 2, "cuda:2 does not exist"),
                               ("0,0", 2, "twice"), ("a", 2, "not a device"), (" ", 2, "empty")):
        with pytest.raises(ValueError, match="gpus") as exc:
            parse_gpus(text, count)
        assert words in str(exc.value)
    assert finite_float("0.5") == 0.5
    for bad in ("nan", "inf", "-inf", "1e999"):
        with pytest.raises(ValueError, match="finite"):
            finite_float(bad)


def test_size_resolved_once_into_an_output_size():
    img = Image.new("RGB", (640, 480))
    area = resolve_size(img.size, "720*400")
    assert DEFAULT_MODE == "area" and area == OutputSize(640, 448, "area", "720*400")
    assert area.latent_hw == (56, 80)
    assert resolve_size((1, 1), area) is area  # an OutputSize is passed on, not resolved again
    assert resolve_size(img.size, "704x384", "exact") == OutputSize(704, 384, "exact", "704x384")
    with pytest.raises(SizeError, match="multiples of 64"):
        resolve_size(img.size, "720*400", "exact")
