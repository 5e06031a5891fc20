"""ComfyUI's own frontend, in headless Chromium, opens every file of example_workflows/ whole.

A real ComfyUI server (`comfy_server`, this pack linked in, the tiny checkpoint in models/) serves
its frontend; `browser_support.Frontend` opens it in Chromium and loads each UI workflow the way a
dropped file is loaded. Read back from the frontend's `app.graph`: no node type is missing (none
unregistered, none flagged, no "missing nodes" dialog), no link is broken (both ends present, both
slots record it, types accepted), and the graph holds the file's nodes and links. The frontend's
own conversion to a queueable prompt (`app.graphToPrompt`) equals the shipped API twin
(`workflows/api/<name>.json`), restricted to the inputs the server declares. What a person then
sees (workflows/README.md): the live graph's nodes, title bars included, pairwise disjoint
(`check.check_layout` on `app.graph.serialize()`); "Missing Models" listing exactly
`check.dialog_models(workflow)` (the server has only the tiny checkpoint; the frontend's setting
`Comfy.Workflow.ShowMissingModelsWarning` is on by default, the test leaves it so); the template
browser's "ComfyUI-LiveAvatar" category showing a card per workflow with its thumbnail loaded.

The tiny workflow is also run from the Run button: afterwards our nodes show their text
(`$$node-text-preview`), the layout still holds, and the graph is fitted into view and photographed.
`LIVEAVATAR_UPDATE_DOCS=1 ... -k picture` copies that picture and the template browser's to
docs/workflow_tiny_cpu.png and docs/template_browser.png (the README shows both).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

from browser_support import VIEWPORT, Frontend, broken_links, missing_nodes, needs_browser
from comfy_server import PACK, needs_server
from test_nodes_support import REPO
from test_workflows import check

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow, needs_server(), needs_browser()]

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
DOCS_PICTURE = REPO / "docs" / "workflow_tiny_cpu.png"
DOCS_TEMPLATES = REPO / "docs" / "template_browser.png"


@pytest.fixture(scope="module")
def page(comfyui_server):
    with Frontend(comfyui_server) as page:
        yield page


@pytest.fixture(scope="module")
def object_info(comfyui_server) -> dict:
    return comfyui_server.get("/object_info")


def declared_inputs(object_info: dict, prompt: dict) -> dict:
    """`prompt` with each node's inputs cut to those its class declares (drops frontend-only widgets)."""
    out = {}
    for node_id, node in prompt.items():
        spec = object_info[node["class_type"]]["input"]
        names = set(spec.get("required", {})) | set(spec.get("optional", {}))
        out[node_id] = {"class_type": node["class_type"],
                        "inputs": {k: v for k, v in node["inputs"].items() if k in names}}
    return out


def test_there_are_workflows_to_open():
    assert len(WORKFLOWS) >= 5 and any(p.stem == "liveavatar_tiny_cpu" for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_opens_whole(page, object_info, path):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    page.load_workflow(workflow, path.name)
    state = page.graph_state()

    assert not missing_nodes(state), f"{path.name}: missing or broken nodes {missing_nodes(state)}"
    assert not broken_links(state), f"{path.name}: broken links {broken_links(state)}"
    assert sorted((n["id"], n["type"]) for n in state["nodes"]) == \
        sorted((n["id"], n["type"]) for n in workflow["nodes"]), f"{path.name}: nodes lost or changed on load"
    assert len(state["links"]) == len(workflow["links"]), f"{path.name}: links lost on load"

    api = json.loads((REPO / "workflows" / "api" / path.name).read_text(encoding="utf-8"))
    queued = page.api_prompt()
    assert "error" not in queued, queued
    assert declared_inputs(object_info, queued) == declared_inputs(object_info, api), (
        f"{path.name}: the frontend would queue something else than workflows/api/{path.name}")

    # what a person sees: no node (title bar included) over another at the frontend's own sizes, and
    # the absent weights listed in "Missing Models" (the server has only the tiny checkpoint)
    assert not check.check_layout(page.serialized_graph()), f"{path.name}: {check.check_layout(page.serialized_graph())}"
    expected = [f"{m['directory']} / {m['name']}" for m in check.dialog_models(workflow)]
    assert page.missing_model_rows(wait=30 if expected else 1.5) == expected, f"{path.name}: Missing Models rows"
    page.close_dialogs()


def test_template_browser_picture_has_every_thumbnail(page, tmp_path):
    widths = page.open_templates(PACK, [p.stem for p in WORKFLOWS])
    assert all(w > 0 for w in widths.values()), f"thumbnails not loaded (naturalWidth 0): {widths}"
    shot = page.screenshot(tmp_path / "template_browser.png")
    page.close_dialogs()
    if os.environ.get("LIVEAVATAR_UPDATE_DOCS") == "1":
        shutil.copy(shot, DOCS_TEMPLATES)


def test_tiny_workflow_picture_after_a_run(page, comfyui_server, tmp_path):
    """Run from the Run button; after it, every node still clear of the others and our nodes' text on them."""
    comfyui_server.clear_cache()  # every node runs and draws its text, whatever ran before on this server
    page.load_workflow(json.loads((REPO / "example_workflows" / "liveavatar_tiny_cpu.json").read_text()),
                       "liveavatar_tiny_cpu.json")
    page.run_workflow("window.app.graph.nodes.some(n => (n.widgets || []).some(w => "
                      "w.name === '$$node-text-preview' && String(w.value).includes(' blocks in ')))")
    texts = {page_type: text for page_type, text in
             ((n["type"], page.node_texts().get(n["id"])) for n in page.graph_state()["nodes"]) if text}
    assert texts.get("LiveAvatarReferenceImage", "").startswith("effective size 64x64"), texts
    assert texts.get("LiveAvatarAudioEncode", "").startswith("11 frames (0.44 s at 25 fps)"), texts
    assert " blocks in " in texts.get("LiveAvatarSampler", ""), texts
    assert not check.check_layout(page.serialized_graph()), check.check_layout(page.serialized_graph())

    assert 0.2 < page.fit_view() < 2.0
    shot = page.screenshot(tmp_path / "workflow_tiny_cpu.png")
    with Image.open(shot) as im:
        assert im.size == VIEWPORT
        # the canvas is drawn: many distinct colours, not a blank or error page
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 200
    if os.environ.get("LIVEAVATAR_UPDATE_DOCS") == "1":
        shutil.copy(shot, DOCS_PICTURE)
