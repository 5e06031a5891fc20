"""Size parsing, the exact-size rule and the reference's area rule (spec §2.2)."""

from __future__ import annotations

import logging

import pytest

from liveavatar.config import DEFAULT_STREAM
from liveavatar.sizes import (
    SizeError, area_fit, exact_sizes, max_area, nearest_valid, parse_size, resolve_output_size,
    valid_sizes,
)


@pytest.mark.parametrize("text", [
    "704*384", "704x384", "704X384", "704 * 384", " 704x384 ", "704 x 384", "\t704*384\n",
    "704\u00d7384",
])
def test_accepted_spellings(text):
    assert parse_size(text) == (704, 384)


def test_pair_and_custom_multiples_of_64():
    assert parse_size((704, 384)) == (704, 384)
    assert parse_size("512x512") == (512, 512)
    assert parse_size("64x64") == (64, 64)
    assert parse_size("1280x704") == (1280, 704)


def test_every_reference_key_is_accepted_in_both_spellings():
    for key in DEFAULT_STREAM.sizes:
        w, h = (int(v) for v in key.split("*"))
        assert parse_size(key) == (w, h)
        assert parse_size(f"{w}x{h}") == (w, h)
    assert valid_sizes() == list(DEFAULT_STREAM.sizes)
    assert max_area() == 1280 * 720


@pytest.mark.parametrize("text", ["704", "704-384", "abc", "0x0", "704x0", "700x384", "704x384x2",
                                  "", "-704x384", "704.0x384", "1344x768", "64x14400"])
def test_rejected_sizes_list_valid_sizes(text):
    with pytest.raises(SizeError) as info:
        parse_size(text)
    msg = str(info.value)
    assert info.value.field == "size"
    assert msg.startswith("size:")
    assert "704*384" in msg and "720*400" in msg and "multiples of 64" in msg


def test_rejection_suggests_nearest():
    with pytest.raises(SizeError, match=r"nearest valid: 704x384"):
        parse_size("700x384")
    assert nearest_valid(700, 390)[0] == "704x384"


def test_non_string_rejected():
    with pytest.raises(SizeError):
        parse_size(704)  # type: ignore[arg-type]


def test_exact_mode_returns_what_was_typed_and_logs(caplog):
    caplog.set_level(logging.INFO, logger="liveavatar")
    # the image's aspect ratio does not matter in exact mode
    assert resolve_output_size((1024, 1024), "704x384", mode="exact") == (704, 384)
    assert resolve_output_size((400, 720), " 704 * 384 ", mode="exact") == (704, 384)
    assert resolve_output_size((720, 400), "384X256", mode="exact") == (384, 256)
    assert resolve_output_size((720, 400), "512x512", mode="exact") == (512, 512)
    lines = [r.getMessage() for r in caplog.records if r.name == "liveavatar"]
    assert lines[0] == "effective size 704x384 (requested '704x384', mode exact)"
    assert len(lines) == 4
    # the default is the reference's area rule: a square image keeps its shape
    assert resolve_output_size((1024, 1024), "704x384") == (512, 512)


def test_exact_mode_refuses_sides_not_multiple_of_64():
    with pytest.raises(SizeError) as info:
        resolve_output_size((720, 400), "720*400", mode="exact")
    msg = str(info.value)
    assert "multiples of 64" in msg and "704x384" in msg and "'area'" in msg
    assert set(exact_sizes()) == {"704*1280", "1280*704", "1024*704", "704*1024", "704*384", "384*256"}


@pytest.mark.parametrize("image, size, expected", [
    ((720, 400), "720*400", (704, 384)),
    ((720, 400), "704*384", (704, 384)),
    ((720, 400), "704x384", (704, 384)),
    ((400, 720), "720*400", (384, 704)),
    ((2720, 1568), "720*400", (704, 384)),
    ((2720, 1568), "704*384", (704, 384)),
    ((1024, 1024), "720*400", (512, 512)),
    ((640, 480), "720*400", (640, 448)),
    ((1920, 1080), "1280*720", (1280, 704)),
    ((300, 300), "720*400", (320, 320)),
])
def test_area_mode_matches_reference_examples(image, size, expected, caplog):
    caplog.set_level(logging.INFO, logger="liveavatar")
    assert resolve_output_size(image, size, mode="area") == expected
    msg = caplog.records[-1].getMessage()
    assert msg.startswith(f"effective size {expected[0]}x{expected[1]} (requested ")
    assert "mode area" in msg


def test_area_fit_properties():
    # results are multiples of 64, within the budget, and follow the image orientation
    for (w, h) in [(3000, 1000), (1000, 3000), (777, 555), (64, 64), (5000, 120)]:
        for key in DEFAULT_STREAM.sizes:
            kw, kh = (int(v) for v in key.split("*"))
            out = area_fit(w, h, kw * kh)
            assert out[0] % 64 == 0 and out[1] % 64 == 0
            assert out[0] * out[1] <= kw * kh
            if w > 2 * h:
                assert out[0] > out[1]


def test_area_fit_2ac_quirk_visible():
    # The reference solves its padding quadratic with b^2 - 2ac under the root; the textbook 4ac
    # would give 640x448 / 640x384 / 768x320 here. We reproduce the reference's (smaller) results.
    assert area_fit(1802, 1400, 720 * 400) == (576, 448)
    assert area_fit(3601, 2400, 704 * 384) == (576, 384)
    assert area_fit(2202, 1000, 720 * 400) == (704, 320)


def test_area_fit_impossible_budget_raises():
    with pytest.raises(SizeError) as info:
        area_fit(100, 100, 4000)
    assert info.value.field == "image"


def test_bad_mode_and_image():
    with pytest.raises(SizeError) as info:
        resolve_output_size((720, 400), "704x384", mode="fit")
    assert info.value.field == "mode"
    with pytest.raises(SizeError):
        resolve_output_size((0, 400), "704x384", mode="area")
