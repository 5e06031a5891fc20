"""`LiveAvatar`: the loaded components (DiT, VAE, umT5, wav2vec2) and the encode steps.

Generation itself lives in `liveavatar.pipeline.generate` (one loop for every GPU count).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from liveavatar.config import DEFAULT_STREAM, StreamConfig
from liveavatar.loading.placement import PlacementTarget
from liveavatar.pipeline.conditioning import AudioConditioning, DecodedBlock, ImageConditioning, ReferenceLatents
from liveavatar.pipeline.speed import fp8_scaling_for
from liveavatar.sizes import DEFAULT_MODE as DEFAULT_SIZE_MODE
from liveavatar.sizes import OutputSize, resolve_size

log = logging.getLogger("liveavatar")

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: cuda:{dev.index} does not exist ({torch.cuda.device_count()} GPUs visible)")
    return dev


@dataclass
class LoadOptions:
    """Resolved load options (`liveavatar.options`): fp8 is the scaling name or None (off)."""

    device: torch.device
    dtype: torch.dtype
    attn: str = "sdpa"
    fp8: str | None = None
    compile: bool = False
    t5_device: str = "same"  # "same" (run on device, then park on CPU) or "cpu"
    weights: str = "auto"  # DiT placement mode (`options.WEIGHTS_MODES`), decided by `place`
    target: PlacementTarget = PlacementTarget()  # the job the placement is for (size, steps)

    @classmethod
    def resolve(cls, device: str | torch.device | None, dtype: str | torch.dtype, fp8: bool | str | None,
                attn: str, compile: bool, weights: str | None = "auto",
                target: PlacementTarget | None = None) -> "LoadOptions":
        """Check and resolve every load option before any file is read (fp8 against the device)."""
        from liveavatar.options import resolve_attention, resolve_weights_mode

        opts = cls(device=resolve_device(device), dtype=resolve_dtype(dtype), attn=resolve_attention(attn),
                   compile=bool(compile), weights=resolve_weights_mode(weights), target=target or PlacementTarget())
        opts.fp8 = fp8_scaling_for(fp8, opts.device)
        return opts

    def place(self, config, layers: range | None = None, other_bytes: int = 0):
        """The DiT's `LayerResidency` (None: all resident) for this device's free memory, after the
        loading preflight (`loading.placement.place_dit`; MemoryError with the numbers). `layers`:
        a layer slice (sharded rank): resident, only its weights checked. other_bytes: the device
        bytes of the components loaded beside the DiT and the VAE (the wav2vec2 encoder), counted."""
        import dataclasses

        from liveavatar.loading.placement import place_dit

        target = dataclasses.replace(self.target, other_bytes=int(other_bytes))
        return place_dit(config, self.device, self.dtype, bool(self.fp8), self.weights, target, layers=layers)

    def audio_encoder_bytes(self, w2v_config: dict) -> int:
        """Device bytes of the wav2vec2 encoder of `w2v_config` in this dtype (0 off CUDA: nothing is measured there)."""
        from liveavatar.models.wav2vec import AudioFeatureExtractor

        return AudioFeatureExtractor.device_bytes(w2v_config, self.dtype) if self.device.type == "cuda" else 0


class LiveAvatar:
    """Loaded Live Avatar components on one device. Use `from_checkpoint` or `from_files`."""

    def __init__(self, dit, vae, text_encoder, audio_encoder, opts: LoadOptions,
                 stream: StreamConfig = DEFAULT_STREAM, source: str = ""):
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.audio_encoder = audio_encoder
        self.opts = opts
        self.stream = stream
        self.source = source
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, *, lora: str | Path | None = None,
                        lora_strength: float = 1.0, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype = "bf16", fp8: bool | str = False, attn: str = "sdpa",
                        compile: bool = False, stream: StreamConfig = DEFAULT_STREAM,
                        layers: range | None = None, weights: str = "auto",
                        target: PlacementTarget | None = None) -> "LiveAvatar":
        """Load the official Wan2.2-S2V-14B folder layout (+ the Live Avatar LoRA); `layers`: only
        this DiT layer slice (a rank of a layer-sharded worker group). weights / target: where the
        DiT's blocks go (`LoadOptions.place`), for the job `target` (size, steps)."""
        from liveavatar.loading.official import find_official_checkpoint, load_components

        opts = LoadOptions.resolve(device, dtype, fp8, attn, compile, weights, target)  # before any file is read
        ckpt = find_official_checkpoint(ckpt_dir, lora=lora)
        if ckpt.lora_path is None:
            log.warning("no Live Avatar LoRA found beside %s: running the BASE Wan2.2-S2V weights, which are not "
                        "distilled for %s-step streaming (expect poor video); pass --lora liveavatar.safetensors",
                        ckpt.root, "4")
        w2v = ckpt.wav2vec_config() if opts.device.type == "cuda" else {}
        residency = opts.place(ckpt.config, layers, opts.audio_encoder_bytes(w2v))
        parts = load_components(ckpt, device=opts.device, dtype=opts.dtype, lora_strength=lora_strength,
                                fp8=opts.fp8, layers=layers, residency=residency)
        model = cls(parts["dit"], parts["vae"], parts["text_encoder"], parts["audio_encoder"], opts,
                    stream=stream, source=str(ckpt.root))
        model._apply_speed_options()
        return model

    @classmethod
    def from_files(cls, *, dit: str | Path, t5: str | Path, vae: str | Path, wav2vec: str | Path,
                   tokenizer_dir: str | Path | None = None, lora: str | Path | None = None,
                   lora_strength: float = 1.0, config: str | Path | None = None,
                   device: str | torch.device | None = "auto", dtype: str | torch.dtype = "bf16",
                   fp8: bool | str = False, attn: str = "sdpa", compile: bool = False,
                   stream: StreamConfig = DEFAULT_STREAM, layers: range | None = None, weights: str = "auto",
                   target: PlacementTarget | None = None) -> "LiveAvatar":
        """Load ComfyUI-style single files (layouts detected from the keys and converted);
        `layers`: only this DiT layer slice; weights / target: as `from_checkpoint`."""
        from liveavatar.loading.official import load_components_from_files

        opts = LoadOptions.resolve(device, dtype, fp8, attn, compile, weights, target)  # before any file is read
        parts = load_components_from_files(dit=dit, t5=t5, vae=vae, wav2vec=wav2vec,
                                           tokenizer_dir=tokenizer_dir, lora=lora,
                                           lora_strength=lora_strength, config=config,
                                           device=opts.device, dtype=opts.dtype, fp8=opts.fp8, layers=layers,
                                           placement=lambda cfg, w2v: opts.place(cfg, layers,
                                                                                 opts.audio_encoder_bytes(w2v)))
        model = cls(parts["dit"], parts["vae"], parts["text_encoder"], parts["audio_encoder"], opts,
                    stream=stream, source=str(dit))
        model._apply_speed_options()
        return model

    def _apply_speed_options(self) -> None:
        from liveavatar.pipeline.speed import apply_speed_options

        apply_speed_options(self.dit, attn=self.opts.attn, fp8=self.opts.fp8,
                            compile=self.opts.compile, device=self.opts.device)
        if self.opts.compile and self.opts.device.type == "cuda" and self.vae is not None:
            self.vae.compile_decoder()

    # ------------------------------------------------------------------ weights placement
    @property
    def dit_bytes(self) -> int:
        """Bytes of the DiT weights (parameters and buffers; 0 without a DiT)."""
        if self.dit is None:
            return 0
        return sum(t.numel() * t.element_size() for t in itertools.chain(self.dit.parameters(), self.dit.buffers()))

    @property
    def dit_device(self) -> torch.device | None:
        """Where the DiT weights are now (`self.device` unless `place_dit` moved them away)."""
        return None if self.dit is None else self.dit.device

    def place_dit(self, device: str | torch.device) -> None:
        """Move the DiT weights to `device`: the host to give the GPU memory back (e.g. when ComfyUI
        needs it for another model), `self.device` before the next job. Jobs need them on `self.device`."""
        from liveavatar.models.dit import indexed_device

        if self.dit is not None and self.dit.device != indexed_device(device):
            self.dit.move_weights(device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ encoders
    @property
    def device(self) -> torch.device:
        return self.opts.device

    @property
    def dtype(self) -> torch.dtype:
        return self.opts.dtype

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """umT5 context of the prompt, [L_txt, text_dim] float32 on the CPU (cached per prompt)."""
        if not isinstance(prompt, str):
            raise ValueError("prompt: must be a string")
        if prompt not in self._prompt_cache:
            with self._text_encoder_on_device() as te:
                ctx = te.encode(prompt)
            self._prompt_cache[prompt] = ctx.float().cpu()
        return self._prompt_cache[prompt]

    @contextlib.contextmanager
    def _text_encoder_on_device(self):
        """Bring the CPU-parked umT5 to the GPU for one encode when it fits, then park it again."""
        te = self.text_encoder
        target = self.device
        if target.type != "cuda" or te.device.type == "cuda":
            yield te
            return
        from liveavatar.pipeline.memory import fits

        nbytes = sum(p.numel() * p.element_size() for p in te.model.parameters())
        free, _ = torch.cuda.mem_get_info(target)
        if not fits(nbytes, free):
            log.warning("umT5 (%.1f GiB) does not fit next to the DiT (%.1f GiB free): encoding the prompt on the CPU",
                        nbytes / 2**30, free / 2**30)
            yield te
            return
        te.model.to(target)
        te.device = target
        try:
            yield te
        finally:
            te.model.to("cpu")
            te.device = torch.device("cpu")
            torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_audio(self, audio, lead_in_frames: int | None = None) -> AudioConditioning:
        """wav2vec2 conditioning for every generated frame of `audio` (`Audio16k` or
        `SpooledAudio16k`); lead_in_frames: silent frames in front (None: `stream.lead_in_frames`).

        Clips up to a minute are encoded here in one pass; longer ones window by window while the
        blocks run (`pipeline.audio_features`): memory stays flat whatever the length."""
        from liveavatar.pipeline.audio_features import WindowedAudioFeatures
        from liveavatar.pipeline.plan import audio_frames

        lead_in_frames = self.stream.lead_in_frames if lead_in_frames is None else lead_in_frames
        fps = self.stream.fps
        num_frames = audio_frames(audio, self.stream)  # refused when shorter than one block
        # in the model dtype (the reference holds them in bf16): ~1.3 MB per second in bf16, one window held
        feats = WindowedAudioFeatures(self.audio_encoder, audio, lead_in_samples=lead_in_frames * audio.sample_rate // fps,
                                      fps=fps, feature_fps=self.stream.audio_feature_fps,
                                      pad_to_multiple=self.stream.frames_per_clip, dtype=self.dtype)
        return AudioConditioning(features=feats, num_frames=num_frames, audio=audio, lead_in_frames=lead_in_frames)

    @torch.no_grad()
    def audio_conditioning_from_states(self, states: torch.Tensor, audio, lead_in_frames: int | None = None,
                                       states_fps: float = 50.0) -> AudioConditioning:
        """Conditioning from wav2vec2 hidden states computed elsewhere (ComfyUI's audio encoder).

        states: [n_states, T50, C] (or [1, n_states, T50, C]) for the user's audio at `states_fps`.
        The lead-in is approximated by repeating the first state frame (our own path runs wav2vec2
        over real silence instead), so results differ slightly from `encode_audio`.
        """
        from liveavatar.media.audio import num_video_frames
        from liveavatar.models.wav2vec import bucket_video_frames, interpolate_50_to_30

        lead_in_frames = self.stream.lead_in_frames if lead_in_frames is None else lead_in_frames
        if states.ndim == 4:
            states = states[0]
        if states.ndim != 3:
            raise ValueError(f"audio_encoder_output: expected hidden states [n_states, T, C], got {tuple(states.shape)}")
        want = getattr(self.audio_encoder, "num_states", None)
        if want is not None and states.shape[0] != want:
            raise ValueError(f"audio_encoder_output: {states.shape[0]} hidden states, the DiT weights {want}")
        fps = self.stream.fps
        lead = round(lead_in_frames * states_fps / fps)
        states = torch.cat([states[:, :1].expand(-1, lead, -1), states], dim=1).float()
        feat = interpolate_50_to_30(states, states_fps, self.stream.audio_feature_fps)
        feats = bucket_video_frames(feat, fps=fps, feature_fps=self.stream.audio_feature_fps,
                                    pad_to_multiple=self.stream.frames_per_clip)
        return AudioConditioning(features=feats.cpu(), num_frames=num_video_frames(audio, fps=fps),
                                 audio=audio, lead_in_frames=lead_in_frames)

    def prepare_image(self, image, size: "str | OutputSize", size_mode: str = DEFAULT_SIZE_MODE) -> ImageConditioning:
        """The reference image ([1,3,1,H,W] in [-1,1]) at the output size: an `OutputSize` resolved
        at the edge (`liveavatar.sizes.resolve_size`), or a size text resolved here with `size_mode`."""
        from liveavatar.media.image import prepare_reference

        out = resolve_size(image.size, size, mode=size_mode)
        pixels = prepare_reference(image, out.width, out.height, mode=out.mode)
        return ImageConditioning(pixels=pixels, width=out.width, height=out.height, requested=out.requested,
                                 mode=out.mode)

    @torch.no_grad()
    def encode_reference(self, image: ImageConditioning) -> ReferenceLatents:
        """VAE latents of the reference frame and of the 73-frame motion history (reference repeated)."""
        px = image.pixels
        ref = self.vae.encode(px)
        motion_px = px.expand(-1, -1, self.stream.motion_frames, -1, -1)
        motion = self.vae.encode(motion_px)
        return ReferenceLatents(ref=ref.float().cpu(), motion=motion.float().cpu())

    @torch.no_grad()
    def encode_pose(self, path: str | Path, image: ImageConditioning, num_frames: int,
                    lead_in_frames: int | None = None) -> torch.Tensor:
        """Pose video -> cond latents [1, 16, F_latent, h, w] covering the generated frames.

        As the reference: per 48-frame clip, the chunk is prefixed with its first frame, encoded,
        and the first latent dropped (12 latents per clip). The lead-in frames repeat frame 0, so
        pose frame k stays aligned with audio frame k.
        """
        from liveavatar.media.pose import load_pose_video

        lead_in_frames = self.stream.lead_in_frames if lead_in_frames is None else lead_in_frames
        fpc = self.stream.frames_per_clip
        gen = num_frames + lead_in_frames
        clips = -(-gen // fpc)
        px = load_pose_video(path, image.width, image.height, num_frames, fps=self.stream.fps, mode=image.mode)
        px = torch.cat([px[:, :, :1].expand(-1, -1, lead_in_frames, -1, -1), px], dim=2)
        pad = clips * fpc - px.shape[2]
        if pad > 0:
            px = torch.cat([px, px.new_full((*px.shape[:2], pad, *px.shape[3:]), -1.0)], dim=2)
        latents = []
        for c in range(clips):
            chunk = px[:, :, c * fpc:(c + 1) * fpc]
            chunk = torch.cat([chunk[:, :, :1], chunk], dim=2)
            latents.append(self.vae.encode(chunk)[:, :, 1:].float().cpu())
        return torch.cat(latents, dim=2)

    def generate(self, context: torch.Tensor, audio: AudioConditioning, image: ImageConditioning,
                 **kwargs: Any) -> Iterator[DecodedBlock]:
        """Stream decoded blocks; see `liveavatar.pipeline.generate.generate` for the arguments."""
        from liveavatar.pipeline.generate import generate

        return generate(self, context, audio, image, **kwargs)
