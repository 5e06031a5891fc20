"""Model loader nodes: an official checkpoint folder, or ComfyUI single files.

Both return a LIVEAVATAR_MODEL handle (`nodes.handle.LiveAvatarHandle`) that stays loaded across
queue items while the inputs are unchanged.
"""

from __future__ import annotations

from comfy_api.latest import io

from . import model_files as mf
from .errors import LiveAvatarInputError
from .handle import MODES, PRECISIONS, LoadSpec, file_stamps, get_or_open, parse_placement, precision_options
from .paths import confine
from .types import CATEGORY_LOADERS, LiveAvatarModel

from liveavatar.options import ATTENTION_BACKENDS, LORA_STRENGTH_RANGE, WEIGHTS_MODES
from liveavatar.options import lora_strength as check_lora_strength


def attention_backends() -> list[str]:
    return list(ATTENTION_BACKENDS)


def _placement_inputs() -> list[io.Input]:
    return [
        io.Combo.Input("precision", options=list(PRECISIONS), default="bf16",
                       tooltip="Weights dtype. bf16: 80 GB class GPUs. fp8: bf16 weights with fp8 linear "
                               "layers (about 48 GB, Hopper/Ada GPUs), one scale per tensor (the reference's). "
                               "fp8_row: fp8 with one scale per token and output channel (robust to outlier "
                               "tokens). fp16/fp32: for testing."),
        io.Combo.Input("attention", options=attention_backends(), default="sdpa",
                       tooltip="Attention kernel. sdpa: PyTorch picks. cudnn: cuDNN attention (what the "
                               "reference uses). flash: flash-attn 2/3 if installed. sage: SageAttention "
                               "(approximate). math: slow reference kernel for debugging."),
        io.String.Input("devices", default="auto",
                        tooltip="Where to run: 'auto' (ComfyUI's device; with gpu_mode tpp or layers every visible GPU), "
                                "'cpu', 'cuda:0', or GPU indices for several GPUs, e.g. '0,1,2,3,4'."),
        io.Combo.Input("gpu_mode", options=list(MODES), default="auto",
                       tooltip="single: one device, in this process. tpp: timestep-forcing pipeline "
                               "parallelism, one denoising step per GPU (+ a decode GPU) in worker processes. "
                               "layers: the DiT's layers split over the GPUs (each holds a slice: for cards too "
                               "small for the whole model, e.g. five 24 GB cards). auto: with several devices, "
                               "tpp when whole copies fit the free memory, else layers; else single."),
        io.Boolean.Input("compile", default=False,
                         tooltip="torch.compile the DiT and the VAE decoder: faster blocks after a long first run (cached across runs)."),
        io.Combo.Input("weights", options=list(WEIGHTS_MODES), default="auto", optional=True,
                       tooltip="Where the DiT's 40 layers live (one device). auto: all on the GPU when they and "
                               "the KV caches fit at 704*384, else as many as fit and the rest streamed layer by "
                               "layer from pinned host memory (24 GB cards). resident: all on the GPU. stream: "
                               "as many as fit, KV caches paged per layer too."),
    ]


def _common_inputs() -> list:
    """LoRA strength + the placement inputs, shared by both loaders."""
    return [io.Float.Input("lora_strength", default=1.0, min=LORA_STRENGTH_RANGE[0], max=LORA_STRENGTH_RANGE[1], step=0.05,
                           tooltip="LoRA scale (1.0 = as trained)."),
            *_placement_inputs()]


def _model_output():
    return LiveAvatarModel.Output(display_name="model", tooltip="The loaded model (one GPU or a worker group).")


def _validate_placement(devices: str | None, gpu_mode: str | None, node: str) -> bool | str:
    if devices is None or gpu_mode is None:  # linked inputs: checked at run time
        return True
    try:
        parse_placement(devices, gpu_mode, node=node)
    except LiveAvatarInputError as exc:
        return str(exc)
    return True


def _missing_files(node: str, files: dict[str, tuple[str | None, str]]) -> bool | str:
    """Queue-time check of the file combos: {input: (value or None when linked, ComfyUI folder)}.
    ComfyUI does not check a V3 combo's value against its options, so a workflow naming an absent
    file is refused here, naming the input, before anything loads."""
    for name, (value, folder) in files.items():
        if value is None or value in (mf.AUTO, mf.NONE):
            continue
        found = mf.checkpoint_path(value) if folder == mf.FOLDER else mf.file_path(folder, value)
        if found is None:
            return (f"{node}: input '{name}': {value!r} is not in models/{folder}; put it there and refresh "
                    "(the workflow's missing-models list names its source)")
    return True


EMBEDDED_TOKENIZER = "from the umT5 file"


def has_embedded_tokenizer(t5_path: str) -> bool:
    """Whether a umT5 safetensors file carries its SentencePiece model (`spiece_model`); header only."""
    from liveavatar.loading.safetensors_io import open_tensor_source

    try:
        return "spiece_model" in open_tensor_source(t5_path).keys()
    except Exception:  # not a safetensors file we can read: the loader will say why
        return False


def _open(kind: str, paths: dict[str, str], lora: str | None, lora_strength: float, precision: str,
          attention: str, devices: str, gpu_mode: str, compile: bool, node: str, weights: str = "auto") -> io.NodeOutput:
    prec = precision_options(precision, node)
    try:
        lora_strength = check_lora_strength(lora_strength)
    except ValueError as exc:
        raise LiveAvatarInputError(node, "lora_strength", str(exc).partition(": ")[2]) from None
    if attention not in attention_backends():
        raise LiveAvatarInputError(node, "attention", f"{attention!r} is not one of {', '.join(attention_backends())}")
    placement = parse_placement(devices, gpu_mode, node=node)
    if weights not in WEIGHTS_MODES:
        raise LiveAvatarInputError(node, "weights", f"{weights!r} is not one of {', '.join(WEIGHTS_MODES)}")
    if weights == "stream" and placement.mode != "single":
        raise LiveAvatarInputError(node, "weights", "stream runs on one device (gpu_mode single) for now; "
                                   "worker groups keep their layers resident: use auto")
    for name, path in paths.items():
        confine(node, name, path)
    if lora not in (None, "none"):
        confine(node, "lora", lora)
    stamps = file_stamps(list(paths.values()) + ([lora] if lora else []))
    spec = LoadSpec(kind=kind, paths=tuple(sorted(paths.items())), lora=lora,
                    lora_strength=float(lora_strength), dtype=prec.dtype, fp8=prec.fp8, attn=attention,
                    compile=bool(compile), placement=placement, stamps=stamps, weights=weights)
    handle = get_or_open(spec)
    return io.NodeOutput(handle)


class LiveAvatarModelLoader(io.ComfyNode):
    """Load an official Wan2.2-S2V-14B folder (+ the Live Avatar LoRA) from models/liveavatar."""

    NAME = "LiveAvatar Model Loader"

    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = [mf.AUTO, mf.NONE] + mf.files("loras")
        return io.Schema(
            node_id="LiveAvatarModelLoader",
            display_name=cls.NAME,
            category=CATEGORY_LOADERS,
            description="Loads Live Avatar (Wan2.2-S2V-14B + 4-step LoRA) from a checkpoint folder in "
                        "models/liveavatar. The model stays loaded between runs while these inputs "
                        "are unchanged.",
            inputs=[
                io.Combo.Input("checkpoint", options=mf.checkpoint_folders(),
                               tooltip="A checkpoint folder (with config.json, the DiT shards, umT5, VAE and "
                                       "wav2vec2) under models/liveavatar, e.g. Wan2.2-S2V-14B."),
                io.Combo.Input("lora", options=loras, default=mf.AUTO,
                               tooltip="Live Avatar LoRA. auto: liveavatar.safetensors inside or next to the "
                                       "checkpoint folder. none: the base model only. Or a file from models/loras."),
                *_common_inputs(),
            ],
            outputs=[_model_output()],
        )

    @classmethod
    def validate_inputs(cls, devices=None, gpu_mode=None, checkpoint=None, lora=None) -> bool | str:
        files = _missing_files(cls.NAME, {"checkpoint": (checkpoint, mf.FOLDER), "lora": (lora, "loras")})
        return files if files is not True else _validate_placement(devices, gpu_mode, cls.NAME)

    @classmethod
    def execute(cls, checkpoint: str, lora: str, lora_strength: float, precision: str, attention: str,
                devices: str, gpu_mode: str, compile: bool, weights: str = "auto") -> io.NodeOutput:
        ckpt = mf.checkpoint_path(checkpoint)
        if ckpt is None:
            raise LiveAvatarInputError(cls.NAME, "checkpoint", f"{checkpoint!r} is not a checkpoint folder "
                                       "(config.json + DiT weights) under models/liveavatar; put the "
                                       "Wan2.2-S2V-14B folder there and refresh")
        if lora == mf.AUTO:
            lora_path = mf.auto_lora(ckpt)  # None: the library looks in its default places
        elif lora == mf.NONE:
            lora_path = "none"  # the library's word for "no LoRA"
        else:
            lora_path = mf.file_path("loras", lora)
            if lora_path is None:
                raise LiveAvatarInputError(cls.NAME, "lora", f"{lora!r} is not in models/loras")
        return _open("checkpoint", {"ckpt_dir": ckpt}, lora_path, lora_strength, precision, attention,
                     devices, gpu_mode, compile, cls.NAME, weights)


class LiveAvatarModelLoaderFiles(io.ComfyNode):
    """Load Live Avatar from ComfyUI single files (diffusion_models, text_encoders, vae, audio_encoders)."""

    NAME = "LiveAvatar Model Loader (single files)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarModelLoaderFiles",
            display_name=cls.NAME,
            category=CATEGORY_LOADERS,
            description="Loads Live Avatar from the single files ComfyUI's native Wan S2V workflows use. "
                        "The model stays loaded between runs while these inputs are unchanged.",
            inputs=[
                io.Combo.Input("dit", options=mf.files("diffusion_models"),
                               tooltip="Wan2.2-S2V-14B DiT from models/diffusion_models "
                                       "(e.g. wan2.2_s2v_14B_bf16.safetensors)."),
                io.Combo.Input("t5", options=mf.files("text_encoders"),
                               tooltip="umT5-XXL text encoder from models/text_encoders "
                                       "(e.g. umt5_xxl_fp16.safetensors)."),
                io.Combo.Input("vae", options=mf.files("vae"),
                               tooltip="Wan2.1 VAE from models/vae (wan_2.1_vae.safetensors)."),
                io.Combo.Input("wav2vec", options=mf.files("audio_encoders"),
                               tooltip="wav2vec2 large English from models/audio_encoders "
                                       "(wav2vec2_large_english_fp16.safetensors)."),
                io.Combo.Input("tokenizer", options=[mf.AUTO, EMBEDDED_TOKENIZER] + mf.tokenizer_folders(),
                               default=mf.AUTO,
                               tooltip="umT5 tokenizer: a google/umt5-xxl folder (e.g. inside the official "
                                       "checkpoint folder in models/liveavatar), or the one ComfyUI's umT5 "
                                       "files carry inside. auto: the first folder found, else the file's own."),
                io.Combo.Input("lora", options=[mf.NONE] + mf.files("loras"), default=mf.NONE,
                               tooltip="Live Avatar LoRA (liveavatar.safetensors) from models/loras; "
                                       "none for the base model."),
                *_common_inputs(),
            ],
            outputs=[_model_output()],
        )

    @classmethod
    def validate_inputs(cls, devices=None, gpu_mode=None, dit=None, t5=None, vae=None, wav2vec=None,
                        lora=None) -> bool | str:
        files = _missing_files(cls.NAME, {"dit": (dit, "diffusion_models"), "t5": (t5, "text_encoders"),
                                          "vae": (vae, "vae"), "wav2vec": (wav2vec, "audio_encoders"),
                                          "lora": (lora, "loras")})
        return files if files is not True else _validate_placement(devices, gpu_mode, cls.NAME)

    @classmethod
    def execute(cls, dit: str, t5: str, vae: str, wav2vec: str, tokenizer: str, lora: str, lora_strength: float,
                precision: str, attention: str, devices: str, gpu_mode: str, compile: bool,
                weights: str = "auto") -> io.NodeOutput:
        paths = {}
        for name, folder, value in (("dit", "diffusion_models", dit), ("t5", "text_encoders", t5),
                                    ("vae", "vae", vae), ("wav2vec", "audio_encoders", wav2vec)):
            path = mf.file_path(folder, value)
            if path is None:
                raise LiveAvatarInputError(cls.NAME, name, f"{value!r} is not in models/{folder}")
            paths[name] = path
        if tokenizer == mf.AUTO:
            found = mf.tokenizer_folders()
            tokenizer = found[0] if found else EMBEDDED_TOKENIZER
        if tokenizer == EMBEDDED_TOKENIZER:
            if not has_embedded_tokenizer(paths["t5"]):
                raise LiveAvatarInputError(cls.NAME, "tokenizer", f"{t5!r} carries no tokenizer (spiece_model) and no "
                                           "umT5 tokenizer folder was found; put google/umt5-xxl "
                                           "(tokenizer_config.json, spiece.model) under models/liveavatar or "
                                           "models/text_encoders, or use ComfyUI's umT5 file")
        else:
            tok_path = mf.tokenizer_path(tokenizer)
            if tok_path is None:
                raise LiveAvatarInputError(cls.NAME, "tokenizer", f"{tokenizer!r} is not a tokenizer folder")
            paths["tokenizer_dir"] = tok_path
        lora_path = None
        if lora != mf.NONE:
            lora_path = mf.file_path("loras", lora)
            if lora_path is None:
                raise LiveAvatarInputError(cls.NAME, "lora", f"{lora!r} is not in models/loras")
        return _open("files", paths, lora_path, lora_strength, precision, attention, devices, gpu_mode,
                     compile, cls.NAME, weights)


__all__ = ["LiveAvatarModelLoader", "LiveAvatarModelLoaderFiles", "attention_backends", "EMBEDDED_TOKENIZER",
           "has_embedded_tokenizer"]
