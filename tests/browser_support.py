"""ComfyUI's own frontend in headless Chromium, for browser tests (no tests here).

Debian's `chromium` and `chromium-driver` packages (`.ci/run` installs them; override the paths
with CHROMIUM / CHROMEDRIVER), driven by Selenium from PyPI. Selenium never downloads a driver or
a browser here: both paths are given.

    with running_server(base) as srv, Frontend(srv) as page:
        page.load_workflow(json.loads(path.read_text()))
        state = page.graph_state()          # nodes, links, open dialogs, as the frontend holds them
        assert not missing_nodes(state) and not broken_links(state)
        page.fit_view(); page.screenshot(out_png)

The graph is read through the frontend's JavaScript (`window.app.graph`, `window.LiteGraph`),
so what is checked is what a person would see after opening the file, not our own parsing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from comfy_server import Server

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
VIEWPORT = (1600, 1000)  # CSS pixels, device scale 1: screenshots are this size
# First-run settings: no template browser over the canvas, no minimap in screenshots.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}

# Everything a test asserts on, read in one call: per node its type, whether that type is
# registered, the frontend's error flag, position/size and slots; every link; open dialogs' text.
_GRAPH_STATE_JS = """
const g = window.app.graph, LG = window.LiteGraph;
const links = g.links instanceof Map ? [...g.links.values()] : Object.values(g.links || {});
return {
  nodes: g.nodes.map(n => ({
    id: n.id, type: n.type, title: n.title,
    registered: !!LG.registered_node_types[n.type], has_errors: !!n.has_errors,
    pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
    inputs: (n.inputs || []).map(i => ({name: i.name, type: String(i.type), link: i.link ?? null})),
    outputs: (n.outputs || []).map(o => ({name: o.name, type: String(o.type), links: o.links || []})),
  })),
  links: links.filter(Boolean).map(l => ({id: l.id, origin_id: l.origin_id, origin_slot: l.origin_slot,
                                         target_id: l.target_id, target_slot: l.target_slot,
                                         type: String(l.type)})),
  dialogs: [...document.querySelectorAll('.p-dialog')].map(e => e.innerText),
};
"""

# Fit every node into the canvas (what "fit view" does), margin in CSS pixels.
_FIT_VIEW_JS = """
const c = window.app.canvas, nodes = window.app.graph.nodes, margin = arguments[0];
const title = window.LiteGraph.NODE_TITLE_HEIGHT;
let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
for (const n of nodes) {
  x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
  x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
}
const w = c.canvas.clientWidth, h = c.canvas.clientHeight;
const scale = Math.min((w - 2 * margin) / (x1 - x0), (h - 2 * margin) / (y1 - y0));
c.ds.scale = scale;
c.ds.offset = [(w / scale - (x1 - x0)) / 2 - x0, (h / scale - (y1 - y0)) / 2 - y0];
c.setDirty(true, true); c.draw(true, true);
return scale;
"""


def browser_problem() -> str | None:
    """Why headless Chromium cannot be driven here (None when it can)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-ci.txt)"
    return None


def needs_browser():
    """pytest mark: skip unless Chromium, its driver and Selenium are here (CI turns skips into failures)."""
    problem = browser_problem()
    return pytest.mark.skipif(problem is not None, reason=problem or "")


class Frontend:
    """One headless Chromium page on a running ComfyUI server's frontend."""

    def __init__(self, server: Server, viewport: tuple[int, int] = VIEWPORT, timeout: float = 120):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.server = server
        for key, value in SETTINGS.items():
            req = urllib.request.Request(f"{server.url}/settings/{key}", data=json.dumps(value).encode(),
                                         method="POST")
            with urllib.request.urlopen(req, timeout=30):
                pass
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-extensions", "--no-first-run", f"--window-size={viewport[0]},{viewport[1] + 200}"):
            opts.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        try:
            self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": viewport[0], "height": viewport[1], "deviceScaleFactor": 1, "mobile": False})
            self.driver.set_script_timeout(timeout)
            self.driver.get(server.url)
            self.wait_for("!!(window.app && window.app.graph && window.app.canvas && window.LiteGraph)", timeout)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.driver.quit()

    def js(self, script: str, *args):
        """Run `script` (a function body; `arguments[i]` are the args) in the page and return its value."""
        return self.driver.execute_script(script, *args)

    def wait_for(self, expression: str, timeout: float = 60) -> None:
        end = time.time() + timeout
        while not self.js(f"return {expression}"):
            if time.time() > end:
                raise TimeoutError(f"the frontend did not reach `{expression}` in {timeout} s:\n"
                                   f"{self.server.tail()}")
            time.sleep(0.25)

    def load_workflow(self, workflow: dict, name: str = "workflow") -> None:
        """Open a UI-format workflow as the frontend opens a dropped file (`app.loadGraphData`)."""
        result = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "window.app.loadGraphData(arguments[0], true, true, arguments[1])"
            "  .then(() => done('ok'), e => done('error: ' + (e && e.stack || e)));", workflow, name)
        assert result == "ok", f"the frontend could not load {name}: {result}"
        time.sleep(0.5)  # dialogs (missing nodes/models) open right after the graph is configured

    def graph_state(self) -> dict:
        """{"nodes": [...], "links": [...], "dialogs": [text, ...]} as the frontend holds them now."""
        return self.js(_GRAPH_STATE_JS)

    def api_prompt(self) -> dict:
        """The graph as the frontend would queue it (`app.graphToPrompt().output`, API format)."""
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "window.app.graphToPrompt().then(p => done(p.output), e => done({error: String(e)}));")

    def serialized_graph(self) -> dict:
        """The graph as the frontend saves it (`app.graph.serialize()`, UI format): live positions and sizes."""
        return self.js("return window.app.graph.serialize()")

    def missing_model_rows(self, wait: float) -> list[str]:
        """The rows (`directory / name`) of the "Missing Models" dialog, polled for up to `wait` s
        (the frontend checks model folders asynchronously after load); [] when no dialog showed."""
        rows_js = ("return [...document.querySelectorAll('.comfy-missing-models li')]"
                   ".map(li => (li.querySelector('span[title]') || li).innerText.trim())")
        end = time.time() + wait
        while not (rows := self.js(rows_js)) and time.time() < end:
            time.sleep(0.25)
        return rows

    def close_dialogs(self) -> None:
        """Close every open dialog with its close button, as a person would."""
        self.js("document.querySelectorAll('.p-dialog .p-dialog-close-button').forEach(b => b.click())")
        self.wait_for("!document.querySelector('.p-dialog')", 10)

    def open_templates(self, category: str, names: list[str], timeout: float = 30) -> dict[str, int]:
        """Open the template browser on `category` (a custom node pack's name); wait until the cards
        `template-workflow-<name>` show and their thumbnails finished loading (or `timeout` s passed).
        Returns each card's thumbnail width as loaded (`naturalWidth`: 0 when missing or broken)."""
        self.js("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        self.wait_for("[...document.querySelectorAll('.p-dialog li')].some(e => e.innerText.trim() === "
                      f"{json.dumps(category)})", timeout)
        self.js("[...document.querySelectorAll('.p-dialog li')].find(e => e.innerText.trim() === arguments[0])"
                ".click()", category)
        cards = json.dumps([f"template-workflow-{n}" for n in names])
        imgs = f"{cards}.map(id => document.querySelector(`[data-testid='${{id}}'] img`))"
        # the cards fetch their image first and show it as a blob: URL; a failed fetch leaves no src
        end = time.time() + timeout
        while not self.js(f"return {imgs}.every(i => i && i.src && i.complete)") and time.time() < end:
            time.sleep(0.25)
        return dict(zip(names, self.js(f"return {imgs}.map(i => i && i.src ? i.naturalWidth : 0)")))

    def run_workflow(self, done: str, timeout: float = 300) -> None:
        """Press Run (`Comfy.QueuePrompt`) and wait until the page reaches the JS expression `done`."""
        self.js("window.app.extensionManager.command.execute('Comfy.QueuePrompt')")
        self.wait_for(done, timeout)

    def node_texts(self) -> dict[int, str]:
        """Each node's text shown on it after a run (widget `$$node-text-preview`), by node id."""
        return {int(k): v for k, v in self.js(
            "return Object.fromEntries(window.app.graph.nodes.map(n => [n.id, (n.widgets || [])"
            "  .find(w => w.name === '$$node-text-preview')?.value]).filter(e => e[1]))").items()}

    def fit_view(self, margin: int = 24) -> float:
        """Zoom and pan so that every node is in view; returns the canvas scale."""
        return self.js(_FIT_VIEW_JS, margin)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(path)), f"no screenshot written to {path}"
        return path


def missing_nodes(state: dict) -> list[str]:
    """Nodes whose type the frontend does not know, or that it flagged as broken."""
    bad = [f"{n['id']} {n['type']}" for n in state["nodes"] if not n["registered"] or n["has_errors"]]
    bad += [d.splitlines()[0] for d in state["dialogs"] if "missing" in d.lower() and "node" in d.lower()]
    return bad


def broken_links(state: dict) -> list[str]:
    """Links whose ends are not both in the graph, or that the two slots do not record, or whose
    type the slots do not accept (`*` and comma-separated types as LiteGraph reads them)."""
    nodes = {n["id"]: n for n in state["nodes"]}

    def accepts(slot_type: str, link_type: str) -> bool:
        types = {t.strip() for t in slot_type.split(",")}
        return "*" in types or link_type == "*" or link_type in types

    problems = []
    for link in state["links"]:
        src, dst = nodes.get(link["origin_id"]), nodes.get(link["target_id"])
        name = f"link {link['id']} ({link['origin_id']}:{link['origin_slot']} -> " \
               f"{link['target_id']}:{link['target_slot']}, {link['type']})"
        if src is None or dst is None:
            problems.append(f"{name}: an end node is not in the graph")
            continue
        if not (link["origin_slot"] < len(src["outputs"]) and link["target_slot"] < len(dst["inputs"])):
            problems.append(f"{name}: slot index out of range")
            continue
        out, inp = src["outputs"][link["origin_slot"]], dst["inputs"][link["target_slot"]]
        if link["id"] not in out["links"] or inp["link"] != link["id"]:
            problems.append(f"{name}: the slots do not record it (output links {out['links']}, input link "
                            f"{inp['link']})")
        if not (accepts(out["type"], link["type"]) and accepts(inp["type"], link["type"])):
            problems.append(f"{name}: output type {out['type']} / input type {inp['type']}")
    linked = {link["id"] for link in state["links"]}
    for n in state["nodes"]:
        for i in n["inputs"]:
            if i["link"] is not None and i["link"] not in linked:
                problems.append(f"node {n['id']} {n['type']} input {i['name']}: link {i['link']} does not exist")
    return problems
