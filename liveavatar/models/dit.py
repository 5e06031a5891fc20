"""Causal S2V DiT of Live Avatar (Wan2.2-S2V-14B + block-causal streaming), plain PyTorch.

Spec: liveavatar-reference.md §2.6, §3.3-§3.10. Parity with the official `CausalWanModel_S2V`
streaming calls is tested against the reference fixtures (tests/test_dit_parity.py).

Use (batch 1, one job):
    model = CausalS2VDiT(cfg).to(device, dtype)          # state_dict keys = official names
    sink = model.new_sink_cache((h, w), device, dtype)   # shared by all denoising steps
    steps = [model.new_step_cache((h, w), device, dtype) for _ in timesteps]
    text = model.encode_text(t5_context)                  # [L_txt, text_dim]
    model.prefill_sink(ref_latents, motion_latents, text, sink)
    for block at absolute latent frame F0, for step i:
        v = model.forward_block(x, t_i, text, audio_input, None, steps[i], sink, F0, d)

Token sequences (fsl = tokens per latent frame = (h/2)(w/2)):
- sink prefill: [reference frame (fsl) | FramePack motion tokens] with cond-mask ids 1 / 2,
  time modulation of t = 0, no audio; stores un-rotated K/V per layer in the SinkCache.
- streaming block: 3 latent frames (3 fsl tokens) with cond-mask id 0, per-frame time
  modulation, audio injected after `audio_inject_layers`, attends to its step cache ring (this
  block and up to 3 earlier ones at the same step) and to the sink with the reference token at
  temporal position max(30, F0 + sink_offset).

Time modulation `e0` `[2, F, 6, dim]` (float32): row 0 = the block's timestep per frame, row 1 =
timestep 0 (used by sink tokens, frame 0). The head uses the per-frame time embedding `e`.
Initialisation is PyTorch's default: load a checkpoint before use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DEFAULT_STREAM, ConfigError, DiTConfig, StreamConfig
from .attention import BACKENDS
from .audio_injector import AudioInjector
from .causal_audio import CausalAudioEncoder
from .dit_blocks import DiTBlock, Head, fp32_linear
from .framepack import FramePackMotioner
from .tokens import clip_tokens, frame_tokens, sink_tokens
from .kv_cache import KVWorkingBuffer, SinkCache, StepKVCache, kv_row_width, kv_storage_dtype
from .graphs import BlockGraphs
from .rope import RopeFactors, grid_factors, grid_positions, rope_axis_pairs, rope_factors, with_time

# trainable_cond_mask rows
_NOISY, _REF, _MOTION = 0, 1, 2


@dataclass
class TextState:
    """Embedded text of one job. context `[1, text_len, dim]`; kv (optional) per-layer cross-attention
    keys/values `[layers, 2, 1, text_len, heads, head_dim]`, precomputed because the text is fixed."""

    context: torch.Tensor
    kv: torch.Tensor | None = None


def sinusoidal_embedding(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """`[N]` -> `[N, dim]` float64: `[cos(p*w_k), sin(p*w_k)]`, `w_k = 10000^(-k/(dim/2))`."""
    half = dim // 2
    p = positions.to(torch.float64)
    angles = torch.outer(p, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=p.device).div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def layer_slice(num_layers: int, layers: range | None = None) -> range:
    """The checked contiguous layer range a DiT module holds (None: all `num_layers`)."""
    if layers is None:
        return range(num_layers)
    if not isinstance(layers, range) or layers.step != 1 or not 0 <= layers.start < layers.stop <= num_layers:
        raise ValueError(f"layers: {layers!r} must be a non-empty contiguous range inside 0..{num_layers}")
    return layers


def _check_supported(cfg: DiTConfig) -> None:
    wrong = []
    if not (cfg.enable_adain and cfg.adain_mode == "attn_norm"):
        wrong.append("enable_adain must be true with adain_mode 'attn_norm'")
    if not cfg.enable_framepack or cfg.enable_motioner:
        wrong.append("enable_framepack must be true and enable_motioner false")
    if not cfg.zero_timestep:
        wrong.append("zero_timestep must be true")
    if not cfg.add_last_motion:
        wrong.append("add_last_motion must be true")
    if cfg.cond_dim <= 0:
        wrong.append("cond_dim must be > 0 (pose encoder)")
    if wrong:
        raise ConfigError("config.json: not a Live Avatar S2V layout: " + "; ".join(wrong))


def indexed_device(device: torch.device | str) -> torch.device:
    """`device` with its index: a bare "cuda" (what `LoadOptions` holds) is the current "cuda:N",
    the form tensors report, so that device comparisons mean the same GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class CausalS2VDiT(nn.Module):
    """The streaming S2V DiT. Parameters/keys as the official checkpoint; see the module docstring."""

    def __init__(self, cfg: DiTConfig, stream: StreamConfig = DEFAULT_STREAM, attn_backend: str = "sdpa",
                 rope_fp16_tables: bool = True, rope_compute_dtype: torch.dtype | None = None,
                 layers: range | None = None):
        """`layers`: the contiguous layer slice this module holds (default: all `cfg.num_layers`).
        A slice builds only its transformer layers and their audio injectors (other entries are
        parameter-free placeholders, so the state dict keeps the official names of the held ones);
        its caches hold only its layers, and `forward_block` / `prefill_sink` embed the input only
        on the first slice and apply the head only on the last (see `layer_slice`)."""
        super().__init__()
        _check_supported(cfg)
        self.cfg = cfg
        self.layers = layer_slice(cfg.num_layers, layers)
        self.stream = stream
        self.attn_backend = attn_backend
        self.rope_fp16_tables = rope_fp16_tables
        self.rope_compute_dtype = rope_compute_dtype
        self._time_cache: dict = {}
        self._rope_cache: dict = {}
        self._rope_parts: dict = {}  # time rows and position bases the kept factors are made of
        self._rows_cache: dict = {}
        self._fused = None  # FusedLayers once compile_blocks() ran
        self._graphs: BlockGraphs | None = None  # once use_cuda_graphs() ran
        self._stream = None  # LayerStream once stream_layers() ran
        d, p = cfg.dim, tuple(cfg.patch_size)

        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=p, stride=p)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg.ffn_dim, cfg.num_heads, cfg.qk_norm, cfg.cross_attn_norm, cfg.eps)
            if i in self.layers else nn.Identity() for i in range(cfg.num_layers))
        self.head = Head(d, cfg.out_dim, p, cfg.eps)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, d, kernel_size=p, stride=p)
        self.casual_audio_encoder = CausalAudioEncoder(
            cfg.audio_dim, d, cfg.audio_num_layers, cfg.num_audio_token, need_global=True)
        self.audio_injector = AudioInjector(d, cfg.num_heads, tuple(cfg.audio_inject_layers))
        for j, layer in enumerate(cfg.audio_inject_layers):  # injectors of other slices' layers: not held
            if layer not in self.layers:
                self.audio_injector.injector[j] = nn.Identity()
                self.audio_injector.injector_adain_layers[j] = nn.Identity()
        self.trainable_cond_mask = nn.Embedding(3, d)
        self.frame_packer = FramePackMotioner(cfg.in_dim, d, tuple(stream.framepack_buckets))

    # ----------------------------------------------------------------------------- properties

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"attn_backend {name!r}: choose one of {BACKENDS}")
        self._attn_backend = name

    @property
    def rope_compute_dtype(self) -> torch.dtype:
        """Dtype of the RoPE rotation. Default (None): float32 on CUDA (3e-7 relative to float64 on
        the 14B, and float64 is slow on GPUs), float64 elsewhere (the reference's arithmetic, CPU
        parity). The factors keep the reference's float16 rounding either way (`rope_fp16_tables`)."""
        if self._rope_dtype is not None:
            return self._rope_dtype
        return torch.float32 if self.device.type == "cuda" else torch.float64

    @rope_compute_dtype.setter
    def rope_compute_dtype(self, dtype: torch.dtype | None) -> None:
        self._rope_dtype = dtype
        self._rope_cache, self._rope_parts = {}, {}

    @property
    def first_slice(self) -> bool:
        """Holds layer 0: embeds the block latents (and the sink conditioning) itself."""
        return self.layers.start == 0

    @property
    def last_slice(self) -> bool:
        """Holds the last layer: applies the head."""
        return self.layers.stop == self.cfg.num_layers

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype = weight dtype."""
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def _grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        h, w = (int(v) for v in latent_hw)
        _, ph, pw = self.cfg.patch_size
        if h % ph or w % pw or h < 8 or w < 8:
            raise ValueError(f"latent size {h}x{w}: both sides must be even and >= 8 (video multiple of 64)")
        return h // ph, w // pw

    def frame_seqlen(self, latent_hw: tuple[int, int]) -> int:
        """Tokens per latent frame (`tokens.frame_tokens`; the size checked)."""
        self._grid(latent_hw)
        return frame_tokens(latent_hw, self.cfg.patch_size)

    def sink_tokens(self, latent_hw: tuple[int, int]) -> int:
        """Conditioning tokens: reference frame + FramePack motion tokens (`tokens.sink_tokens`:
        2.5 fsl when h, w % 8 == 0)."""
        self._grid(latent_hw)
        return sink_tokens(latent_hw, self.cfg.patch_size, self.stream)

    def _ring_tokens(self, latent_hw: tuple[int, int]) -> int:
        self._grid(latent_hw)
        return clip_tokens(latent_hw, self.cfg.patch_size, self.stream)

    # ----------------------------------------------------------------------------- caches

    def new_sink_cache(self, latent_hw: tuple[int, int], device=None, dtype=None, fp8: bool = False) -> SinkCache:
        """Empty sink cache for a latent size; capacity = `sink_tokens(latent_hw)` (fp8: packed fp8 rows)."""
        c = self.cfg
        return SinkCache(len(self.layers), self.sink_tokens(latent_hw), c.num_heads, c.head_dim, tuple(latent_hw),
                         self.frame_seqlen(latent_hw), device or self.device, dtype or self.dtype, fp8=fp8)

    def new_step_cache(self, latent_hw: tuple[int, int], device=None, dtype=None, sink_slot: bool = False,
                       working=None, resident_layers: int | None = None, fp8: bool = False) -> StepKVCache:
        """Empty per-step cache: ring of one clip (`latent_frames_per_clip * fsl` tokens).

        `sink_slot=True` adds `sink_tokens` rows holding the rotated sink, so that steady-state
        calls attend to one contiguous slice instead of rotating and concatenating the sink in
        every layer (same numbers; see kv_cache.py). Costs 2.5 fsl more rows per step cache; whether
        it fits is decided with the other caches (`pipeline.memory.plan_caches`).
        `working`: a `KVWorkingBuffer` (see `new_working_buffer`) makes an offloaded cache.
        `resident_layers`: a per-layer paged cache (the first ones on the device, the others in
        host memory, paged by the layer stream: `stream_layers`).
        `fp8`: rows stored as fp8 with a per-(token, head) scale (kv_cache.py), about half the bytes.
        """
        c = self.cfg
        slot = self.sink_tokens(latent_hw) if sink_slot else 0
        return StepKVCache(len(self.layers), self._ring_tokens(latent_hw), slot, c.num_heads, c.head_dim,
                           tuple(latent_hw), device or self.device, dtype or self.dtype, working=working,
                           resident_layers=resident_layers, fp8=fp8)

    def new_working_buffer(self, latent_hw: tuple[int, int], device=None, dtype=None,
                           fp8: bool = False) -> KVWorkingBuffer:
        """The device buffer offloaded step caches share (one step cache without sink slot)."""
        c = self.cfg
        return KVWorkingBuffer(torch.zeros(len(self.layers), 2, 1, self._ring_tokens(latent_hw), c.num_heads,
                                           kv_row_width(c.head_dim, fp8), device=device or self.device,
                                           dtype=kv_storage_dtype(dtype or self.dtype, fp8)))

    # ----------------------------------------------------------------------------- conditioning

    @torch.no_grad()
    def encode_text(self, context: torch.Tensor, precompute_kv: bool = True) -> TextState:
        """T5 context `[L_txt, text_dim]` (L_txt <= text_len) -> TextState.

        Zero-padded to `text_len` rows before `text_embedding`; cross-attention later attends to all
        rows (padding included, no mask), as the reference does.
        """
        c = self.cfg
        if context.dim() != 2 or context.shape[1] != c.text_dim:
            raise ValueError(f"context must be [L, {c.text_dim}] (umT5 output of one prompt), got {tuple(context.shape)}")
        if context.shape[0] > c.text_len:
            raise ValueError(f"context has {context.shape[0]} rows, more than text_len {c.text_len}")
        ctx = context.to(self.device, self.dtype)
        ctx = torch.cat([ctx, ctx.new_zeros(c.text_len - ctx.shape[0], c.text_dim)])
        emb = self.text_embedding(ctx.unsqueeze(0))
        kv = None
        if precompute_kv:
            kv = torch.stack([torch.stack(b.cross_attn.project_kv(emb)) for _, b in self._layers()])
        return TextState(emb, kv)

    def _text_kv(self, text: TextState, layer: int, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s text keys / values (`block`: its module, the stream slot when streamed)."""
        if text.kv is not None:  # rows of the held layers only
            return text.kv[layer - self.layers.start, 0], text.kv[layer - self.layers.start, 1]
        return block.cross_attn.project_kv(text.context)

    # ----------------------------------------------------------------------------- layer streaming

    def stream_layers(self, residency) -> None:
        """Keep only `residency.weights` blocks on the device and stream the others (and the step
        caches' paged layers) per layer from pinned host memory (models/layer_stream.py). The
        placement is decided before (`pipeline.memory.fit_residency`); the other weights must
        already be on the model's device. Not with CUDA graphs."""
        from .layer_stream import LayerStream

        if self._graphs is not None:
            raise ValueError("layer streaming: not with CUDA graphs (use_cuda_graphs(False) first)")
        if len(self.layers) != self.cfg.num_layers:
            raise ValueError(f"layer streaming: the whole model only, not the layer slice {self.layers}")
        self._stream = LayerStream(self.blocks, residency, self.device)

    def demote_layers(self, count: int) -> list[int]:
        """Stream `count` more blocks from pinned host memory (the last resident ones;
        `LayerStream.demote`), e.g. when the caches do not fit next to the weights after loading.
        Their fused q|k|v arguments (models/compiled.py, made on first use) are dropped. Returns
        the demoted layer indices."""
        if self._stream is None:
            raise ValueError("demote_layers: the DiT streams no layers (stream_layers first)")
        moved = self._stream.demote(count)
        if self._fused is not None:
            self._fused.forget([self.blocks[i] for i in moved])
        return moved

    @property
    def layer_stream(self):
        """The `LayerStream` (bytes, bandwidth: `.stats`), or None when every layer is resident."""
        return self._stream

    def _layers(self, cache: StepKVCache | None = None, rows: tuple[int, int] | None = None):
        """(index, block) of every held layer in order (global indices; a slice's caches use
        `index - self.layers.start`); with a layer stream the block is the slot its
        weights were copied to (and `cache`'s paged rows are bound), released after the body ran
        (`rows`: the ring rows the call writes, copied back to host memory)."""
        if self._stream is None:
            yield from ((i, self.blocks[i]) for i in self.layers)
            return
        for i in range(len(self.blocks)):
            yield i, self._stream.acquire(i, cache)
            self._stream.release(i, cache, rows)

    @torch.no_grad()
    def encode_audio(self, audio_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block audio `[1, n_layers, audio_dim, 12]` -> (global `[1, F, 1, dim]`, tokens `[1, F, n_tok+1, dim]`).

        The block's first frame is repeated `motion_frames` (73) times in front, the causal encoder
        runs on the whole, and the last F (3) output frames are kept (activation dtype).
        """
        s = self.stream
        if audio_input.dim() != 4 or audio_input.shape[0] != 1 or audio_input.shape[-1] != s.frames_per_block:
            raise ValueError(f"audio_input must be [1, n_layers, audio_dim, {s.frames_per_block}], "
                             f"got {tuple(audio_input.shape)}")
        a = audio_input.to(self.device)
        a = torch.cat([a[..., :1].expand(-1, -1, -1, s.motion_frames), a], dim=-1)
        g, tokens = self.casual_audio_encoder(a)
        g, tokens = g[:, s.motion_frames_latent:], tokens[:, s.motion_frames_latent:]
        if g.shape[1] != s.frames_per_block_latent:
            raise ValueError(f"audio encoder gave {g.shape[1]} frames, expected {s.frames_per_block_latent}")
        return g.to(self.dtype), tokens.to(self.dtype)

    def _time(self, timestep: float, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> e `[F, dim]` (per-frame time embedding of `timestep`), e0 `[2, F, 6, dim]` (row 1: t = 0), float32.

        Results are kept per (timestep, frames, weights): a job uses a handful of timesteps, and
        each evaluation would otherwise make a float32 copy of `time_projection` (6 dim^2).
        """
        # Keyed on storage, device and dtype (not on `_version`, which inference-mode tensors such
        # as ComfyUI's lack). Code that edits these weights in place calls `clear_caches()`.
        weights = tuple((p.data_ptr(), p.device, p.dtype)
                        for p in (*self.time_embedding.parameters(), *self.time_projection.parameters()))
        key = (float(torch.tensor(float(timestep), dtype=torch.float32)), frames, weights)
        if key not in self._time_cache:
            if len(self._time_cache) >= 16:
                self._time_cache.clear()
            self._time_cache[key] = self._time_uncached(timestep, frames)
        return self._time_cache[key]

    def clear_caches(self) -> None:
        """Forget cached time embeddings and RoPE factors (call after changing weights in place)."""
        self._time_cache.clear()
        self._rope_cache.clear()
        self._rope_parts.clear()

    def move_weights(self, device: torch.device | str) -> None:
        """Move every weight to `device` (e.g. the host, to give the GPU back, and back again) and
        drop what was bound to the old storage: cached time / RoPE factors and ring rows, the fused
        q/k/v copies of `compile_blocks`, captured CUDA graphs (they hold the old addresses).
        Resident blocks travel packed (one buffer each, `block_packing.pack_on_device`, pinned on the
        host: no per-tensor rounding, q|k|v stay adjacent); with layer streaming, the streamed blocks
        stay in pinned host memory and the stream's device slots are freed on the way out, made
        again on return."""
        from .block_packing import pack_on_device

        device = indexed_device(device)
        pin = device.type == "cpu" and torch.cuda.is_available()
        stream = self._stream
        streamed = set(stream.streamed) if stream is not None else set()
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, also inside ComfyUI
            if stream is not None and device != stream.device:
                stream.release_slots()
            for i, block in enumerate(self.blocks):
                held = any(not t.is_meta for t in block.parameters())  # a layer slice holds its layers only
                if i not in streamed and held:
                    pack_on_device(block, device, pin)
            for name, child in self.named_children():
                if name != "blocks":
                    child.to(device)
            if stream is not None and device == stream.device:
                stream.restore_slots()
        self.clear_caches()
        self._rows_cache.clear()
        if self._fused is not None:
            self._fused._qkv.clear()
        if self._graphs is not None:
            self._graphs.clear()

    def compile_blocks(self, compile: bool = True) -> None:
        """Run streaming calls through fused layer regions (models/compiled.py), torch.compile'd once
        on the first block and shared by all layers. `compile=False`: same regions, eager (tests)."""
        from .compiled import FusedLayers

        if compile:
            from liveavatar.compile_cache import use_cache_dir

            use_cache_dir()
        self._fused = FusedLayers(self, compile=compile)

    def use_cuda_graphs(self, enable: bool = True) -> None:
        """Replay repeated streaming calls from CUDA graphs (models/graphs.py) on a CUDA device,
        the fused regions of `compile_blocks()` or the eager layers (both write the ring rows
        through an index, so one graph serves every ring offset); other calls stay eager."""
        if enable and self._stream is not None:
            raise ValueError("cuda_graphs: not with layer streaming (the copies are paced per layer)")
        if self._graphs is not None:
            self._graphs.clear()
        self._graphs = BlockGraphs() if enable else None

    @property
    def cuda_graphs(self) -> BlockGraphs | None:
        return self._graphs

    def _time_uncached(self, timestep: float, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((frames,), float(timestep), dtype=torch.float32, device=self.device)
        t = torch.cat([t, torch.zeros_like(t)])
        emb = sinusoidal_embedding(self.cfg.freq_dim, t).float()
        e = fp32_linear(self.time_embedding[2], F.silu(fp32_linear(self.time_embedding[0], emb)))
        e0 = fp32_linear(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.cfg.dim))
        return e[:frames], e0.unflatten(0, (2, frames))

    def _rope(self, positions: torch.Tensor):
        """Factors for `positions` `[L, 3]` (built on the model's device)."""
        return rope_factors(positions, self.cfg.head_dim, self.rope_fp16_tables, self.device,
                            self.rope_compute_dtype)

    def _rope_kept(self, key: tuple, make: Callable[[], RopeFactors], parts: bool = False) -> RopeFactors:
        """`make()` kept under `key` (a block's factors serve all its denoising steps, the sink's
        until it moves); parts: a building block of those (time rows, position bases), kept longer."""
        store, limit = (self._rope_parts, 512) if parts else (self._rope_cache, 8)
        key = (*key, self.device, self.rope_compute_dtype, self.rope_fp16_tables)
        if key not in store:
            if len(store) >= limit:
                store.clear()
            store[key] = make()
        return store[key]

    def _time_row(self, t: int, chunk: int = 64) -> RopeFactors:
        """Factors `[1, 1, D/2]` of position (t, 0, 0): its temporal pairs are those of any token
        at t. Made `chunk` temporal indices at a time (rows of `rope_factors` are independent)."""
        c0 = t // chunk * chunk
        table = self._rope_kept(("t", c0, chunk), lambda: self._rope(
            torch.tensor([[c, 0, 0] for c in range(c0, c0 + chunk)])), parts=True)
        return RopeFactors(table.cos[t - c0: t - c0 + 1], table.sin[t - c0: t - c0 + 1])

    def _block_rope(self, start_frame: int, frames: int, hp: int, wp: int) -> RopeFactors:
        """Factors of the block's t-major grid (frames from `start_frame`, hp x wp tokens each)."""
        plane = self._rope_kept(("plane", hp, wp), lambda: self._rope(
            grid_positions([0], list(range(hp)), list(range(wp)))), parts=True)
        times = [self._time_row(t) for t in range(start_frame, start_frame + frames)]
        return grid_factors(times, plane, rope_axis_pairs(self.cfg.head_dim)[0])

    def _sink_rope(self, sink: SinkCache, ref_t: int) -> RopeFactors:
        """Factors of the sink's positions with the reference tokens at temporal index ref_t."""
        base = self._rope_kept(("sink", sink.uid, sink.version), lambda: self._rope(sink.stream_positions(0)),
                               parts=True)
        return with_time(base, sink.ref_tokens, self._time_row(ref_t), rope_axis_pairs(self.cfg.head_dim)[0])

    def _patchify(self, conv: nn.Conv3d, latents: torch.Tensor) -> torch.Tensor:
        """`[1, C, T, h, w]` -> tokens `[1, T*hp*wp, dim]` (t-major, then h, w)."""
        return conv(latents.to(self.device, self.dtype)).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def prefill_sink(self, ref_latents: torch.Tensor | None, motion_latents: torch.Tensor | None, text: TextState,
                     sink: SinkCache, hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """Fill `sink` with the un-rotated K/V (held layers) of [reference frame | motion tokens].

        ref_latents `[1, 16, 1, h, w]`, motion_latents `[1, 16, T_m, h, w]` (newest 19 frames used).
        Call again to refresh (e.g. a new reference latent); step caches notice and re-rotate.
        A layer slice that does not hold layer 0 takes `hidden` `[1, sink_tokens, dim]` (the previous
        slice's output) instead of the latents; a slice that does not hold the last layer returns
        its output tokens for the next slice (None otherwise).
        """
        hw = sink.latent_hw
        hp, wp = self._grid(hw)
        if self.first_slice:
            x = self._sink_tokens_in(ref_latents, motion_latents, hw)
        else:
            if hidden is None or hidden.shape[1] != self.sink_tokens(hw):
                raise ValueError(f"layers {self.layers}: prefill_sink needs the previous slice's tokens "
                                 f"[1, {self.sink_tokens(hw)}, dim] as hidden")
            x = hidden.to(self.device, self.dtype)
        t_ref = self.stream.ref_rope_position
        positions = torch.cat([grid_positions([t_ref], list(range(hp)), list(range(wp))),
                               self.frame_packer.positions(hw)])
        sink.begin_prefill(positions)
        rope = self._rope(positions)
        _, e0 = self._time(0.0, self.stream.frames_per_block_latent)
        e0_sink = e0[1, 0:1].unsqueeze(0)  # [1, 1, 6, dim]: t = 0 slot of frame 0
        first = self.layers.start
        for i, block in self._layers():
            x = block(x, e0_sink, sink.prefill_attend(i - first, rope, self.attn_backend), self._text_kv(text, i, block),
                      self.attn_backend)
        return None if self.last_slice else x

    def _sink_tokens_in(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor,
                        hw: tuple[int, int]) -> torch.Tensor:
        """The sink's input tokens `[1, sink_tokens, dim]`: patchified reference | FramePack motion."""
        if ref_latents.dim() != 5 or ref_latents.shape[:3] != (1, self.cfg.in_dim, 1):
            raise ValueError(f"ref_latents must be [1, {self.cfg.in_dim}, 1, h, w], got {tuple(ref_latents.shape)}")
        if tuple(motion_latents.shape[-2:]) != tuple(ref_latents.shape[-2:]):
            raise ValueError(f"motion_latents size {tuple(motion_latents.shape[-2:])} != ref_latents size "
                             f"{tuple(ref_latents.shape[-2:])}")
        if tuple(ref_latents.shape[-2:]) != hw:
            raise ValueError(f"sink cache was made for latent size {hw}, inputs are {tuple(ref_latents.shape[-2:])}")
        ref = self._patchify(self.patch_embedding, ref_latents)
        mot = self.frame_packer(motion_latents.to(self.device))
        ids = torch.tensor([_REF] * ref.shape[1] + [_MOTION] * mot.shape[1], device=self.device)
        x = torch.cat([ref, mot], dim=1)
        return x + self.trainable_cond_mask(ids).to(x.dtype)

    # ----------------------------------------------------------------------------- streaming

    def reference_position(self, start_frame: int, sink_offset: int) -> int:
        """Temporal RoPE index of the reference token for a block at `start_frame`: max(30, F0 + d)."""
        base = self.stream.ref_rope_position
        return base + max(0, start_frame - (base - sink_offset))

    @torch.no_grad()
    def forward_block(self, x: torch.Tensor, timestep: float, text: TextState, audio_input: torch.Tensor | None,
                      cond_states: torch.Tensor | None, cache: StepKVCache, sink: SinkCache, start_frame: int,
                      sink_offset: int, audio: tuple[torch.Tensor, torch.Tensor] | None = None,
                      hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Flow velocity of one causal block at one denoising step.

        x `[16, F, h, w]` (F = 3 latent frames), timestep (rounded to float32, e.g. 857.69),
        audio_input `[1, n_layers, audio_dim, 12]` (or `audio` = `encode_audio(audio_input)`),
        cond_states `[1, 16, F, h, w]` pose latents or None (= zeros), cache: this step's cache,
        sink: the prefilled sink, start_frame: absolute latent frame F0 of the block,
        sink_offset: the reference's relative_dist d. Returns `[16, F, h, w]` in x's dtype.
        Writes the block's rotated keys and values into `cache`.
        Layer slices: a slice without layer 0 runs its layers on `hidden` `[1, F*fsl, dim]` (the
        previous slice's output; x gives the shapes only); a slice without the last layer returns
        its output tokens `[1, F*fsl, dim]` (model dtype) instead of the velocity.
        """
        x_dtype = x.dtype
        hw, rope, ref_t, plan, sink_rope, e, e0 = self._call_setup(x, timestep, cache, sink, start_frame, sink_offset)
        audio_global, audio_tokens = audio if audio is not None else self.encode_audio(audio_input)
        audio_global, audio_tokens = audio_global[0, :, 0], audio_tokens[0]  # [F, dim], [F, n, dim]
        x = x.to(self.device, self.dtype)
        cond = None if cond_states is None else cond_states.to(self.device, self.dtype)
        tokens_in = self.stream.frames_per_block_latent * self.frame_seqlen(hw)
        if not self.first_slice and (hidden is None or hidden.shape[1] != tokens_in):
            raise ValueError(f"layers {self.layers}: forward_block needs the previous slice's tokens "
                             f"[1, {tokens_in}, dim] as hidden")
        hidden = hidden.to(self.device, self.dtype) if not self.first_slice else None

        graphs = self._graphs  # (on CPU: same path, never captured)

        def body(x, audio_global, audio_tokens, rope_cos, rope_sin, e, e0, *rest):
            rest = list(rest)
            rows = rest.pop(0) if graphs is not None else None
            cond = rest.pop(0) if cond_states is not None else None
            tokens = rest.pop(0) if hidden is not None else None
            sink_rope = RopeFactors(rest[0], rest[1]) if plan.refresh_keys else None
            return self._block_body(x, cond, audio_global, audio_tokens, RopeFactors(rope_cos, rope_sin), e, e0,
                                    text, cache, sink, plan, sink_rope, rows, tokens)

        tensors = [x, audio_global, audio_tokens, rope.cos, rope.sin, e, e0[0].unsqueeze(0)]
        tensors += [] if graphs is None else [self._ring_rows(plan.offset, plan.tokens)]
        tensors += [] if cond is None else [cond]
        tensors += [] if hidden is None else [hidden]
        tensors += [] if sink_rope is None else [sink_rope.cos, sink_rope.sin]
        if graphs is not None:  # one graph per call shape; the ring offset is an input (rows)
            key = (id(cache), id(sink), id(text), replace(plan, offset=0), hw, cond is None, self.attn_backend)
            out = graphs.run(key, (cache, sink, text), body, tensors)
        else:
            out = body(*tensors)
        cache.commit(plan, sink, ref_t)
        return out.to(x_dtype) if self.last_slice else out

    def _call_setup(self, x: torch.Tensor, timestep: float, cache: StepKVCache, sink: SinkCache, start_frame: int,
                    sink_offset: int):
        """The host-side decisions of one streaming call, checked: (latent hw, block RoPE factors,
        reference position ref_t, the cache's StreamWindow, sink RoPE factors or None, e `[F, dim]`,
        e0 `[2, F, 6, dim]`). x `[16, F, h, w]`."""
        c, nf = self.cfg, self.stream.frames_per_block_latent
        if x.dim() != 4 or x.shape[0] != c.in_dim or x.shape[1] != nf:
            raise ValueError(f"x must be [{c.in_dim}, {nf}, h, w], got {tuple(x.shape)}")
        hw = tuple(x.shape[-2:])
        if hw != cache.latent_hw or hw != sink.latent_hw:
            raise ValueError(f"latent size {hw} does not match the caches ({cache.latent_hw}, {sink.latent_hw})")
        if start_frame < 0:
            raise ValueError(f"start_frame must be >= 0, got {start_frame}")
        hp, wp = self._grid(hw)
        fsl = hp * wp
        rope = self._rope_kept(("block", start_frame, hp, wp), lambda: self._block_rope(start_frame, nf, hp, wp))
        ref_t = self.reference_position(start_frame, sink_offset)
        plan = cache.plan(start_frame * fsl, nf * fsl, sink, ref_t)
        sink_rope = None
        if plan.refresh_keys:
            sink_rope = self._rope_kept(("sink", sink.uid, sink.version, ref_t), lambda: self._sink_rope(sink, ref_t))
        e, e0 = self._time(timestep, nf)
        return hw, rope, ref_t, plan, sink_rope, e, e0

    def _ring_rows(self, offset: int, tokens: int) -> torch.Tensor:
        """`arange(offset, offset + tokens)` on the model's device (int64), kept per (offset, tokens)."""
        key = (offset, tokens, self.device)
        if key not in self._rows_cache:
            self._rows_cache[key] = torch.arange(offset, offset + tokens, device=self.device)
        return self._rows_cache[key]

    def _block_body(self, x: torch.Tensor, cond: torch.Tensor | None, audio_global: torch.Tensor,
                    audio_tokens: torch.Tensor, rope: RopeFactors, e: torch.Tensor, e0_block: torch.Tensor,
                    text: TextState, cache: StepKVCache, sink: SinkCache, plan, sink_rope: RopeFactors | None,
                    rows: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor work of `forward_block` (no host-side decisions, so it can be graph-captured).

        x `[16, F, h, w]` (model dtype, on the model's device), cond `[1, 16, F, h, w]` or None,
        audio_global `[F, dim]`, audio_tokens `[F, n, dim]`, e `[F, dim]`, e0_block `[1, F, 6, dim]`.
        rows: ring rows of the block as a device index (graph mode) or None (slice writes).
        tokens: the previous slice's output `[1, F*fsl, dim]` (slices without layer 0), else None.
        Returns `[16, F, h, w]` in the model dtype (the tokens `[1, F*fsl, dim]` on a slice
        without the last layer).
        """
        nf = x.shape[1]
        hp, wp = self._grid(tuple(x.shape[-2:]))
        if tokens is None:
            tokens = self._embed_block(x, cond)
        backend, first = self.attn_backend, self.layers.start

        def attend_of(i: int, fused):  # i: global layer index; the caches hold the slice's layers
            if fused is not None:  # compile_blocks(): RoPE inside the fused region
                return cache.stream_attend(i - first, plan, None, sink, sink_rope, backend,
                                           rotate=fused.rotate_factors, rows=rows)
            return cache.stream_attend(i - first, plan, rope, sink, sink_rope, backend, rows=rows)

        layers = self._layers(cache, (plan.offset, plan.offset + plan.tokens))
        tokens = self._run_layers(tokens, e0_block, rope, attend_of, text, nf, audio_global, audio_tokens, layers)
        if not self.last_slice:
            return tokens
        out = self.head(tokens, e)  # [1, F*fsl, prod(patch)*out_dim]
        return self._unpatchify(out[0], nf, hp, wp)

    def _embed_block(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Block latents x `[16, F, h, w]` (+ pose latents `[1, 16, F, h, w]` or None) -> tokens `[1, F*fsl, dim]`."""
        h = self.patch_embedding(x.unsqueeze(0))
        if cond is None:  # zero pose latents: the encoder adds its bias only
            h = h + self.cond_encoder.bias.view(1, -1, 1, 1, 1)
        else:
            h = h + self.cond_encoder(cond)
        tokens = h.flatten(2).transpose(1, 2)
        return tokens + self.trainable_cond_mask.weight[_NOISY].to(tokens.dtype)

    def _run_layers(self, tokens: torch.Tensor, e0_block: torch.Tensor, rope: RopeFactors, attend_of, text: TextState,
                    frames: int, audio_global: torch.Tensor, audio_tokens: torch.Tensor, layers) -> torch.Tensor:
        """The transformer layers (with audio injection) over tokens `[1, frames*fsl, dim]`.

        attend_of(i, fused): layer i's self-attention policy (fused: the FusedLayers or None);
        layers: (index, block) pairs (`_layers`). e0_block `[1, frames, 6, dim]`, audio_global
        `[frames, dim]`, audio_tokens `[frames, n, dim]`, rope: the tokens' factors."""
        fused, backend = self._fused, self.attn_backend
        for i, block in layers:
            attend = attend_of(i, fused)
            if fused is not None:  # compile_blocks(): RoPE inside the fused region
                tokens = fused.layer(block, tokens, e0_block, rope, attend, self._text_kv(text, i, block), backend)
                tokens = fused.inject(i, tokens, frames, audio_global, audio_tokens, backend)
            else:
                tokens = block(tokens, e0_block, attend, self._text_kv(text, i, block), backend)
                tokens = self.audio_injector.inject(i, tokens, frames, audio_global, audio_tokens, backend)
        return tokens

    def _unpatchify(self, out: torch.Tensor, nf: int, hp: int, wp: int) -> torch.Tensor:
        """`[F*hp*wp, pt*ph*pw*C]` (patch channels last) -> `[C, F*pt, hp*ph, wp*pw]`."""
        pt, ph, pw = self.cfg.patch_size
        co = self.cfg.out_dim
        u = out.view(nf, hp, wp, pt, ph, pw, co).permute(6, 0, 3, 1, 4, 2, 5)
        return u.reshape(co, nf * pt, hp * ph, wp * pw)


__all__ = ["CausalS2VDiT", "TextState", "layer_slice", "sinusoidal_embedding"]
