"""Write the shipped workflows from compact graph descriptions, in both ComfyUI formats.

- UI format -> `example_workflows/<name>.json` (what ComfyUI's template browser lists for a custom
  node pack: `app/custom_node_manager.py` serves `<pack>/example_workflows/*.json`).
- API format -> `workflows/api/<name>.json` (the `prompt` of `POST /prompt`).

Widget order, slot types and defaults come from `workflows/schema/object_info.json`, a trimmed
copy of a real ComfyUI's `/object_info` (our nodes + the core nodes the workflows use). Refresh it
from a running ComfyUI that has this pack loaded, then rebuild and check:

    python workflows/build.py snapshot http://127.0.0.1:8188
    python workflows/build.py build
    python workflows/check.py

Standalone: only the standard library.
"""

from __future__ import annotations

import json
import sys
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check import (API_DIR, FRONTEND_MIN_SIZE, FRONTEND_ONLY, SNAPSHOT, TITLE_HEIGHT, UI_DIR,  # noqa: E402
                   UPLOAD_EXTRA, check_api, check_layout, check_models, check_ui, input_specs, is_widget,
                   load_schemas, node_selected_models, type_name)

CORE_NODES = [
    "LoadImage", "LoadAudio", "CreateVideo", "SaveVideo", "GetVideoComponents", "PreviewImage",
    "PreviewAudio", "SaveAudio", "CLIPLoader", "CLIPTextEncode", "AudioEncoderLoader", "AudioEncoderEncode",
]
TINY_CHECKPOINT = "liveavatar-tiny"
OFFICIAL_CHECKPOINT = "Wan2.2-S2V-14B"
EXAMPLE_IMAGE = "avatar.png"  # assets/avatar.png of this repo, copied to ComfyUI/input
EXAMPLE_AUDIO = "speech.wav"  # assets/speech.wav
# What the template browser card of each workflow says (ComfyUI frontend 1.27.10 titles a custom
# node pack's template with its file name, so the thumbnail carries the title: thumbnails.py).
TITLES = {  # name -> (title, what it is for, its model and output)
    "liveavatar_tiny_cpu": ("Tiny CPU demo", "random tiny weights: checks the graph in seconds",
                            "liveavatar-tiny, fp32, CPU -> Save Video"),
    "liveavatar_single_gpu": ("One GPU", "short clips on one 80 GB GPU (fp8: 48 GB)",
                              "Wan2.2-S2V-14B folder + LoRA, bf16 -> Save Video"),
    "liveavatar_multi_gpu_tpp": ("5 GPUs, pipeline parallel", "one denoising step per GPU + a decode GPU",
                                 "Wan2.2-S2V-14B folder + LoRA, GPUs 0-4 -> Save MP4"),
    "liveavatar_long_streaming": ("Long videos, streamed", "a VIDEO streamed to disk: no frame in RAM",
                                  "Wan2.2-S2V-14B folder + LoRA, fp8 -> Save Video"),
    "liveavatar_single_files": ("ComfyUI single files", "Comfy-Org's Wan2.2 S2V files + the LoRA",
                                "ComfyUI model folders + LoRA -> Save Video"),
}

# Where each weight file comes from ("models" of the UI workflows: ComfyUI's frontend lists the
# absent ones with their source and folder when a workflow is loaded).
HF = "https://huggingface.co"
WAN_S2V = f"{HF}/Wan-AI/Wan2.2-S2V-14B/resolve/main"
LIVEAVATAR_LORA = f"{HF}/Quark-Vision/Live-Avatar/resolve/main/liveavatar.safetensors"
COMFY_WAN22 = f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files"
COMFY_WAN21 = f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
# The weight files of the official folder (files with a model extension only: the frontend's model
# lists hold nothing else, so config.json, the shard index and the tokenizer cannot be declared).
OFFICIAL_WEIGHTS = [*(f"diffusion_pytorch_model-{i:05d}-of-00004.safetensors" for i in range(1, 5)),
                    "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth",
                    "wav2vec2-large-xlsr-53-english/model.safetensors"]
SINGLE_FILES = {  # loader input -> (file, ComfyUI folder, url)
    "dit": ("wan2.2_s2v_14B_bf16.safetensors", "diffusion_models",
            f"{COMFY_WAN22}/diffusion_models/wan2.2_s2v_14B_bf16.safetensors"),
    "t5": ("umt5_xxl_fp16.safetensors", "text_encoders", f"{COMFY_WAN21}/text_encoders/umt5_xxl_fp16.safetensors"),
    "vae": ("wan_2.1_vae.safetensors", "vae", f"{COMFY_WAN22}/vae/wan_2.1_vae.safetensors"),
    "wav2vec": ("wav2vec2_large_english_fp16.safetensors", "audio_encoders",
                f"{COMFY_WAN22}/audio_encoders/wav2vec2_large_english_fp16.safetensors"),
    "lora": ("liveavatar.safetensors", "loras", LIVEAVATAR_LORA),
}


def model_file(name: str, url: str, directory: str) -> dict[str, str]:
    """One entry of the frontend's `models` lists: file name inside `directory` (a ComfyUI folder type)."""
    return {"name": name, "url": url, "directory": directory}


def official_models(folder: str) -> list[dict[str, str]]:
    """The official folder's weight files under models/liveavatar/<folder>/, the LoRA inside it."""
    return [*(model_file(f"{folder}/{f}", f"{WAN_S2V}/{f}", "liveavatar") for f in OFFICIAL_WEIGHTS),
            model_file(f"{folder}/liveavatar.safetensors", LIVEAVATAR_LORA, "liveavatar")]


PROMPT = ("A young woman with long dark hair talks to the camera in a bright studio, natural lip movements, "
          "gentle head motion and friendly expressions, sharp focus, soft light.")


@dataclass
class N:
    """One node: id, type, widget values by name, inputs by name -> (source id, output slot), and its
    layout column (nodes are stacked top-down in their column, in list order)."""

    id: int
    type: str
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    column: int = 0
    title: str | None = None
    text: str = ""  # Note / MarkdownNote body
    models: list[dict[str, str]] = field(default_factory=list)  # properties.models


# Layout: columns COLUMN_STEP apart, GAP between a node's bottom and the next title bar.
NODE_WIDTH = 360
NOTE_SIZE = (400, 300)
COLUMN_STEP = 460
GAP = 40
# Room (px) below the widgets for what the frontend shows inside the node: LoadImage's image
# preview, the text our nodes show after a run, the Sampler's block preview, the video preview of
# Save Video / Save MP4 (which also needs WIDE width), a taller prompt box.
ROOM = {"LoadImage": 250, "SaveVideo": 440, "LiveAvatarSaveMP4": 510, "LiveAvatarSampler": 260,
        "LiveAvatarAudioEncode": 60, "LiveAvatarReferenceImage": 80, "LiveAvatarTextEncode": 80}
WIDE = {"SaveVideo": 480, "LiveAvatarSaveMP4": 480}


def note(id: int, text: str, column: int = 0) -> N:
    return N(id, "MarkdownNote", column=column, text=text)


def loader(id: int, checkpoint: str, *, precision="bf16", attention="sdpa", devices="auto",
           gpu_mode="auto", compile=False) -> N:
    return N(id, "LiveAvatarModelLoader", dict(checkpoint=checkpoint, lora="auto", lora_strength=1.0,
                                               precision=precision, attention=attention, devices=devices,
                                               gpu_mode=gpu_mode, compile=compile),
             models=official_models(checkpoint) if checkpoint == OFFICIAL_CHECKPOINT else [])


def encoders(model: int, image: int, audio: int, size: str, column: int = 1) -> list[N]:
    return [
        N(11, "LiveAvatarTextEncode", dict(prompt=PROMPT), {"model": (model, 0)}, column=column),
        N(12, "LiveAvatarAudioEncode", {}, {"model": (model, 0), "audio": (audio, 0)}, column=column),
        N(13, "LiveAvatarReferenceImage", dict(size=size, size_mode="area"),
          {"model": (model, 0), "image": (image, 0)}, column=column),
    ]


def media() -> list[N]:
    return [N(1, "LoadImage", dict(image=EXAMPLE_IMAGE)), N(2, "LoadAudio", dict(audio=EXAMPLE_AUDIO))]


def sampling_links() -> dict[str, tuple[int, int]]:
    return {"model": (10, 0), "text": (11, 0), "audio": (12, 0), "reference": (13, 0)}


def sampler(keep_frames: bool, column: int) -> N:
    return N(20, "LiveAvatarSampler", dict(seed=42, steps=4, num_clip=0, keep_frames=keep_frames, ram_limit_gb=8.0),
             sampling_links(), column=column)


def to_native_video(prefix: str, column: int = 2) -> list[N]:
    """Sampler frames (IMAGE, held in RAM: short clips) -> Create Video -> Save Video."""
    return [
        sampler(True, column),
        N(21, "CreateVideo", dict(fps=25.0), {"images": (20, 0), "audio": (20, 1), "fps": (20, 2)},
          column=column + 1),
        N(22, "SaveVideo", dict(filename_prefix=prefix, format="mp4", codec="h264"), {"video": (21, 0)},
          column=column + 1),
    ]


def to_saved_video(prefix: str, column: int = 2) -> list[N]:
    """Sampler video (the streamed mp4, never in RAM) -> Save Video."""
    return [sampler(False, column),
            N(22, "SaveVideo", dict(filename_prefix=prefix, format="mp4", codec="h264"), {"video": (20, 3)},
              column=column + 1)]


def to_streamed_mp4(prefix: str, column: int = 2) -> list[N]:
    return [N(20, "LiveAvatarSaveMP4", dict(seed=42, steps=4, num_clip=0, filename_prefix=prefix),
              sampling_links(), column=column)]


MAKE_TINY = (f"## Tiny demo (CPU)\nRandom tiny weights: checks the whole graph in seconds, the video is noise.\n\n"
             f"1. `python -m liveavatar make-tiny-checkpoint ComfyUI/models/liveavatar/{TINY_CHECKPOINT}`\n"
             f"2. Copy the pack's assets/avatar.png and assets/speech.wav to ComfyUI/input (or upload your own).\n"
             f"3. Queue. The video lands in output/LiveAvatar/.")
OFFICIAL = (f"## Files\n- `models/liveavatar/{OFFICIAL_CHECKPOINT}/`: the official Wan2.2-S2V-14B folder "
            "(config.json, DiT shards, umT5, Wan2.1 VAE, wav2vec2-large-xlsr-53-english).\n"
            "- `liveavatar.safetensors` (Quark-Vision/Live-Avatar) inside that folder or next to it "
            "(lora = auto), or in models/loras.\n\nSize is W*H, width first (704*384, 720*400, ...); the "
            "Reference Image node shows the effective size.")


def workflows() -> dict[str, list[N]]:
    return {
        "liveavatar_tiny_cpu": [
            loader(10, TINY_CHECKPOINT, precision="fp32", devices="cpu", gpu_mode="single"), *media(),
            note(30, MAKE_TINY), *encoders(10, 1, 2, "64*64"), *to_native_video("LiveAvatar/tiny"),
        ],
        "liveavatar_single_gpu": [
            loader(10, OFFICIAL_CHECKPOINT), *media(),
            note(30, OFFICIAL + "\n\nOne 80 GB GPU in bf16; set precision fp8 for 48 GB cards. For clips "
                     "longer than a minute use the streaming workflow (frames stay on disk, not in RAM)."),
            *encoders(10, 1, 2, "704*384"), *to_native_video("LiveAvatar/avatar"),
        ],
        "liveavatar_multi_gpu_tpp": [
            loader(10, OFFICIAL_CHECKPOINT, attention="cudnn", devices="0,1,2,3,4", gpu_mode="tpp", compile=True),
            *media(),
            note(30, OFFICIAL + "\n\n## Timestep-forcing pipeline parallelism\nGPUs 0-3 run one denoising "
                     "step each, GPU 4 decodes; blocks stream through the pipeline and into the mp4. "
                     "Worker processes stay up between runs while the loader inputs are unchanged."),
            *encoders(10, 1, 2, "704*384"), *to_streamed_mp4("LiveAvatar/tpp"),
        ],
        "liveavatar_long_streaming": [
            loader(10, OFFICIAL_CHECKPOINT, precision="fp8"), *media(),
            note(30, OFFICIAL + "\n\n## Long-form\nThe Sampler writes every decoded block to an mp4 at once "
                     "(H.264 + AAC, fragmented, in ComfyUI's temp folder) and hands it to Save Video as a "
                     "VIDEO: no frame is held in RAM, memory stays flat for hours of audio. Watch it grow: "
                     "the Sampler shows the file's path (`ffplay` or VLC open it while it is written). "
                     "keep_frames stays off (IMAGE frames: 3.2 GB per 1000 frames at 704x384). "
                     "num_clip 0 = until the audio ends."),
            *encoders(10, 1, 2, "704*384"), *to_saved_video("LiveAvatar/long"),
        ],
        "liveavatar_single_files": [
            N(10, "LiveAvatarModelLoaderFiles", dict(
                **{k: name for k, (name, _, _) in SINGLE_FILES.items()}, tokenizer="auto", lora_strength=1.0,
                precision="fp8", attention="sdpa", devices="auto", gpu_mode="single", compile=False),
              models=[model_file(name, url, folder) for name, folder, url in SINGLE_FILES.values()]),
            *media(),
            note(30, "## ComfyUI single files\nThe same files as ComfyUI's native Wan2.2 S2V template "
                     "(diffusion_models, text_encoders, vae, audio_encoders) plus the Live Avatar LoRA "
                     "in models/loras, and the umT5 tokenizer folder (google/umt5-xxl, as in the official checkpoint) "
                     "under models/liveavatar or models/text_encoders. A native CONDITIONING (Load CLIP type wan + CLIP Text Encode) can "
                     "feed LiveAvatar Text Encode's optional input instead of the prompt."),
            *encoders(10, 1, 2, "704*384"), *to_native_video("LiveAvatar/avatar"),
        ],
    }


# ------------------------------------------------------------------------------------- emitters

def _order(nodes: list[N]) -> dict[int, int]:
    deps = {n.id: {src for src, _ in n.links.values()} for n in nodes}
    order, done = {}, set()
    while len(done) < len(nodes):
        for n in nodes:
            if n.id not in done and deps[n.id] <= done:
                order[n.id] = len(order)
                done.add(n.id)
    return order


def _widget_value(schema: dict, node: N, name: str, typ: Any, extra: dict) -> Any:
    if name in node.widgets:
        return node.widgets[name]
    if "default" in extra:
        return extra["default"]
    if type_name(typ) == "COMBO":
        options = typ if isinstance(typ, list) else extra.get("options", [])
        return options[0] if options else ""
    raise KeyError(f"{node.type}: no value for widget '{name}'")


def to_ui(nodes: list[N], schemas: dict, name: str) -> dict:
    order = _order(nodes)
    by_id = {n.id: n for n in nodes}
    link_rows: list[list] = []
    out_nodes = []
    out_links: dict[tuple[int, int], list[int]] = {}
    slot_inputs: dict[int, list[dict]] = {}
    for n in nodes:
        if n.type in FRONTEND_ONLY:
            continue
        inputs = []
        for iname, typ, extra, required in input_specs(schemas[n.type]):
            widget = is_widget(typ, extra)
            if widget and iname not in n.links:
                continue
            entry = {"name": iname, "type": type_name(typ), "link": None}
            if widget:
                entry["widget"] = {"name": iname}
            if not required:
                entry["shape"] = 7
            inputs.append(entry)
        slot_inputs[n.id] = inputs
    next_link = 1
    for n in sorted(nodes, key=lambda m: order[m.id]):
        for iname, (src, sslot) in n.links.items():
            slots = slot_inputs[n.id]
            dslot = next(i for i, s in enumerate(slots) if s["name"] == iname)
            ltype = schemas[by_id[src].type]["output"][sslot]
            link_rows.append([next_link, src, sslot, n.id, dslot, ltype])
            slots[dslot]["link"] = next_link
            out_links.setdefault((src, sslot), []).append(next_link)
            next_link += 1
    for n in nodes:
        base = {"id": n.id, "type": n.type, "pos": [0, 0], "flags": {}, "order": order[n.id], "mode": 0}
        if n.type in FRONTEND_ONLY:
            out_nodes.append({**base, "size": list(NOTE_SIZE), "inputs": [], "outputs": [], "properties": {},
                              "widgets_values": [n.text], "color": "#432", "bgcolor": "#653"})
            continue
        schema = schemas[n.type]
        values = []
        for iname, typ, extra, _ in input_specs(schema):
            if not is_widget(typ, extra):
                continue
            values.append(_widget_value(schema, n, iname, typ, extra))
            if extra.get("control_after_generate"):
                values.append("fixed")
            for key, count in UPLOAD_EXTRA.items():
                if extra.get(key):
                    values.extend(["image"] if key == "image_upload" else [None] * count)
        outputs = [{"name": schema["output_name"][i], "type": t, "links": out_links.get((n.id, i), []),
                    "slot_index": i} for i, t in enumerate(schema["output"])]
        height = 60 + 26 * (len(slot_inputs[n.id]) + len(values)) + ROOM.get(n.type, 0)
        least = FRONTEND_MIN_SIZE.get(n.type, (0, 0))
        properties: dict[str, Any] = {"Node name for S&R": n.type}
        if n.models:
            properties["models"] = n.models
        width = WIDE.get(n.type, NODE_WIDTH)
        node = {**base, "size": [max(width, least[0]), max(height, least[1])], "inputs": slot_inputs[n.id],
                "outputs": outputs, "properties": properties, "widgets_values": values}
        if n.title:
            node["title"] = n.title
        out_nodes.append(node)
    place(out_nodes, {n.id: n.column for n in nodes})
    # the frontend only takes a node's models named by one of its widget values (a file combo);
    # the official folder's files are not, so they are also listed for the whole workflow
    unmatched = [m for node in out_nodes for m in node["properties"].get("models", [])
                 if m not in node_selected_models(node)]
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-liveavatar/{name}")),
        "revision": 0,
        "last_node_id": max(n.id for n in nodes),
        "last_link_id": next_link - 1,
        "nodes": sorted(out_nodes, key=lambda d: d["order"]),
        "links": link_rows,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}},
        "version": 0.4,
        **({"models": unmatched} if unmatched else {}),
    }


def place(ui_nodes: list[dict], columns: dict[int, int]) -> None:
    """Set `pos`: each column stacked top-down in list order, title bars included, GAP apart."""
    bottom: dict[int, int] = {}
    for node in ui_nodes:
        col = columns[node["id"]]
        top = bottom.get(col, 0) + TITLE_HEIGHT  # body starts below the title bar
        node["pos"] = [col * COLUMN_STEP, top]
        bottom[col] = top + node["size"][1] + GAP


def to_api(nodes: list[N], schemas: dict) -> dict:
    prompt = {}
    for n in nodes:
        if n.type in FRONTEND_ONLY:
            continue
        schema = schemas[n.type]
        inputs: dict[str, Any] = {}
        for iname, typ, extra, required in input_specs(schema):
            if iname in n.links:
                src, slot = n.links[iname]
                inputs[iname] = [str(src), slot]
            elif is_widget(typ, extra):
                inputs[iname] = _widget_value(schema, n, iname, typ, extra)
        prompt[str(n.id)] = {"class_type": n.type, "inputs": inputs,
                             "_meta": {"title": n.title or schema.get("display_name") or n.type}}
    return prompt


def build() -> int:
    schemas = load_schemas()
    UI_DIR.mkdir(exist_ok=True)
    API_DIR.mkdir(exist_ok=True)
    bad = 0
    for name, nodes in workflows().items():
        ui, api = to_ui(nodes, schemas, name), to_api(nodes, schemas)
        problems = check_ui(ui, schemas) + check_layout(ui) + check_models(ui) + check_api(api, schemas)
        for p in problems:
            print(f"{name}: {p}")
        bad += bool(problems)
        (UI_DIR / f"{name}.json").write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n")
        (API_DIR / f"{name}.json").write_text(json.dumps(api, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {name} ({len(ui['nodes'])} nodes, {len(ui['links'])} links)")
    return 1 if bad else 0


def snapshot(url: str) -> int:
    """Fetch /object_info and keep our nodes + CORE_NODES (file-list combos are machine-specific:
    the checks accept any file name there, see `check.FILE_INPUTS`)."""
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as r:
        info = json.loads(r.read())
    keep = {k: v for k, v in info.items() if k.startswith("LiveAvatar") or k in CORE_NODES}
    missing = [k for k in CORE_NODES if k not in keep]
    if missing or not any(k.startswith("LiveAvatar") for k in keep):
        print(f"missing node types: {missing or 'LiveAvatar*'}")
        return 1
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(json.dumps(dict(sorted(keep.items())), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {SNAPSHOT} ({len(keep)} node types)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "build":
        sys.exit(build())
    if len(sys.argv) == 3 and sys.argv[1] == "snapshot":
        sys.exit(snapshot(sys.argv[2]))
    print(__doc__)
    sys.exit(2)
