"""Shipped workflows against the node schemas (ComfyUI's /object_info, trimmed copy in
workflows/schema/object_info.json), and that copy against the live node classes (with COMFYUI_DIR)."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from test_nodes_support import REPO, load_pack, needs_comfy


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"liveavatar_workflows_{name}", REPO / "workflows" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


check = _load("check")
build = _load("build")
SCHEMAS = check.load_schemas()
UI = sorted((REPO / "example_workflows").glob("*.json"))
API = sorted((REPO / "workflows" / "api").glob("*.json"))
OURS = sorted(k for k in SCHEMAS if k.startswith("LiveAvatar"))
EXPECTED = {"liveavatar_tiny_cpu", "liveavatar_single_gpu", "liveavatar_multi_gpu_tpp", "liveavatar_long_streaming"}


def _read(p: Path) -> dict:
    return json.loads(p.read_text())


def test_every_workflow_has_a_twin():
    assert {p.stem for p in UI} == {p.stem for p in API}
    assert EXPECTED <= {p.stem for p in UI}


@pytest.mark.parametrize("path", UI + API, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_workflow_is_valid(path):
    assert check.check_file(path, SCHEMAS) == []


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_ui_and_api_twins_agree(path):
    api = _read(REPO / "workflows" / "api" / path.name)
    for node in api.values():
        node.pop("_meta", None)
    assert check.ui_to_api_view(_read(path), SCHEMAS) == api


def test_files_match_the_builder():
    for name, nodes in build.workflows().items():
        assert _read(REPO / "example_workflows" / f"{name}.json") == build.to_ui(nodes, SCHEMAS, name), name
        assert _read(REPO / "workflows" / "api" / f"{name}.json") == build.to_api(nodes, SCHEMAS), name


def test_workflows_use_our_nodes_and_native_video():
    tiny = _read(REPO / "workflows" / "api" / "liveavatar_tiny_cpu.json")
    types = {n["class_type"] for n in tiny.values()}
    assert {"LiveAvatarSampler", "CreateVideo", "SaveVideo", "LoadImage", "LoadAudio"} <= types
    tpp = _read(REPO / "workflows" / "api" / "liveavatar_multi_gpu_tpp.json")
    loader = next(n for n in tpp.values() if n["class_type"] == "LiveAvatarModelLoader")
    assert loader["inputs"]["gpu_mode"] == "tpp" and len(loader["inputs"]["devices"].split(",")) == 5
    long = _read(REPO / "workflows" / "api" / "liveavatar_long_streaming.json")
    sampler_id, sampler = next((k, n) for k, n in long.items() if n["class_type"] == "LiveAvatarSampler")
    save = next(n for n in long.values() if n["class_type"] == "SaveVideo")
    # the VIDEO path: the Sampler's streamed mp4 (output 3) straight into Save Video, no frames in RAM
    assert save["inputs"]["video"] == [sampler_id, 3] and sampler["inputs"]["keep_frames"] is False
    assert not any(n["class_type"] == "CreateVideo" for n in long.values())


def test_checker_catches_broken_workflows():
    """The checks fail on each kind of mistake (so the tests above can fail)."""
    ui = _read(REPO / "example_workflows" / "liveavatar_tiny_cpu.json")
    api = _read(REPO / "workflows" / "api" / "liveavatar_tiny_cpu.json")

    def ui_problems(mutate):
        w = copy.deepcopy(ui)
        mutate(w)
        return check.check_ui(w, SCHEMAS)

    def api_problems(mutate):
        w = copy.deepcopy(api)
        mutate(w)
        return check.check_api(w, SCHEMAS)

    def node(w, t):
        return next(n for n in w["nodes"] if n["type"] == t)

    def api_node(w, t):
        return next(n for n in w.values() if n["class_type"] == t)

    assert any("unknown node type" in p for p in ui_problems(lambda w: node(w, "CreateVideo").update(type="Nope")))
    assert any("link type" in p or "into" in p
               for p in ui_problems(lambda w: [ln.__setitem__(5, "IMAGE") for ln in w["links"] if ln[5] == "LIVEAVATAR_TEXT"]))
    assert any("steps" in p for p in ui_problems(lambda w: node(w, "LiveAvatarSampler")["widgets_values"].__setitem__(2, 7)))
    assert any("control value" in p
               for p in ui_problems(lambda w: node(w, "LiveAvatarSampler")["widgets_values"].__setitem__(1, 4)))
    assert any("gpu_mode" in p for p in ui_problems(
        lambda w: node(w, "LiveAvatarModelLoader")["widgets_values"].__setitem__(6, "all")))
    assert any("not connected" in p for p in ui_problems(
        lambda w: node(w, "LiveAvatarSampler")["inputs"][0].update(link=None)))
    assert any("num_clip" in p for p in api_problems(lambda w: api_node(w, "LiveAvatarSampler")["inputs"].update(num_clip=-1)))
    assert any("fed by" in p for p in api_problems(
        lambda w: api_node(w, "LiveAvatarSampler")["inputs"].update(text=["1", 0])))
    assert any("missing" in p for p in api_problems(lambda w: api_node(w, "LiveAvatarSampler")["inputs"].pop("audio")))


def test_layout_check_counts_title_bars_and_frontend_sizes():
    """check_layout flags a node whose title bar alone covers the node above, and a node declared
    smaller than the frontend draws it; the shipped files pass it (test_workflow_is_valid)."""
    ui = _read(REPO / "example_workflows" / "liveavatar_tiny_cpu.json")
    assert check.check_layout(ui) == []
    create = next(n for n in ui["nodes"] if n["type"] == "CreateVideo")
    save = next(n for n in ui["nodes"] if n["type"] == "SaveVideo")
    w = copy.deepcopy(ui)
    moved = next(n for n in w["nodes"] if n["id"] == save["id"])
    moved["pos"] = [create["pos"][0], create["pos"][1] + create["size"][1] + 10]  # bodies 10 px apart
    assert any("overlaps" in p and "SaveVideo" in p for p in check.check_layout(w))
    moved["pos"][1] += check.TITLE_HEIGHT
    assert check.check_layout(w) == []
    w = copy.deepcopy(ui)
    next(n for n in w["nodes"] if n["type"] == "LoadImage")["size"] = [360, 112]  # no room for the preview
    assert any("LoadImage" in p and "would grow" in p for p in check.check_layout(w))


@pytest.mark.parametrize("name", OURS)
def test_our_schemas_follow_the_conventions(name):
    info = SCHEMAS[name]
    assert info["category"].startswith("LiveAvatar/") and info["display_name"].startswith("LiveAvatar")
    for section in ("required", "optional"):
        for inp, spec in info["input"].get(section, {}).items():
            extra = spec[1] if len(spec) > 1 else {}
            assert extra.get("tooltip"), f"{name}.{inp} has no tooltip"
            if spec[0] in ("INT", "FLOAT"):
                assert {"min", "max", "step"} <= set(extra), f"{name}.{inp} lacks min/max/step"
    assert all(info["output_tooltips"])


@needs_comfy()
@pytest.mark.comfyui
def test_snapshot_matches_the_live_schemas():
    """workflows/schema/object_info.json is what our node classes declare now (rebuild it if not)."""
    import_comfy = __import__("test_nodes_support").import_comfy
    import_comfy()
    ext = asyncio.run(load_pack().comfy_entrypoint())
    live = {}
    for cls in asyncio.run(ext.get_node_list()):
        info = json.loads(json.dumps(cls.GET_NODE_INFO_V1()))
        live[info["name"]] = info
    assert sorted(live) == OURS
    for name, info in live.items():
        snap = copy.deepcopy(SCHEMAS[name])
        for d in (info, snap):
            d.pop("python_module", None)
            for section in d["input"].values():
                for inp, spec in section.items():
                    if (name, inp) in check.FILE_INPUTS and len(spec) > 1:
                        spec[1].pop("options", None)
        assert info == snap, f"{name}: run `python workflows/build.py snapshot URL` and rebuild"


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_every_weight_file_reaches_the_missing_models_dialog(path):
    """The files each workflow needs, with source and folder, as ComfyUI's frontend checks them at load
    (check.dialog_models mirrors frontend 1.27.10); the tiny checkpoint is made locally, nothing to fetch."""
    ui = _read(path)
    names = {(m["directory"], m["name"]) for m in check.dialog_models(ui)}
    loader = next(n for n in ui["nodes"] if n["type"].startswith("LiveAvatarModelLoader"))
    if loader["type"] == "LiveAvatarModelLoaderFiles":
        assert names == {(folder, name) for name, folder, _ in build.SINGLE_FILES.values()}
        assert {m["name"] for m in check.node_selected_models(loader)} <= set(loader["widgets_values"])
    elif loader["widgets_values"][0] == build.OFFICIAL_CHECKPOINT:
        folder = build.OFFICIAL_CHECKPOINT
        assert names == {("liveavatar", f"{folder}/{f}") for f in [*build.OFFICIAL_WEIGHTS, "liveavatar.safetensors"]}
        assert loader["properties"]["models"] == ui["models"]  # declared on the loader, listed for the workflow
    else:
        assert path.stem == "liveavatar_tiny_cpu" and names == set()
    assert all(m["url"].startswith("https://huggingface.co/") for m in check.dialog_models(ui))


def test_model_check_catches_bad_entries():
    ui = _read(REPO / "example_workflows" / "liveavatar_single_files.json")

    def problems(mutate):
        w = copy.deepcopy(ui)
        loader = next(n for n in w["nodes"] if n["type"] == "LiveAvatarModelLoaderFiles")
        mutate(loader["properties"]["models"], loader)
        return check.check_models(w)

    assert problems(lambda ms, n: None) == []
    assert any("not https" in p for p in problems(lambda ms, n: ms[0].update(url="http://x/" + ms[0]["name"])))
    assert any("directory" in p for p in problems(lambda ms, n: ms[0].update(directory="checkpoints_typo")))
    assert any("another file" in p for p in problems(lambda ms, n: ms[0].update(url=ms[1]["url"])))
    assert any("never reaches" in p
               for p in problems(lambda ms, n: n["widgets_values"].__setitem__(0, "other.safetensors")))


def test_every_workflow_has_its_thumbnail_and_title():
    """example_workflows/<name>.jpg is what the template browser shows for <name>.json (frontend 1.27.10:
    `/api/workflow_templates/<pack>/<name>.jpg`); each card's text fits (thumbnails.thumbnail raises if not)."""
    from PIL import Image

    thumbs = _load("thumbnails")
    assert set(build.TITLES) == {p.stem for p in UI}
    for p in UI:
        with Image.open(p.with_suffix(".jpg")) as img:
            assert img.format == "JPEG" and img.size == (thumbs.SIZE, thumbs.SIZE)
    blank = Image.new("RGB", (704, 384))
    for title, line, setup in build.TITLES.values():
        assert thumbs.thumbnail(title, line, setup, blank, blank).size == (thumbs.SIZE, thumbs.SIZE)
    with pytest.raises(ValueError, match="too long"):
        thumbs.thumbnail("x" * 80, "", "", blank, blank)
