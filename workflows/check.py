"""Check ComfyUI workflows (UI format and API format) against node schemas from `/object_info`.

Used by the tests and by `build.py`. Standalone: only the standard library.

A schema is one `/object_info` entry (`input.required/optional`, `input_order`, `output`, ...). The
checks, for both formats:

- every node type exists (schemas given, or a frontend-only type such as Note / MarkdownNote);
- every link joins an existing output to an input of the same type;
- every required input is linked or has a value;
- every widget value is valid: INT/FLOAT within min/max (INT on the step grid), STRING a string,
  BOOLEAN a bool, COMBO one of the options. Combos that list files of this machine (model
  dropdowns, LoadImage/LoadAudio) only need a non-empty string: `file_inputs` names them.

UI format (what the frontend saves): `nodes[].widgets_values` holds the widget values in input
order, with one extra value after every widget that has `control_after_generate` ("fixed",
"randomize", ...); upload widgets add trailing values (LoadImage: 1, LoadAudio: 2).
`links[]` are `[id, from_node, from_slot, to_node, to_slot, type]`, `to_slot` indexing the target
node's `inputs` list.

Model files (UI format, `check_models`): `models` entries (node `properties.models` and the
workflow's own `models`) have a name, an https url and a ComfyUI folder (`directory`); every entry
reaches the frontend's missing-models check (`dialog_models`: ComfyUI frontend 1.27.10 takes a
node's entry only when its name is one of the node's widget values, and every workflow-level entry).

Layout (UI format, `check_layout`): every node's box, title bar included (the frontend draws the
title `TITLE_HEIGHT` px above `pos`), is disjoint from every other node's box, and no node is
declared smaller than the frontend draws it (`FRONTEND_MIN_SIZE`: the frontend enlarges a node to
its computed size at load, which could make boxes overlap).

Usage: python workflows/check.py [workflow.json ...]   (default: every shipped workflow)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SNAPSHOT = HERE / "schema" / "object_info.json"
UI_DIR = REPO / "example_workflows"
API_DIR = HERE / "api"

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# (node type, input name) whose combo options are files on the machine that serves /object_info.
FILE_INPUTS = {
    ("LoadImage", "image"), ("LoadAudio", "audio"), ("LoadVideo", "file"),
    ("CLIPLoader", "clip_name"), ("AudioEncoderLoader", "audio_encoder_name"),
    ("VAELoader", "vae_name"), ("UNETLoader", "unet_name"), ("LoraLoaderModelOnly", "lora_name"),
    ("LiveAvatarModelLoader", "checkpoint"), ("LiveAvatarModelLoader", "lora"),
    ("LiveAvatarModelLoaderFiles", "dit"), ("LiveAvatarModelLoaderFiles", "t5"),
    ("LiveAvatarModelLoaderFiles", "vae"), ("LiveAvatarModelLoaderFiles", "wav2vec"),
    ("LiveAvatarModelLoaderFiles", "tokenizer"), ("LiveAvatarModelLoaderFiles", "lora"),
}
UPLOAD_EXTRA = {"image_upload": 1, "audio_upload": 2, "video_upload": 1}
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT
# `node.computeSize()` of ComfyUI frontend 1.27.10 for the node types of the shipped workflows,
# measured in headless Chromium after loading each workflow and after running the tiny one (and the
# streaming one on the tiny checkpoint): LoadImage with its preview image, our nodes with their
# text, the Sampler with its block preview, Save Video / Save MP4 with the video of a square 64x64
# run (the tallest preview: a 2:1 video needs 180 px less). A video preview is as wide as its node
# (at least 464 px) and as tall as the video's aspect makes it: Save Video was measured at width
# 480, Save MP4 at width 360 (at 480 a square video needs about 120 px more).
FRONTEND_MIN_SIZE = {
    "LoadImage": (230, 326), "LoadAudio": (230, 136), "CreateVideo": (210, 78), "SaveVideo": (464, 578),
    "MarkdownNote": (210, 88), "LiveAvatarModelLoader": (213, 226), "LiveAvatarModelLoaderFiles": (303, 322),
    "LiveAvatarTextEncode": (210, 108), "LiveAvatarAudioEncode": (221, 136),
    "LiveAvatarReferenceImage": (237, 184), "LiveAvatarSampler": (210, 476), "LiveAvatarSaveMP4": (464, 640),
}


def load_schemas(path: Path = SNAPSHOT) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def input_specs(schema: dict) -> list[tuple[str, str | list, dict, bool]]:
    """[(name, type or combo option list, extra dict, required)] in the node's input order."""
    out = []
    inputs = schema.get("input", {})
    order = schema.get("input_order") or {k: list(v) for k, v in inputs.items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = inputs.get(section, {}).get(name)
            if spec is None:
                continue
            typ = spec[0]
            extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, typ, extra, section == "required"))
    return out


def is_widget(typ: Any, extra: dict) -> bool:
    if extra.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def type_name(typ: Any) -> str:
    return "COMBO" if isinstance(typ, list) else str(typ)


def types_match(out_type: str, in_type: str) -> bool:
    if out_type == "*" or in_type == "*":
        return True
    a, b = set(str(out_type).split(",")), set(str(in_type).split(","))
    return a <= b or b <= a


def check_value(node_type: str, name: str, typ: Any, extra: dict, value: Any) -> str | None:
    """None if `value` is valid for this widget, else the problem."""
    kind = type_name(typ)
    if kind == "COMBO":
        options = typ if isinstance(typ, list) else extra.get("options", [])
        if (node_type, name) in FILE_INPUTS:
            if not isinstance(value, str) or not value:
                return f"{name}: {value!r} must be a file name"
            return None
        if value not in options:
            return f"{name}: {value!r} is not one of {options}"
        return None
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name}: {value!r} is not an integer"
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name}: {value!r} is not a number"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{name}: {value!r} is not a string"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: {value!r} is not a boolean"
    if "min" in extra and value < extra["min"]:
        return f"{name}: {value} is below min {extra['min']}"
    if "max" in extra and value > extra["max"]:
        return f"{name}: {value} is above max {extra['max']}"
    if kind == "INT" and extra.get("step", 1) > 1 and (value - extra.get("min", 0)) % extra["step"]:
        return f"{name}: {value} is not on the step grid {extra['step']}"
    return None


def check_ui(workflow: dict, schemas: dict) -> list[str]:
    """Problems of a UI-format workflow (empty list: valid)."""
    problems: list[str] = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = {ln[0]: ln for ln in workflow.get("links", [])}
    for nid, node in nodes.items():
        t = node.get("type")
        where = f"node {nid} ({t})"
        if t in FRONTEND_ONLY:
            continue
        if t not in schemas:
            problems.append(f"{where}: unknown node type")
            continue
        schema = schemas[t]
        specs = input_specs(schema)
        slots = {s["name"]: (i, s) for i, s in enumerate(node.get("inputs", []))}
        values = list(node.get("widgets_values", []))
        pos = 0
        for name, typ, extra, required in specs:
            slot = slots.get(name)
            linked = slot is not None and slot[1].get("link") is not None
            if is_widget(typ, extra):
                if pos >= len(values):
                    problems.append(f"{where}: widgets_values has no value for '{name}'")
                    break
                value = values[pos]
                pos += 1
                if extra.get("control_after_generate"):
                    if pos < len(values) and values[pos] in CONTROL_VALUES:
                        pos += 1
                    else:
                        problems.append(f"{where}: '{name}' needs a control value (fixed/randomize) after it")
                for key, n in UPLOAD_EXTRA.items():
                    if extra.get(key):
                        pos += n
                if not linked:
                    bad = check_value(t, name, typ, extra, value)
                    if bad:
                        problems.append(f"{where}: {bad}")
            elif required and not linked:
                problems.append(f"{where}: required input '{name}' is not connected")
        if pos < len(values):
            problems.append(f"{where}: {len(values) - pos} unexpected extra widget value(s)")
        known = {name for name, *_ in specs}
        for name in slots:
            if name not in known:
                problems.append(f"{where}: input '{name}' does not exist")
        outputs = schema.get("output", [])
        for i, out in enumerate(node.get("outputs", [])):
            if i >= len(outputs):
                problems.append(f"{where}: output slot {i} does not exist")
            elif out.get("type") != outputs[i]:
                problems.append(f"{where}: output {i} type {out.get('type')} != {outputs[i]}")
    for lid, (_, src, sslot, dst, dslot, ltype) in links.items():
        where = f"link {lid}"
        if src not in nodes or dst not in nodes:
            problems.append(f"{where}: joins a missing node")
            continue
        s_t, d_t = nodes[src]["type"], nodes[dst]["type"]
        if s_t in schemas:
            outs = schemas[s_t].get("output", [])
            if sslot >= len(outs):
                problems.append(f"{where}: {s_t} has no output {sslot}")
                continue
            if not types_match(outs[sslot], ltype):
                problems.append(f"{where}: link type {ltype} != output type {outs[sslot]}")
        d_inputs = nodes[dst].get("inputs", [])
        if dslot >= len(d_inputs):
            problems.append(f"{where}: {d_t} has no input slot {dslot}")
            continue
        d_in = d_inputs[dslot]
        if d_in.get("link") != lid:
            problems.append(f"{where}: target slot '{d_in.get('name')}' does not point back at it")
        if d_t in schemas:
            spec = {n: (typ, ex) for n, typ, ex, _ in input_specs(schemas[d_t])}.get(d_in.get("name"))
            if spec is not None and not types_match(ltype, type_name(spec[0])):
                problems.append(f"{where}: {ltype} into '{d_in.get('name')}' of type {type_name(spec[0])}")
        src_outs = nodes[src].get("outputs", [])
        if sslot < len(src_outs) and lid not in (src_outs[sslot].get("links") or []):
            problems.append(f"{where}: source output does not list it")
    return problems


MODEL_FOLDERS = {"liveavatar", "diffusion_models", "text_encoders", "vae", "audio_encoders", "loras"}


def node_selected_models(node: dict) -> list[dict]:
    """The node's `properties.models` entries the frontend considers: those named by a string widget value."""
    values = node.get("widgets_values") or []
    values = values.values() if isinstance(values, dict) else values
    names = {v for v in values if isinstance(v, str) and v.strip()}
    return [m for m in node.get("properties", {}).get("models", []) if m.get("name") in names]


def dialog_models(workflow: dict) -> list[dict]:
    """The entries the frontend checks at load (and lists when absent), unique by url, as it does."""
    found: dict[str, dict] = {}
    for m in [m for n in workflow.get("nodes", []) for m in node_selected_models(n)] + workflow.get("models", []):
        found.setdefault(m.get("url") or m.get("hash"), m)
    return list(found.values())


def check_models(workflow: dict) -> list[str]:
    """Problems of the model-file declarations of a UI-format workflow."""
    problems: list[str] = []
    declared = [(f"node {n['id']} ({n['type']})", m) for n in workflow.get("nodes", [])
                for m in n.get("properties", {}).get("models", [])]
    declared += [("workflow", m) for m in workflow.get("models", [])]
    checked = [m["url"] for m in dialog_models(workflow)]
    for where, m in declared:
        if not all(isinstance(m.get(k), str) and m.get(k) for k in ("name", "url", "directory")):
            problems.append(f"{where}: model entry {m} needs name, url and directory")
            continue
        if not m["url"].startswith("https://"):
            problems.append(f"{where}: {m['name']}: url {m['url']!r} is not https")
        if m["directory"] not in MODEL_FOLDERS:
            problems.append(f"{where}: {m['name']}: directory {m['directory']!r} is not one of {sorted(MODEL_FOLDERS)}")
        if m["url"].rsplit("/", 1)[-1] != m["name"].rsplit("/", 1)[-1]:
            problems.append(f"{where}: {m['name']}: url {m['url']} names another file")
        if m["url"] not in checked:
            problems.append(f"{where}: {m['name']} never reaches the frontend's missing-models check "
                            "(not a widget value of its node, not in the workflow's models)")
    return problems


def node_box(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a UI-format node as drawn, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def boxes_overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def check_layout(workflow: dict) -> list[str]:
    """Layout problems of a UI-format workflow: overlapping nodes, nodes declared below the frontend's size."""
    problems: list[str] = []
    nodes = workflow.get("nodes", [])
    for node in nodes:
        least = FRONTEND_MIN_SIZE.get(node.get("type"))
        if least and (node["size"][0] < least[0] or node["size"][1] < least[1]):
            problems.append(f"node {node['id']} ({node['type']}): size {node['size']} is below the frontend's "
                            f"{list(least)}; it would grow at load")
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if boxes_overlap(node_box(a), node_box(b)):
                problems.append(f"node {a['id']} ({a['type']}) overlaps node {b['id']} ({b['type']}) "
                                "(boxes with title bars)")
    return problems


def check_api(prompt: dict, schemas: dict) -> list[str]:
    """Problems of an API-format prompt (`POST /prompt` body's "prompt")."""
    problems: list[str] = []
    for nid, node in prompt.items():
        t = node.get("class_type")
        where = f"node {nid} ({t})"
        if t not in schemas:
            problems.append(f"{where}: unknown node type")
            continue
        schema = schemas[t]
        specs = input_specs(schema)
        given = node.get("inputs", {})
        for name, typ, extra, required in specs:
            if name not in given:
                if required:
                    problems.append(f"{where}: required input '{name}' is missing")
                continue
            value = given[name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
                src = prompt.get(value[0])
                if src is None:
                    problems.append(f"{where}: '{name}' links to missing node {value[0]}")
                    continue
                outs = schemas.get(src.get("class_type"), {}).get("output", [])
                if value[1] >= len(outs):
                    problems.append(f"{where}: '{name}' links to missing output {value[1]} of node {value[0]}")
                elif not types_match(outs[value[1]], type_name(typ)):
                    problems.append(f"{where}: '{name}' ({type_name(typ)}) fed by {outs[value[1]]}")
                continue
            if not is_widget(typ, extra):
                problems.append(f"{where}: '{name}' must be linked (type {type_name(typ)})")
                continue
            bad = check_value(t, name, typ, extra, value)
            if bad:
                problems.append(f"{where}: {bad}")
        known = {name for name, *_ in specs}
        for name in given:
            if name not in known:
                problems.append(f"{where}: input '{name}' does not exist")
    return problems


def ui_to_api_view(workflow: dict, schemas: dict) -> dict:
    """The API prompt a UI workflow stands for (widget values + links), for comparing twins."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {ln[0]: ln for ln in workflow.get("links", [])}
    out = {}
    for nid, node in nodes.items():
        t = node["type"]
        if t in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values", []))
        slots = {s["name"]: s for s in node.get("inputs", [])}
        pos = 0
        for name, typ, extra, _ in input_specs(schemas[t]):
            slot = slots.get(name)
            if slot is not None and slot.get("link") is not None:
                ln = links[slot["link"]]
                inputs[name] = [str(ln[1]), ln[2]]
            if is_widget(typ, extra):
                if slot is None or slot.get("link") is None:
                    inputs[name] = values[pos]
                pos += 1 + (1 if extra.get("control_after_generate") else 0)
                pos += sum(n for k, n in UPLOAD_EXTRA.items() if extra.get(k))
        out[str(nid)] = {"class_type": t, "inputs": inputs}
    return out


def workflow_files() -> list[Path]:
    return sorted(UI_DIR.glob("*.json")) + sorted(API_DIR.glob("*.json"))


def check_file(path: Path, schemas: dict) -> list[str]:
    data = json.loads(Path(path).read_text())
    if "nodes" in data:
        return check_ui(data, schemas) + check_layout(data) + check_models(data)
    return check_api(data, schemas)


def main(argv: list[str]) -> int:
    schemas = load_schemas()
    paths = [Path(a) for a in argv] or workflow_files()
    bad = 0
    for p in paths:
        problems = check_file(p, schemas)
        print(f"{p}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for msg in problems:
            print(f"  - {msg}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
