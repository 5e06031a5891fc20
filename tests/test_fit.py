"""size=auto and the auto memory options (`liveavatar.pipeline.fit.fit_job`) on the 14B estimate,
fed the free memory of the cards people have: 24, 48 and 80 GB, and five 24 GB cards."""

from __future__ import annotations

import pytest

from liveavatar.config import DiTConfig
from liveavatar.pipeline.fit import (NoFitError, Options, RankShare, fit_job, option_combinations, rank_estimates,
                                     size_candidates, tpp_layout)
from liveavatar.pipeline.memory import GIB, dit_param_counts, fits

CFG = DiTConfig()
COUNTS = dit_param_counts(CFG)
AUTO = dict(weights_fp8=None, kv_fp8=None, kv_offload=None)  # every memory option auto
# free bytes of a card after the CUDA context and the desktop: a 24 GB card has about 23.5 GiB
CARD_24, CARD_48, CARD_80 = int(23.5 * GIB), int(47.5 * GIB), int(79.5 * GIB)


def _assert_largest_and_cheapest(fit, free, image_wh=None, **choices):
    """The decision's own claims, checked against the estimates: it fits; no larger size of the list
    fits with any allowed combination; no cheaper allowed combination fits at the chosen size."""
    assert all(fits(e, f) for e, f in zip(fit.estimates, free))
    combos = option_combinations(CFG, resident_layers=None, **choices)
    layout = tpp_layout(len(free), 4)

    def fits_with(w, h, opt):
        return all(fits(e, f) for e, f in zip(rank_estimates(CFG, w, h, opt, layout, param_counts=COUNTS), free))

    for _, w, h in size_candidates(image_wh):
        if w * h > fit.width * fit.height:
            assert not any(fits_with(w, h, o) for o in combos), (w, h)
    cheaper = combos[:combos.index(fit.options)]
    assert not any(fits_with(fit.width, fit.height, o) for o in cheaper)


def test_80gb_card():
    fit = fit_job(CFG, [CARD_80], **AUTO)
    assert (fit.width * fit.height, fit.options) == (1280 * 720, Options(weights_fp8=True, kv_offload=True))
    _assert_largest_and_cheapest(fit, [CARD_80], **AUTO)
    # bf16 weights and caches as asked (fp8 off): the KV offload alone gets 1024x704
    bf16 = fit_job(CFG, [CARD_80], weights_fp8=False, kv_fp8=False)
    assert (bf16.width, bf16.height, bf16.options) == (1024, 704, Options(kv_offload=True))
    # 704x384 asked for, options auto: bf16 weights and every cache resident fit (75.0 GiB)
    fixed = fit_job(CFG, [CARD_80], size=(704, 384), **AUTO)
    assert fixed.options == Options() and round(fixed.estimates[0].total / GIB, 1) == 75.0
    assert "size 704x384 as asked" in fixed.reason


def test_48gb_card():
    fit = fit_job(CFG, [CARD_48], **AUTO)
    assert fit.width * fit.height == 1280 * 720
    assert fit.options == Options(weights_fp8=True, kv_fp8=True, kv_offload=True)
    _assert_largest_and_cheapest(fit, [CARD_48], **AUTO)
    # a square reference image, mode area: the sizes keep its aspect ratio
    square = fit_job(CFG, [CARD_48], image_wh=(1000, 1000), **AUTO)  # 960x960 misses by the allocator's
    assert square.width == square.height and square.size_key == "704*1280"  # rounding of 40 blocks (30 MiB)
    _assert_largest_and_cheapest(square, [CARD_48], image_wh=(1000, 1000), **AUTO)
    # fp8 weights unavailable (e.g. an sm86 48 GB card): bf16 weights; 480x832 with fp8 KV caches,
    # 720x400 with bf16 ones
    ampere = fit_job(CFG, [CARD_48], weights_fp8=False, kv_fp8=None, kv_offload=None)
    assert (ampere.width, ampere.height) == (480, 832) and ampere.options == Options(kv_fp8=True, kv_offload=True)
    bf16_kv = fit_job(CFG, [CARD_48], weights_fp8=False, kv_fp8=False, kv_offload=None)
    assert (bf16_kv.width, bf16_kv.height) == (720, 400) and bf16_kv.options == Options(kv_offload=True)


def test_24gb_card():
    fit = fit_job(CFG, [CARD_24], **AUTO)
    assert (fit.width, fit.height) == (384, 256) and fit.options == Options(weights_fp8=True, kv_offload=True)
    _assert_largest_and_cheapest(fit, [CARD_24], **AUTO)
    assert "size auto" in fit.reason and "22.0 GiB of 23.5 GiB free" in fit.reason
    # the defaults (bf16 weights and caches): nothing fits; the message has the estimate, the free
    # memory and the cheapest options that would fit, and is raised before anything is loaded
    with pytest.raises(NoFitError) as err:
        fit_job(CFG, [CARD_24], size=(704, 384))
    text = str(err.value)
    assert "704x384 with --kv-offload on needs about 46.0 GiB on GPU 0" in text
    assert "23.5 GiB free" in text
    # one device: streamed DiT layers make the asked size fit (cheaper than a smaller size)
    assert "Cheapest options that would fit: --fp8 --weights stream (30 of 40 layers resident) at 704*384" in text
    # host RAM too small for the offloaded caches: the offload is not chosen
    with pytest.raises(NoFitError):
        fit_job(CFG, [CARD_24], host_free=2 * GIB, **AUTO)


def test_five_24gb_cards():
    free = [CARD_24] * 5
    assert tpp_layout(5, 4) == (RankShare(1, False),) * 4 + (RankShare(0, True),)
    fit = fit_job(CFG, free, **AUTO, devices=[f"cuda:{i}" for i in range(5)])
    assert (fit.width, fit.height) == (704, 384) and fit.options == Options(weights_fp8=True, kv_fp8=True)
    assert fit.layout == tpp_layout(5, 4) and "4 DiT rank(s) owning 1/1/1/1 steps + a decode rank" in fit.reason
    _assert_largest_and_cheapest(fit, free, **AUTO)
    # 704x384 in fp8 (the target): fits with fp8 KV caches, not with bf16 ones
    target = fit_job(CFG, free, size=(704, 384), weights_fp8=True, kv_fp8=None)
    assert target.options == Options(weights_fp8=True, kv_fp8=True)
    with pytest.raises(NoFitError, match="Cheapest options that would fit: --fp8 --kv-dtype fp8 at 704\\*384"):
        fit_job(CFG, free, size=(704, 384), weights_fp8=True, kv_fp8=False)
    # the decode rank holds no DiT
    assert fit.estimates[-1].weights == 0 and fit.estimates[-1].vae > 0


def test_candidates_and_combinations():
    keys = [k for k, _, _ in size_candidates(None)]
    assert keys[0] in ("720*1280", "1280*720") and keys[-1] == "384*256" and len(keys) == 12
    assert len(size_candidates((720, 400))) < 12  # portrait/landscape twins resolve to one size
    combos = option_combinations(CFG, weights_fp8=None, kv_fp8=None, kv_offload=False, resident_layers=None)
    assert combos[0] == Options() and combos[-1] == Options(weights_fp8=True, kv_fp8=True)
    with pytest.raises(ValueError, match="resident_layers"):
        option_combinations(CFG, weights_fp8=False, kv_fp8=False, kv_offload=False, resident_layers=41)


def test_24gb_card_with_streaming_and_the_audio_encoder():
    """One device with layer streaming allowed (the CLI's `--weights auto`) and wav2vec2 beside the
    DiT: size auto still keeps every block resident when a size fits so; an asked size that does
    not fit resident streams blocks when the host RAM holds them (pinned blocks + every step
    cache); the audio encoder's bytes come off the GPU's free memory and the reason says so."""
    w2v = int(0.59 * GIB)
    fit = fit_job(CFG, [CARD_24], **AUTO, resident_layers="auto", host_free=64 * GIB, beside_dit=w2v)
    assert (fit.width, fit.height) == (384, 256) and fit.options.resident_layers is None
    assert "GPU 0 (less 0.59 GiB for the audio encoder) needs 22.0 GiB of 22.9 GiB free" in fit.reason
    asked = fit_job(CFG, [CARD_24], size=(704, 384), **AUTO, resident_layers="auto", host_free=64 * GIB,
                    beside_dit=w2v)
    assert asked.options.weights_fp8 and asked.options.resident_layers == 30
    assert fits(asked.estimates[0], CARD_24 - w2v)
    assert "--weights stream (30 of 40 layers resident)" in asked.reason
    # streaming keeps every step cache in host RAM (46.7 GiB in bf16 at 704x384): with 32 GiB the
    # fp8 caches (half) are needed, with 16 GiB nothing streams and the asked size does not fit
    small_host = fit_job(CFG, [CARD_24], size=(704, 384), **AUTO, resident_layers="auto", host_free=32 * GIB,
                         beside_dit=w2v)
    assert small_host.options == Options(weights_fp8=True, kv_fp8=True, resident_layers=30)
    with pytest.raises(NoFitError, match="Cheapest options that would fit: --fp8 --kv-offload on at 384\\*256"):
        fit_job(CFG, [CARD_24], size=(704, 384), **AUTO, resident_layers="auto", host_free=16 * GIB, beside_dit=w2v)
    # the encoder's bytes decide: 2 GiB beside the DiT leaves too little for bf16 KV at 384x256
    tight = fit_job(CFG, [CARD_24], **AUTO, beside_dit=2 * GIB)
    assert (tight.width, tight.height) == (384, 256) and tight.options.kv_fp8
