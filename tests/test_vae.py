"""Wan2.1 VAE wrapper against the reference fixtures (fixtures/reference/vae/), fp32 CPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from fixture_match import assert_matches_fixture
from liveavatar.config import VAEConfig
from liveavatar.models.vae import (
    VAEKeyError,
    WanVAE,
    build_autoencoder,
    convert_vae_state_dict,
)


@pytest.fixture(scope="module")
def vae_dir(fixtures_dir):
    return fixtures_dir / "vae"


@pytest.fixture(scope="module")
def tiny_cfg(vae_dir) -> VAEConfig:
    case = json.loads((vae_dir / "vae_cases.json").read_text())
    tiny = case["tiny_config"]
    return dataclasses.replace(
        VAEConfig(),
        base_dim=tiny["dim"],
        z_dim=tiny["z_dim"],
        dim_mult=tuple(tiny["dim_mult"]),
        num_res_blocks=tiny["num_res_blocks"],
        temperal_downsample=tuple(tiny["temperal_downsample"]),
    )


@pytest.fixture(scope="module")
def official_sd(vae_dir):
    return load_file(vae_dir / "Wan2.1_VAE_tiny.safetensors")


@pytest.fixture(scope="module")
def vae(official_sd, tiny_cfg) -> WanVAE:
    return WanVAE.from_official_state_dict(official_sd, tiny_cfg)


def test_normalisation_constants_match_reference(vae_dir):
    case = json.loads((vae_dir / "vae_cases.json").read_text())
    cfg = VAEConfig()
    assert torch.equal(torch.tensor(cfg.latents_mean), torch.tensor(case["latent_mean_16ch"]))
    assert torch.equal(torch.tensor(cfg.latents_std), torch.tensor(case["latent_std_16ch"]))


def test_key_conversion_agrees_with_diffusers_converter(official_sd):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ours = convert_vae_state_dict(official_sd)
    theirs = convert_wan_vae_to_diffusers(dict(official_sd))
    assert len(official_sd) == 194 and len(ours) == 194
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_converted_names_fit_the_real_layout(official_sd):
    # key names do not depend on base_dim: the tiny file's names are those of Wan2.1_VAE.pth
    real = build_autoencoder(VAEConfig())  # meta device, no memory
    assert set(convert_vae_state_dict(official_sd)) == set(real.state_dict())


def test_unknown_missing_and_misshapen_keys_are_named(official_sd, tiny_cfg):
    bad = dict(official_sd)
    bad["decoder.upsamples.99.residual.0.gamma"] = torch.zeros(1)
    with pytest.raises(VAEKeyError, match=r"decoder\.upsamples\.99"):
        convert_vae_state_dict(bad)
    partial = {k: v for k, v in official_sd.items() if k != "decoder.head.2.bias"}
    with pytest.raises(VAEKeyError, match=r"missing.*decoder\.conv_out\.bias"):
        WanVAE.from_official_state_dict(partial, tiny_cfg)
    with pytest.raises(VAEKeyError, match=r"shape mismatch.*base_dim"):
        WanVAE.from_official_state_dict(official_sd, VAEConfig())  # real width 96 vs file's 8


def test_encode_matches_reference(vae, vae_dir):
    data = load_file(vae_dir / "encode_decode.safetensors")
    z = vae.encode(data["video"][None])
    assert z.shape == (1, 16, 3, 8, 8) and z.dtype == torch.float32
    assert_matches_fixture(z[0], data["latent_mean"], "VAE encode (normalised latents)")


def test_decode_matches_reference(vae, vae_dir):
    data = load_file(vae_dir / "encode_decode.safetensors")
    video = vae.decode(data["latent_mean"][None])
    assert video.shape == (1, 3, 9, 64, 64) and video.dtype == torch.float32
    assert_matches_fixture(video[0], data["decoded"], "VAE decode")
    assert video.abs().max() <= 1.0


def test_stream_decode_as_the_pipeline_drives_it(vae, vae_dir):
    data = load_file(vae_dir / "stream_decode.safetensors")
    latents = data["latents"][None]
    dec = vae.streaming_decoder()
    outs = []
    for i, (a, b) in enumerate([(0, 7), (7, 10), (10, 13)]):  # warm-up with 0..6, then 3-latent blocks
        out = dec.decode(latents[:, :, a:b])
        assert out.shape[2] == (25, 12, 12)[i]
        assert_matches_fixture(out[0], data[f"stream_out.{i}"], f"VAE stream decode call {i}")
        outs.append(out)
    one_shot = vae.decode(latents)
    assert_matches_fixture(one_shot[0], data["decoded_one_shot"], "VAE one-shot decode")
    assert torch.equal(torch.cat(outs, dim=2), one_shot)


def test_frame_by_frame_equals_one_shot_and_reset(vae, vae_dir):
    latents = load_file(vae_dir / "stream_decode.safetensors")["latents"][None]
    one_shot = vae.decode(latents)
    dec = vae.streaming_decoder()
    for _ in range(2):  # the second pass checks reset()
        parts = [dec.decode(latents[:, :, i : i + 1]) for i in range(latents.shape[2])]
        assert [p.shape[2] for p in parts] == [1] + [4] * (latents.shape[2] - 1)
        assert torch.equal(torch.cat(parts, dim=2), one_shot)
        dec.reset()


def test_batch_equals_one_by_one(vae, vae_dir):
    latents = load_file(vae_dir / "stream_decode.safetensors")["latents"][None, :, :5]
    pair = torch.cat([latents, latents.flip(2)])
    out = vae.decode(pair)
    assert torch.equal(out[0:1], vae.decode(latents)) and torch.equal(out[1:2], vae.decode(latents.flip(2)))
    video = load_file(vae_dir / "encode_decode.safetensors")["video"][None, :, :5, :32, :32]
    z = vae.encode(torch.cat([video, video.flip(3)]))
    assert torch.equal(z[1:2], vae.encode(video.flip(3)))
    dec = vae.streaming_decoder()
    dec.decode(pair[:, :, :1])
    with pytest.raises(ValueError, match="batch size changed"):
        dec.decode(latents[:, :, 1:2])


def test_graphed_stream_decode_updates_caches_in_place_bit_for_bit(vae, vae_dir):
    """use_cuda_graphs(): the steady call's body (run eagerly on CPU, captured on CUDA) decodes
    into static caches updated in place; the frames stay the eager stream's bits, batch included."""
    data = load_file(vae_dir / "stream_decode.safetensors")
    latents = data["latents"][None]
    calls = [(0, 7), (7, 10), (10, 13)]
    eager = vae.streaming_decoder()
    eager_out = [eager.decode(latents[:, :, a:b]) for a, b in calls]
    vae.use_cuda_graphs()
    try:
        dec = vae.streaming_decoder()
        for i, (a, b) in enumerate(calls):
            assert torch.equal(dec.decode(latents[:, :, a:b]), eager_out[i]), i
        graph = dec._graphs[0]
        assert graph.static_x is not None and all(c.data_ptr() == s.data_ptr() for c, s in zip(dec._caches[0], graph.static_caches))
        pair = torch.cat([latents, latents.flip(2)])
        dec.reset()
        parts = [dec.decode(pair[:, :, i : i + 1]) for i in range(pair.shape[2])]
        assert len(dec._graphs) == 2 and dec._graphs[0].static_caches[0] is not dec._graphs[1].static_caches[0]
    finally:
        vae.use_cuda_graphs(False)
    assert torch.equal(torch.cat(parts, dim=2), vae.decode(pair))


def test_bad_shapes_are_refused(vae):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))
