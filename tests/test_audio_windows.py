"""Audio of any length: spooled 16 kHz samples and wav2vec2 features computed window by window.

Real files (written with PyAV / the wave module), the fixture's tiny wav2vec2 (reference case 7)
and the tiny checkpoint's wav2vec2; speech-like audio from bench/speechlike.py.
"""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
from test_audio import _speech_like, _write, extractor, tiny_parts  # noqa: F401  (fixtures)

from bench.speechlike import speechlike, write_speechlike_wav
from liveavatar.media.audio import Audio16k, SpooledAudio16k, audio_from_waveform, load_audio, open_audio
from liveavatar.pipeline.audio_features import WindowedAudioFeatures

LEAD = 3 * 640  # the pipeline's lead-in: 3 frames of silence at 16 kHz / 25 fps
COLUMNS = dict(fps=25, feature_fps=30, pad_to_multiple=48, dtype=torch.float32)


def _all_columns(feats: WindowedAudioFeatures, step: int = 12) -> torch.Tensor:
    """Every column, fetched block by block as the sampler does (plus one block past the end)."""
    cols = [feats.columns(g, g + step) for g in range(0, feats.total + step, step)]
    return torch.cat(cols, dim=-1)[..., :feats.total]


# --------------------------------------------------------------------------- spooled samples


@pytest.mark.parametrize("rate,channels,codec", [(44100, 2, "pcm_s16le"), (48000, 1, "flac"), (16000, 1, "pcm_f32le")])
def test_streamed_file_equals_the_in_memory_decode(tmp_path, rate, channels, codec):
    """open_audio (frame-by-frame decode, chunked mono mix, soxr stream) spools bit for bit the
    samples of load_audio (whole-clip decode, one-shot soxr)."""
    n = rate * 3 + 517
    path = _write(tmp_path / f"a{rate}.{'flac' if codec == 'flac' else 'wav'}",
                  _speech_like(rate, n, channels, seed=rate), rate, codec)
    whole = load_audio(path)
    spooled = open_audio(path, in_memory_s=0.0)
    assert isinstance(spooled, SpooledAudio16k) and spooled.num_samples == whole.num_samples
    assert torch.equal(spooled.read(0, spooled.num_samples), whole.samples)
    assert torch.equal(spooled.read(-5, 7)[:5], torch.zeros(5))  # outside the clip: zeros
    assert torch.equal(spooled.read(whole.num_samples - 3, whole.num_samples + 4)[3:], torch.zeros(4))
    short = open_audio(path)  # 3 s: kept in RAM, the same samples
    assert isinstance(short, Audio16k) and torch.equal(short.samples, whole.samples)
    m, x = spooled.moments(), whole.samples.double().numpy()
    assert m.count == x.size and m.mean == pytest.approx(x.mean(), rel=1e-9, abs=1e-12)
    assert m.var == pytest.approx(x.var(), rel=1e-9)


def test_long_waveform_is_spooled_in_chunks_with_the_same_samples():
    rate = 44100
    wave = torch.from_numpy(_speech_like(rate, rate * 4 + 99, 2, seed=5))[None]  # ComfyUI AUDIO [1, C, T]
    ram = audio_from_waveform(wave, rate)
    spooled = audio_from_waveform(wave, rate, in_memory_s=1.0)
    assert isinstance(ram, Audio16k) and isinstance(spooled, SpooledAudio16k)
    assert torch.equal(spooled.read(0, spooled.num_samples), ram.samples)


def test_spool_pickles_as_its_path_and_the_owner_removes_the_file(tmp_path):
    path = tmp_path / "s.wav"
    write_speechlike_wav(path, 2.0)
    spooled = open_audio(path, in_memory_s=0.0)
    blob = pickle.dumps(spooled)
    assert len(blob) < 1000  # the samples do not travel
    copy = pickle.loads(blob)
    assert torch.equal(copy.read(100, 900), spooled.read(100, 900))
    del copy  # a copy does not own the file
    assert os.path.exists(spooled.path)
    where = spooled.path
    del spooled
    assert not os.path.exists(where)


def test_speechlike_does_not_depend_on_how_it_is_cut():
    whole = speechlike(0, 200_000)
    assert np.array_equal(np.concatenate([speechlike(0, 70_001), speechlike(70_001, 129_999)]), whole)


# --------------------------------------------------------------------------- windowed features


def _padded(wave: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(LEAD), wave])


def test_single_window_is_the_one_pass_bit_for_bit(extractor):  # noqa: F811
    """A clip that fits one window takes the reference's one pass: bitwise equal."""
    wave = torch.from_numpy(speechlike(0, 16000 * 7 + 123))
    feats = WindowedAudioFeatures(extractor, Audio16k(wave), lead_in_samples=LEAD, **COLUMNS)
    one_pass = extractor.video_frame_features(_padded(wave))
    assert feats.single_pass and feats.shape == tuple(one_pass.shape)
    assert torch.equal(_all_columns(feats), one_pass)
    assert not feats.columns(feats.total, feats.total + 12).any()  # past the clip: zeros


def test_windows_that_see_the_whole_clip_reproduce_the_one_pass(extractor):  # noqa: F811
    """Forced windows (4 s) whose context covers the whole clip: the bookkeeping (sample ranges,
    global normalisation, interpolation positions, buckets) is exact; what remains is float
    rounding (normalisation statistics in float64, interpolation weights): measured 1.8e-4 on
    values up to 17 (1e-5 relative)."""
    wave = torch.from_numpy(speechlike(0, 16000 * 12))
    one_pass = extractor.video_frame_features(_padded(wave))
    feats = WindowedAudioFeatures(extractor, Audio16k(wave), lead_in_samples=LEAD, max_single_pass_s=0.0,
                                  window_s=4.0, context_s=1000.0, **COLUMNS)
    got = _all_columns(feats)
    assert not feats.single_pass and feats.windows_computed == math.ceil(feats.total / feats.window) == 3
    assert (got - one_pass).abs().max() <= 1e-4 * one_pass.abs().max()


@pytest.fixture(scope="module")
def long_case(extractor):  # noqa: F811
    """70 s of speech-like audio, spooled: one-pass features vs the default windows."""
    wave = torch.from_numpy(speechlike(0, 16000 * 70, seed=1))
    one_pass = extractor.video_frame_features(_padded(wave))
    audio = audio_from_waveform(wave, 16000, in_memory_s=0.0)
    feats = WindowedAudioFeatures(extractor, audio, lead_in_samples=LEAD, **COLUMNS)
    return one_pass, feats, _all_columns(feats)


def test_default_windows_on_70s_stay_close_to_the_one_pass(long_case):
    """30 s windows (rounded up to 768 columns) + 5 s context on each side, on 70 s (3 windows).

    State 0 (conv features + positional conv, before attention) is exact up to float rounding. The
    fixture's random wav2vec2 attends almost uniformly over the whole clip, a pessimistic case for
    windows: measured max |diff| 0.47 on values up to 19.5 (2.4 %), mean |diff| 0.03.
    """
    one_pass, feats, got = long_case
    assert not feats.single_pass and feats.windows_computed == 3 and got.shape == one_pass.shape
    scale = one_pass.abs().max()
    assert (got[:, 0] - one_pass[:, 0]).abs().max() <= 1e-4 * scale
    assert (got - one_pass).abs().max() <= 0.03 * scale
    assert (got - one_pass).abs().mean() <= 0.003 * scale


def test_windows_hold_one_window_at_a_time(long_case):
    _, feats, got = long_case
    k, cached = feats._cached
    assert cached.shape[-1] == feats.total - k * feats.window <= feats.window  # the last window only
    again = feats.columns(0, 12)  # going back recomputes the first window, the same values
    assert feats._cached[0] == 0 and torch.equal(again, got[..., :12])
