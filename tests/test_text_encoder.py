"""umT5 encoder wrapper against the reference fixtures (fixtures/reference/t5/), fp32 CPU,
plus the prompt cleaning / tokenisation path with a self-made tiny tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fixture_match import assert_matches_fixture
from liveavatar.config import T5Config
from liveavatar.models.text_encoder import (
    T5KeyError,
    TextEncoder,
    clean_prompt,
    convert_t5_state_dict,
    load_tokenizer,
    make_tiny_tokenizer,
    umt5_config,
)


@pytest.fixture(scope="module")
def t5_dir(fixtures_dir):
    return fixtures_dir / "t5"


@pytest.fixture(scope="module")
def tiny_cfg(t5_dir) -> T5Config:
    case = json.loads((t5_dir / "t5_case.json").read_text())
    c = case["config"]
    assert c["shared_pos"] is False  # umT5: one relative-position table per layer
    return T5Config(
        vocab=c["vocab_size"], dim=c["dim"], dim_attn=c["dim_attn"], dim_ffn=c["dim_ffn"],
        num_heads=c["num_heads"], num_layers=c["encoder_layers"], num_buckets=c["num_buckets"],
        text_len=case["text_len"],
    )


@pytest.fixture(scope="module")
def official_sd(t5_dir):
    return load_file(t5_dir / "umt5_tiny_encoder.safetensors")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tiny_cfg):
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tiny_tokenizer(out, tiny_cfg.vocab)
    return out


@pytest.fixture(scope="module")
def encoder(official_sd, tiny_cfg, tok_dir) -> TextEncoder:
    return TextEncoder.from_official_state_dict(official_sd, tiny_cfg, tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def case(t5_dir):
    return load_file(t5_dir / "encode.safetensors")


def test_encode_ids_matches_reference(encoder, case):
    ctx = encoder.encode_ids(case["ids"], case["mask"])
    assert ctx.shape == (40, 64) and ctx.dtype == torch.float32
    assert_matches_fixture(ctx, case["context.0"], "T5 context (eager attention)")
    full = encoder.model(input_ids=case["ids"], attention_mask=case["mask"]).last_hidden_state[0]
    assert_matches_fixture(full, case["out_full"], "T5 full output, padding rows too")


def test_sdpa_attention_is_close(official_sd, tiny_cfg, case):
    enc = TextEncoder.from_official_state_dict(official_sd, tiny_cfg, attn_implementation="sdpa")
    ctx = enc.encode_ids(case["ids"], case["mask"])
    assert (ctx - case["context.0"]).abs().max() < 5e-6  # observed 1.1e-6


def test_key_conversion_pattern_and_tied_embedding(official_sd, tiny_cfg):
    out = convert_t5_state_dict(official_sd)
    assert out["shared.weight"] is official_sd["token_embedding.weight"]
    assert out["encoder.embed_tokens.weight"] is official_sd["token_embedding.weight"]
    assert out["encoder.block.2.layer.1.DenseReluDense.wi_0.weight"] is official_sd["blocks.2.ffn.gate.0.weight"]
    assert out["encoder.block.2.layer.1.DenseReluDense.wi_1.weight"] is official_sd["blocks.2.ffn.fc1.weight"]
    assert (out["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
            is official_sd["blocks.0.pos_embedding.embedding.weight"])
    assert len(out) == len(official_sd) + 1


def test_converted_names_fit_the_real_umt5_xxl(official_sd):
    from transformers import UMT5EncoderModel

    # official names of the 24-layer encoder, made from the tiny file's per-block pattern
    real_names = {}
    for key in official_sd:
        if key.startswith("blocks.0."):
            for i in range(24):
                real_names[key.replace("blocks.0.", f"blocks.{i}.", 1)] = torch.empty(0)
        elif not key.startswith("blocks."):
            real_names[key] = torch.empty(0)
    with torch.device("meta"):
        real = UMT5EncoderModel(umt5_config(T5Config()))
    assert set(convert_t5_state_dict(real_names)) == set(real.state_dict())
    assert real.config.d_kv == 64 and real.config.d_ff == 10240


def test_bad_state_dicts_are_named(official_sd, tiny_cfg):
    with pytest.raises(T5KeyError, match="plain T5"):
        convert_t5_state_dict({**official_sd, "pos_embedding.embedding.weight": torch.zeros(32, 4)})
    partial = {k: v for k, v in official_sd.items() if k != "blocks.1.attn.k.weight"}
    with pytest.raises(T5KeyError, match=r"missing.*encoder\.block\.1\.layer\.0\.SelfAttention\.k\.weight"):
        TextEncoder.from_official_state_dict(partial, tiny_cfg)
    wrong = T5Config(vocab=tiny_cfg.vocab, dim=tiny_cfg.dim, dim_attn=tiny_cfg.dim_attn, dim_ffn=256,
                     num_heads=tiny_cfg.num_heads, num_layers=tiny_cfg.num_layers, num_buckets=tiny_cfg.num_buckets)
    with pytest.raises(T5KeyError, match="shape mismatch"):
        TextEncoder.from_official_state_dict(official_sd, wrong)


def test_clean_prompt():
    assert clean_prompt("  A&amp;amp;B \n\t  talks&nbsp;now  ") == "A&B talks now"
    assert clean_prompt("a\u3000b") == "a b"


def test_tokenize_pads_adds_eos_and_truncates(encoder, tok_dir, tiny_cfg):
    tok = load_tokenizer(tok_dir)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
    ids, mask = encoder.tokenize("A woman   is talking &amp;amp; smiling.")
    words = ["a", "woman", "is", "talking", "&", "smiling", "."]
    assert ids.shape == mask.shape == (1, tiny_cfg.text_len) and ids.dtype == torch.int64
    assert ids[0, : len(words)].tolist() == tok.convert_tokens_to_ids(words)
    assert ids[0, len(words)] == 1 and mask.sum() == len(words) + 1
    assert torch.all(ids[0, len(words) + 1 :] == 0) and torch.all(mask[0, len(words) + 1 :] == 0)
    long_ids, long_mask = encoder.tokenize("talking " * (tiny_cfg.text_len + 50))
    assert long_mask.sum() == tiny_cfg.text_len and long_ids[0, -1] == 1 and long_ids[0, -2] != 1


def test_encode_prompt(encoder):
    ctx = encoder.encode("A man is speaking to the camera.")
    assert ctx.shape == (9, 64)  # 8 tokens + EOS
    ids, mask = encoder.tokenize("A man is speaking to the camera.")
    assert torch.equal(ctx, encoder.encode_ids(ids, mask))


def test_missing_tokenizer_and_bad_ids(official_sd, tiny_cfg, tmp_path):
    enc = TextEncoder.from_official_state_dict(official_sd, tiny_cfg)
    with pytest.raises(RuntimeError, match="tokenizer_dir"):
        enc.encode("hello")
    with pytest.raises(FileNotFoundError, match="umt5-xxl"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="token ids"):
        enc.encode_ids(torch.full((1, 4), tiny_cfg.vocab), torch.ones(1, 4, dtype=torch.int64))
