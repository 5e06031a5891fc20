"""umT5 text encoder: transformers `UMT5EncoderModel` loaded from the official `T5Encoder`
weights (`models_t5_umt5-xxl-enc-bf16.pth`), plus the prompt cleaning and tokenisation of the
reference.

Output: for one prompt, the encoder's last hidden state trimmed to the real tokens (mask = 1,
EOS included): context [n_real, dim] (dim 4096 for umT5-XXL). The DiT pads it back to
`text_len` rows itself.

Settings that make the library match the reference T5 (eager attention: max |diff| 0 in fp32):
gated GELU with the tanh approximation (`gated-gelu`), relative attention with 32 buckets and
max distance 128, one bias table per layer (umT5), RMS norm eps 1e-6, no 1/sqrt(d) scaling,
no dropout.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch
from torch import nn

from liveavatar.config import T5Config

try:  # the reference cleans with the `regex` module (a transformers dependency)
    import regex as _re
except ImportError:  # pragma: no cover
    _re = re

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
REL_MAX_DISTANCE = 128


class T5KeyError(KeyError):
    """An official T5 state dict whose names or shapes do not fit the configured layout."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------
# key conversion: official T5Encoder names -> transformers UMT5EncoderModel names
# ----------------------------------------------------------------------------------------------

_BLOCK_PARTS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def convert_t5_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official umT5 `T5Encoder` state dict -> transformers `UMT5EncoderModel` names.

    `token_embedding.weight` becomes both `shared.weight` and `encoder.embed_tokens.weight`
    (the same tensor: the two are tied in transformers). Tensors pass through unchanged. Raises
    `T5KeyError` naming the first keys it cannot place (e.g. a shared `pos_embedding` of plain
    T5, which umT5 does not have).
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
            continue
        if key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
            continue
        m = _BLOCK_KEY.match(key)
        if m and m.group(2) in _BLOCK_PARTS:
            out[f"encoder.block.{m.group(1)}.{_BLOCK_PARTS[m.group(2)]}"] = value
            continue
        unknown.append(key)
    if unknown:
        hint = ""
        if "pos_embedding.embedding.weight" in unknown:
            hint = " (a shared position table means plain T5, not umT5)"
        elif any(k.startswith(("encoder.", "shared.")) for k in unknown):
            hint = " (these look like transformers names already)"
        raise T5KeyError(
            f"T5 state dict: {len(unknown)} key(s) are not official umT5 encoder names, first: {unknown[:5]}{hint}"
        )
    return out


def load_official_t5_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read `models_t5_umt5-xxl-enc-bf16.pth` (weights_only) or a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"T5 weights not found: {path} (expected models_t5_umt5-xxl-enc-bf16.pth from the Wan2.2-S2V folder)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from ..loading.safetensors_io import load_pth_state_dict

    return load_pth_state_dict(path)  # weights-only: never unpickles code


def umt5_config(cfg: T5Config, attn_implementation: str = "eager"):
    """transformers `UMT5Config` equal to the official encoder of `cfg`."""
    from transformers import UMT5Config

    if cfg.dim_attn % cfg.num_heads:
        raise ValueError(f"T5Config: dim_attn {cfg.dim_attn} is not divisible by num_heads {cfg.num_heads}")
    config = UMT5Config(
        vocab_size=cfg.vocab,
        d_model=cfg.dim,
        d_kv=cfg.dim_attn // cfg.num_heads,
        d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=REL_MAX_DISTANCE,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=True,
    )
    config._attn_implementation = attn_implementation
    return config


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """The reference's 'whitespace' cleaning: ftfy (when installed), HTML unescape twice, strip,
    collapse whitespace runs to one space."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _re.sub(r"\s+", " ", text).strip()


def load_tokenizer(tokenizer_dir: str | Path):
    """A transformers tokenizer from a local folder (`google/umt5-xxl` of the Wan folder, or a
    folder written by `make_tiny_tokenizer`)."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder not found: {tokenizer_dir} (the Wan2.2-S2V folder has it at google/umt5-xxl)"
        )
    if not any((tokenizer_dir / n).is_file() for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json / spiece.model / tokenizer_config.json inside")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


class SentencePieceTokenizer:
    """The umT5 SentencePiece model as a callable with the slice of the transformers tokenizer
    interface `tokenize` uses (ids + EOS, right padding with id 0, truncation keeping the EOS).

    ComfyUI's umT5 files carry this model as a uint8 tensor `spiece_model` (ComfyUI tokenises
    with it too), so a ComfyUI user needs no separate google/umt5-xxl tokenizer folder.
    """

    def __init__(self, model_proto: bytes):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 1
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def __call__(self, texts, padding: str = "max_length", truncation: bool = True, max_length: int = 512,
                 add_special_tokens: bool = True, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        if padding != "max_length" or return_tensors != "pt":
            raise ValueError("SentencePieceTokenizer: only padding='max_length', return_tensors='pt'")
        rows, masks = [], []
        for text in ([texts] if isinstance(texts, str) else texts):
            ids = list(self.sp.encode(text))
            if truncation:
                ids = ids[: max_length - int(add_special_tokens)]
            ids += [self.eos_id] if add_special_tokens else []
            n = len(ids)
            rows.append(ids + [self.pad_id] * (max_length - n))
            masks.append([1] * n + [0] * (max_length - n))
        return {"input_ids": torch.tensor(rows, dtype=torch.long), "attention_mask": torch.tensor(masks, dtype=torch.long)}


def tokenizer_from_spiece_tensor(blob: torch.Tensor) -> SentencePieceTokenizer:
    """A tokenizer from the `spiece_model` tensor of a ComfyUI umT5 file (uint8 bytes)."""
    return SentencePieceTokenizer(blob.detach().cpu().to(torch.uint8).numpy().tobytes())


_TINY_WORDS = (
    "a an the and or of in on at to with for from by is are was be being this that it its as "
    "man woman person girl boy he she they his her their face head eyes mouth lips smile hair "
    "talking speaking singing looking listening laughing nodding sitting standing moving "
    "camera front view close up portrait studio room office outdoor light soft warm natural "
    "background blurred white black blue red green dark bright video frame high quality "
    "realistic detailed clear calm happy serious friendly young old gentle slowly while "
    "avatar live stream news reporter host presenter teacher speaker audience shirt suit dress "
    ", . ! ? ; : ' \" - & ( )"
).split()


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int) -> None:
    """Write a small WordLevel tokenizer folder that `load_tokenizer` reads.

    Ids: <pad> 0, </s> 1, <unk> 2, then a fixed list of common (lower-case) English words and
    punctuation marks, then filler tokens `tok<i>` up to `vocab_size`. Text is lower-cased and split on whitespace and
    punctuation; every sequence gets `</s>` appended, as the umT5 tokenizer does. For tiny test
    checkpoints only (the real umT5 tokenizer is a 256k SentencePiece model).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 4:
        raise ValueError(f"make_tiny_tokenizer: vocab_size must be >= 4, got {vocab_size}")
    specials = ["<pad>", "</s>", "<unk>"]
    words = list(dict.fromkeys(_TINY_WORDS))[: vocab_size - len(specials)]
    words += [f"tok{i}" for i in range(vocab_size - len(specials) - len(words))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=10**6
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))


def tokenize(tokenizer, prompt: str, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and tokenise one prompt as the reference does -> ids, mask: int64 [1, text_len]
    (EOS appended, padded with id 0, truncated to text_len)."""
    enc = tokenizer(
        [clean_prompt(prompt)],
        padding="max_length",
        truncation=True,
        max_length=text_len,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()


# ----------------------------------------------------------------------------------------------
# the encoder
# ----------------------------------------------------------------------------------------------


class TextEncoder:
    """umT5 encoder + tokenizer. `model` is the transformers `UMT5EncoderModel`."""

    def __init__(self, model: nn.Module, cfg: T5Config, tokenizer=None, device="cpu", dtype=torch.float32):
        self.model = model.eval().requires_grad_(False)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_official_state_dict(
        cls,
        sd: dict[str, torch.Tensor],
        cfg: T5Config = T5Config(),
        tokenizer_dir: str | Path | None = None,
        device="cpu",
        dtype=torch.float32,
        attn_implementation: str = "eager",
        tokenizer=None,
    ) -> "TextEncoder":
        """Build from official-name weights; strict names and shapes. `attn_implementation`
        "eager" reproduces the reference exactly, "sdpa" to ~2e-6 in fp32. The tokenizer comes
        from `tokenizer_dir`, or is given ready (`tokenizer`, e.g. `tokenizer_from_spiece_tensor`)."""
        from transformers import UMT5EncoderModel

        converted = convert_t5_state_dict(sd)
        with torch.device("meta"):
            model = UMT5EncoderModel(umt5_config(cfg, attn_implementation))
        expected = model.state_dict()
        missing = [k for k in expected if k not in converted]
        if missing:
            raise T5KeyError(
                f"T5 state dict: {len(missing)} weight(s) missing for num_layers={cfg.num_layers}; "
                f"first transformers names: {missing[:5]}"
            )
        extra = [k for k in converted if k not in expected]
        if extra:
            raise T5KeyError(
                f"T5 state dict: {len(extra)} unexpected weight(s) for num_layers={cfg.num_layers}, first: {extra[:5]}"
            )
        bad = [(k, tuple(converted[k].shape), tuple(v.shape)) for k, v in expected.items()
               if tuple(converted[k].shape) != tuple(v.shape)]
        if bad:
            k, got, want = bad[0]
            raise T5KeyError(
                f"T5 state dict: {len(bad)} shape mismatch(es), first {k}: file {got}, model {want}; "
                "check T5Config (vocab, dim, dim_attn, dim_ffn, num_heads, num_buckets)"
            )
        cast: dict[int, torch.Tensor] = {}  # keep tied tensors tied
        tensors = {}
        for k, v in converted.items():
            if id(v) not in cast:
                cast[id(v)] = v.to(device=device, dtype=dtype)
            tensors[k] = cast[id(v)]
        model.load_state_dict(tensors, strict=True, assign=True)
        model.encoder.embed_tokens = model.shared
        if tokenizer is None and tokenizer_dir is not None:
            tokenizer = load_tokenizer(tokenizer_dir)
        return cls(model, cfg, tokenizer=tokenizer, device=device, dtype=dtype)

    @classmethod
    def from_file(
        cls, path: str | Path, cfg: T5Config = T5Config(), tokenizer_dir: str | Path | None = None,
        device="cpu", dtype=torch.float32,
    ) -> "TextEncoder":
        return cls.from_official_state_dict(load_official_t5_file(path), cfg, tokenizer_dir, device, dtype)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask int64 [1, L] -> context [n_real, dim] in the model dtype (n_real = mask.sum())."""
        if ids.ndim != 2 or ids.shape[0] != 1 or mask.shape != ids.shape:
            raise ValueError(
                f"TextEncoder.encode_ids: expected ids and mask [1, L], got {tuple(ids.shape)} and {tuple(mask.shape)}"
            )
        if int(ids.max()) >= self.cfg.vocab or int(ids.min()) < 0:
            raise ValueError(f"TextEncoder.encode_ids: token ids must be in 0..{self.cfg.vocab - 1}")
        ids = ids.to(self.device)
        mask = mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        n_real = int(mask.gt(0).sum())
        return hidden[0, :n_real]

    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise RuntimeError(
                "TextEncoder has no tokenizer: pass tokenizer_dir (the google/umt5-xxl folder) when loading"
            )
        return tokenize(self.tokenizer, prompt, self.cfg.text_len)

    def encode(self, prompt: str) -> torch.Tensor:
        """prompt -> context [n_real, dim] (cleaned, tokenised to text_len with EOS, trimmed)."""
        if not isinstance(prompt, str):
            raise TypeError(f"TextEncoder.encode: prompt must be a str, got {type(prompt).__name__}")
        ids, mask = self.tokenize(prompt)
        return self.encode_ids(ids, mask)


__all__ = [
    "T5KeyError", "convert_t5_state_dict", "load_official_t5_file", "umt5_config", "clean_prompt",
    "load_tokenizer", "make_tiny_tokenizer", "tokenize", "TextEncoder", "SentencePieceTokenizer",
    "tokenizer_from_spiece_tensor",
]
