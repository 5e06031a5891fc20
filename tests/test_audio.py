"""Audio path: files / waveforms -> 16 kHz mono -> wav2vec2 -> per-video-frame features.

Reference: fixtures/reference/audio/ (case 7 of its README), made by the official AudioEncoder
around a tiny Wav2Vec2ForCTC. Real audio files are written with PyAV into tmp_path.
"""

from __future__ import annotations

import json
import math
import shutil
import wave as wavfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from liveavatar.media.audio import (
    Audio16k,
    AudioLoadError,
    audio_from_waveform,
    load_audio,
    num_video_frames,
    slice_for_frames,
)
from liveavatar.models.wav2vec import (
    AudioFeatureExtractor,
    Wav2VecLoadError,
    bucket_video_frames,
    num_clips_for,
)

# Reference tensors were made with 2 threads; other thread counts move the stack by up to ~1e-5
# on values of magnitude ~18 (fp32 summation order in the matmuls).
ATOL, RTOL = 1e-5, 1e-6


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def case(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / "audio" / "audio_path.safetensors"))


@pytest.fixture(scope="module")
def tiny_parts(fixtures_dir: Path):
    d = fixtures_dir / "audio"
    sd = load_file(str(d / "wav2vec2_tiny.safetensors"))
    config = json.loads((d / "wav2vec2_tiny_config.json").read_text())
    pre = json.loads((d / "wav2vec2_tiny_preprocessor_config.json").read_text())
    return sd, config, pre


@pytest.fixture(scope="module")
def extractor(tiny_parts) -> AudioFeatureExtractor:
    sd, config, pre = tiny_parts
    return AudioFeatureExtractor.from_state_dict(sd, config, pre)


def _write(path: Path, wave: np.ndarray, rate: int, codec: str, container: str | None = None) -> Path:
    """Encode `wave` [C, T] float32 with PyAV."""
    channels = wave.shape[0]
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        step = 1024
        for i in range(0, wave.shape[1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, i : i + step]), format="fltp", layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _sine(freq: float, rate: int, n: int, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(n) / rate
    return np.repeat((amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)[None], channels, axis=0)


def _peak_hz(samples: torch.Tensor, rate: int) -> float:
    spec = torch.fft.rfft(samples.double() * torch.hann_window(samples.shape[0], dtype=torch.float64))
    return float(spec.abs().argmax()) * rate / samples.shape[0]


# --------------------------------------------------------------------------- reference parity


def test_input_values_match_processor(extractor, case):
    assert torch.equal(extractor.normalize(case["waveform_16k"]), case["input_values"])


def test_hidden_states_50fps(extractor, case):
    hs = extractor.hidden_states(case["waveform_16k"])
    assert hs.shape == (extractor.num_states, 114, extractor.hidden_size) == case["hidden_states_50fps"].shape
    # The last state is after the encoder's final LayerNorm (transformers >= 5.16 alone would give
    # the pre-norm state there, ~15 away).
    torch.testing.assert_close(hs, case["hidden_states_50fps"], atol=ATOL, rtol=RTOL)


def test_features_30fps_and_video_buckets(extractor, case):
    wave = case["waveform_16k"]
    torch.testing.assert_close(extractor.features_30fps(wave), case["feat_30fps"], atol=ATOL, rtol=RTOL)
    emb = extractor.video_frame_features(wave)
    assert emb.dtype == torch.float32 and emb.shape == case["audio_emb"].shape == (1, 25, 32, 96)
    torch.testing.assert_close(emb, case["audio_emb"], atol=ATOL, rtol=RTOL)
    for b in range(2):
        torch.testing.assert_close(emb[..., 12 * b : 12 * b + 12], case[f"block{b}.audio_input"], atol=ATOL, rtol=RTOL)


def test_wav_file_to_block_inputs(extractor, case, tmp_path):
    """Float WAV on disk -> load_audio -> the reference's per-block audio input."""
    wave = case["waveform_16k"]
    path = _write(tmp_path / "speech.wav", wave.numpy()[None], 16000, "pcm_f32le")
    audio = load_audio(path)
    assert torch.equal(audio.samples, wave)
    emb = extractor.video_frame_features(audio.samples)
    torch.testing.assert_close(emb[..., 12:24], case["block1.audio_input"], atol=ATOL, rtol=RTOL)


def test_bucket_rule():
    feat = torch.arange(68, dtype=torch.float32).view(1, 68, 1)
    emb = bucket_video_frames(feat)  # 25 fps video, 30 fps features, 48-frame clips
    assert num_clips_for(68) == 2 and emb.shape == (1, 1, 1, 96)
    j = torch.arange(96)
    idx = torch.from_numpy(np.round(j.numpy() * 1.2)).float()
    expected = torch.where(idx < 68, idx, torch.zeros(()))
    assert torch.equal(emb[0, 0, 0], expected)
    assert num_clips_for(57) == 1 and num_clips_for(58) == 2  # 48 frames span 57.6 feature frames


# --------------------------------------------------------------------------- loading weights


def test_from_pretrained_folder_safetensors_and_bin(tiny_parts, case, tmp_path):
    sd, config, pre = tiny_parts
    st = tmp_path / "st"
    st.mkdir()
    (st / "config.json").write_text(json.dumps(config))
    (st / "preprocessor_config.json").write_text(json.dumps(pre))
    save_file(sd, str(st / "model.safetensors"))
    # An older checkpoint: weight norm as weight_g / weight_v, pickled with torch.save.
    old = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"): v
           for k, v in sd.items()}
    assert any(k.endswith("weight_g") for k in old)
    binf = tmp_path / "bin"
    binf.mkdir()
    shutil.copy(st / "config.json", binf / "config.json")
    shutil.copy(st / "preprocessor_config.json", binf / "preprocessor_config.json")
    torch.save(old, binf / "pytorch_model.bin")
    wave = case["waveform_16k"]
    for folder in (st, binf):
        ex = AudioFeatureExtractor.from_pretrained(folder)
        assert ex.num_states == 25 and ex.hidden_size == 32 and ex.sample_rate == 16000
        torch.testing.assert_close(ex.hidden_states(wave), case["hidden_states_50fps"], atol=ATOL, rtol=RTOL)


def test_load_errors_name_the_problem(tiny_parts, tmp_path):
    sd, config, pre = tiny_parts
    with pytest.raises(Wav2VecLoadError, match="not found"):
        AudioFeatureExtractor.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Wav2VecLoadError, match="no wav2vec2 weights"):
        AudioFeatureExtractor.from_pretrained(tmp_path)
    broken = {k: v for k, v in sd.items() if "layers.3." not in k}
    with pytest.raises(Wav2VecLoadError, match="missing"):
        AudioFeatureExtractor.from_state_dict(broken, config, pre)


def test_too_short_audio_is_refused(extractor):
    with pytest.raises(ValueError, match="too short"):
        extractor.hidden_states(torch.zeros(300))
    with pytest.raises(ValueError, match=r"\[T\]"):
        extractor.hidden_states(torch.zeros(2, 16000))


# --------------------------------------------------------------------------- reading files


def test_load_16k_mono_wav_is_untouched(tmp_path):
    wave = _sine(440, 16000, 12345)
    audio = load_audio(_write(tmp_path / "a.wav", wave, 16000, "pcm_f32le"))
    assert isinstance(audio, Audio16k) and audio.sample_rate == 16000
    assert audio.samples.dtype == torch.float32 and audio.samples.shape == (12345,)
    assert torch.equal(audio.samples, torch.from_numpy(wave[0]))
    assert audio.duration_s == pytest.approx(12345 / 16000)
    assert audio.source == str(tmp_path / "a.wav")


def test_load_44k_stereo_resamples_and_mixes_to_mono(tmp_path):
    n = 44100 + 7
    left = _sine(1000, 44100, n)[0]
    right = _sine(2500, 44100, n, amp=0.25)[0]
    path = _write(tmp_path / "st.wav", np.stack([left, right]), 44100, "pcm_s16le")
    audio = load_audio(path)
    assert audio.samples.ndim == 1 and audio.sample_rate == 16000
    assert audio.samples.shape[0] == math.ceil(n * 16000 / 44100)  # resampled length rule
    spec = torch.fft.rfft(audio.samples.double() * torch.hann_window(audio.samples.shape[0], dtype=torch.float64)).abs()
    hz = torch.arange(spec.shape[0]) * 16000 / audio.samples.shape[0]
    for lo, hi, f in ((0, 1750, 1000), (1750, 8000, 2500)):
        band = (hz >= lo) & (hz < hi)
        assert abs(float(hz[band][spec[band].argmax()]) - f) <= 1.0
    # Mean of channels: amplitudes 0.5 and 0.25 -> 0.25 and 0.125 in the mix.
    seg = audio.samples[2000:-2000].double()
    t = torch.arange(seg.shape[0], dtype=torch.float64) / 16000
    for f, amp in ((1000, 0.25), (2500, 0.125)):
        c = torch.stack([torch.sin(2 * math.pi * f * t), torch.cos(2 * math.pi * f * t)])
        coef = torch.linalg.lstsq(c.T, seg[:, None]).solution
        assert float(coef.norm()) == pytest.approx(amp, rel=0.02)


def test_load_8k_upsamples(tmp_path):
    n = 8000 + 3
    audio = load_audio(_write(tmp_path / "low.wav", _sine(440, 8000, n), 8000, "pcm_s16le"))
    assert audio.samples.shape[0] == math.ceil(n * 16000 / 8000) == 16006
    assert abs(_peak_hz(audio.samples, 16000) - 440) <= 1.0


@pytest.mark.parametrize("name,codec,container", [("tone.mp3", "libmp3lame", None), ("tone.ogg", "libopus", "ogg")])
def test_load_compressed_formats(tmp_path, name, codec, container):
    rate = 44100 if codec == "libmp3lame" else 48000
    path = _write(tmp_path / name, _sine(660, rate, rate * 2, channels=2), rate, codec, container)
    audio = load_audio(path)
    assert audio.sample_rate == 16000 and audio.samples.ndim == 1
    assert abs(audio.duration_s - 2.0) < 0.06  # encoder priming/padding
    assert abs(_peak_hz(audio.samples, 16000) - 660) <= 1.0


def test_relative_and_absolute_paths(tmp_path, monkeypatch):
    _write(tmp_path / "rel.wav", _sine(440, 16000, 1600), 16000, "pcm_s16le")
    monkeypatch.chdir(tmp_path)
    a = load_audio("rel.wav")
    b = load_audio(tmp_path / "rel.wav")
    assert torch.equal(a.samples, b.samples) and a.samples.shape == (1600,)


def test_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.wav"
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(missing)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioLoadError, match="notes.wav"):
        load_audio(text)
    empty = tmp_path / "zero.mp3"
    empty.write_bytes(b"")
    with pytest.raises(AudioLoadError, match="zero.mp3"):
        load_audio(empty)
    silent = tmp_path / "nothing.wav"  # a valid WAV header with no sample frames
    with wavfile.open(str(silent), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    with pytest.raises(AudioLoadError, match=r"nothing\.wav.*no audio samples"):
        load_audio(silent)


# --------------------------------------------------------------------------- waveforms, frames


def test_audio_from_waveform_shapes():
    wave = torch.from_numpy(_sine(300, 48000, 4800, channels=2))
    for w in (wave[None], wave, wave[0]):
        audio = audio_from_waveform(w, 48000)
        assert audio.samples.shape == (1600,) and audio.sample_rate == 16000
    assert torch.equal(audio_from_waveform(wave[0], 16000).samples, wave[0])
    with pytest.raises(AudioLoadError, match="B must be 1"):
        audio_from_waveform(torch.zeros(2, 1, 100), 16000)
    with pytest.raises(AudioLoadError, match="floating-point"):
        audio_from_waveform(torch.zeros(1, 100, dtype=torch.int16), 16000)
    with pytest.raises(AudioLoadError, match="empty"):
        audio_from_waveform(torch.zeros(1, 0), 16000)


def test_slice_for_frames_and_frame_count():
    samples = torch.arange(16000 + 700, dtype=torch.float32)  # 1.04375 s
    audio = Audio16k(samples, 16000, "ramp")
    assert num_video_frames(audio) == 26  # floor(1.04375 * 25)
    chunk = slice_for_frames(audio, 2, 3)
    assert torch.equal(chunk, samples[1280:3200])
    tail = slice_for_frames(audio, 25, 2)  # samples 16000..17280, audio ends at 16700
    assert tail.shape == (1280,)
    assert torch.equal(tail[:700], samples[16000:]) and not tail[700:].any()
    # A rate that is not a multiple of fps: boundaries round(j * sr / fps).
    odd = Audio16k(torch.ones(44100), 44100, "odd")
    assert slice_for_frames(odd, 1, 1, fps=30).shape == (round(2 * 44100 / 30) - round(44100 / 30),)
    assert num_video_frames(odd, fps=30) == 30


# --------------------------------------------------------------------------- into the DiT's audio encoder


@pytest.mark.parametrize("block", [0, 1])
def test_block_input_through_causal_audio_encoder(extractor, case, fixtures_dir, block):
    """Our per-block audio input -> the DiT's CausalAudioEncoder (liveavatar.models.causal_audio)."""
    from liveavatar.config import DEFAULT_STREAM
    from liveavatar.models.causal_audio import CausalAudioEncoder

    d = fixtures_dir / "audio"
    meta = json.loads((d / "audio_case.json").read_text())["causal_audio_encoder"]
    prefix = "casual_audio_encoder."
    sd = {k[len(prefix):]: v for k, v in load_file(str(d / "causal_audio_encoder_tiny.safetensors")).items()}
    enc = CausalAudioEncoder(meta["dim"], meta["out_dim"], meta["num_layers"], meta["num_token"], meta["need_global"])
    enc.load_state_dict(sd, strict=True)

    fpb = DEFAULT_STREAM.frames_per_block
    x = extractor.video_frame_features(case["waveform_16k"])[..., fpb * block : fpb * (block + 1)]
    # The DiT prepends motion_frames copies of the block's first audio frame.
    x = torch.cat([x[..., :1].expand(-1, -1, -1, DEFAULT_STREAM.motion_frames), x], dim=-1)
    torch.testing.assert_close(x, case[f"block{block}.encoder_in"], atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        g, loc = enc(x)
    torch.testing.assert_close(g, case[f"block{block}.global_all"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(loc, case[f"block{block}.local_all"], atol=ATOL, rtol=RTOL)
    keep = DEFAULT_STREAM.motion_frames_latent
    torch.testing.assert_close(g[:, keep:], case[f"block{block}.audio_emb_global"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(loc[:, keep:], case[f"block{block}.merged_audio_emb"], atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- parity with librosa.load


def _librosa_load_16k(path: Path) -> np.ndarray:
    """What the reference's `librosa.load(path, sr=16000)` returns for a 16-bit PCM WAV, rebuilt from
    librosa's documented steps without our decoder: libsndfile reads int16 as float32 / 32768,
    `to_mono` is the float32 channel mean, `resample` calls `soxr.resample(y, sr, 16000,
    quality="soxr_hq")` and fixes the length to `ceil(T * 16000 / sr)` (zero pad / cut), dtype kept."""
    import soxr

    with wavfile.open(str(path), "rb") as w:
        rate, channels = w.getframerate(), w.getnchannels()
        assert w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, channels).T
    y = pcm.astype(np.float32) / np.float32(32768.0)
    y = np.mean(y, axis=0)
    n = int(np.ceil(y.shape[-1] * (float(16000) / rate)))
    y_hat = soxr.resample(y, rate, 16000, quality="soxr_hq")
    y_hat = np.pad(y_hat, (0, max(0, n - y_hat.shape[0])))[:n]
    return np.asarray(y_hat, dtype=y.dtype)


def _speech_like(rate: int, n: int, channels: int, seed: int) -> np.ndarray:
    """Broadband test signal [C, n] in [-0.9, 0.9]: a chirp up to just under the 16 kHz Nyquist
    (8 kHz), where resamplers differ most, plus noise."""
    g = np.random.default_rng(seed)
    t = np.arange(n) / rate
    chirp = 0.4 * np.sin(2 * np.pi * (200 * t + (7800 - 200) / (2 * t[-1]) * t**2))
    return np.stack([(chirp + 0.3 * g.uniform(-1, 1, n)).astype(np.float32) * (0.9 - 0.2 * c) for c in range(channels)])


@pytest.mark.parametrize("rate,channels", [(44100, 2), (48000, 1), (22050, 2), (8000, 1)])
def test_file_waveform_equals_librosa_load(tmp_path, rate, channels):
    n = rate * 2 + 331
    path = _write(tmp_path / f"s{rate}.wav", _speech_like(rate, n, channels, seed=rate), rate, "pcm_s16le")
    ours = load_audio(path).samples
    ref = _librosa_load_16k(path)
    assert ours.dtype == torch.float32 and ours.shape == (ref.shape[0],) == (math.ceil(n * 16000 / rate),)
    assert float((ours - torch.from_numpy(ref)).abs().max()) <= 1e-6
    if rate == 44100:
        # the torchaudio resampler used before differs visibly on this signal: the test can tell them apart
        import torchaudio.functional as AF

        mono = torch.from_numpy(_speech_like(rate, n, channels, seed=rate)).mean(0)
        old = AF.resample(mono, orig_freq=rate, new_freq=16000)
        assert float((old - torch.from_numpy(ref)).abs().max()) > 1e-3
