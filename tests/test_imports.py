"""Import layering: dependencies flow nodes -> parallel -> liveavatar, benchmarks sit outside.

- Every module of `liveavatar/` and `parallel/` imports on its own, in a process that has
  imported none of our packages before it (a fork of a fresh interpreter that preloaded only
  torch, so the many imports stay fast), and what it pulls in respects the layering: the library
  never loads `parallel`, `nodes`, `bench` or ComfyUI; `parallel` never loads `nodes`, `bench`
  or ComfyUI.
- The static import graph of our packages (every `import` statement, including the ones inside
  functions and under `TYPE_CHECKING`) has no cycle, and no file of the library names a
  forbidden package (except the command line's `--gpus` branch, which starts a worker group).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("liveavatar", "parallel", "nodes", "bench")
COMFY = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths")
FORBIDDEN = {"liveavatar": ("parallel", "nodes", "bench", *COMFY), "parallel": ("nodes", "bench", *COMFY)}

# argv: module names. Preloads torch, then imports each module in its own forked child; prints
# one JSON line per module: {"module", "error", "loaded": top-level packages of ours and ComfyUI's}.
CHILD = r"""
import importlib, json, multiprocessing as mp, sys, traceback
import torch  # noqa: F401  (third-party only: none of our packages is loaded in the parent)
WATCH = set(sys.argv[1].split(","))

def probe(name):
    try:
        importlib.import_module(name)
        error = None
    except BaseException:
        error = traceback.format_exc()[-1500:]
    loaded = sorted({m.split(".")[0] for m in sys.modules} & WATCH)
    return {"module": name, "error": error, "loaded": loaded}

if __name__ == "__main__":
    mods = sys.argv[2:]
    ours = sorted(m for m in sys.modules if m.split(".")[0] in WATCH)
    assert not ours, f"parent already imported {ours}"
    with mp.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
        for res in pool.imap(probe, mods):
            print(json.dumps(res), flush=True)
"""


def _modules(pkg: str) -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / pkg).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of `known` that `path` imports anywhere (function bodies and TYPE_CHECKING too)."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]  # a submodule, else (walked up) `base`
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_each_module_imports_alone_and_respects_the_layering():
    mods = [m for pkg in ("liveavatar", "parallel") for m in _modules(pkg)]
    control = "bench.cli"  # outside the rule: it loads the library, the probe must see that
    watch = ",".join(PACKAGES + COMFY)
    proc = subprocess.run([sys.executable, "-c", CHILD, watch, *mods, control], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert [r["module"] for r in results] == mods + [control]
    seen = results.pop()
    assert seen["error"] is None and seen["loaded"] == ["bench", "liveavatar"], seen
    failed = {r["module"]: r["error"] for r in results if r["error"]}
    assert not failed, failed
    wrong = {r["module"]: sorted(set(r["loaded"]) & set(FORBIDDEN[r["module"].split(".")[0]]))
             for r in results}
    assert not {m: w for m, w in wrong.items() if w}, wrong


def test_static_import_graph_has_no_cycle_and_the_library_names_no_outer_package():
    graph: dict[str, set[str]] = {}
    paths = {m: p for pkg in PACKAGES for m, p in _modules(pkg).items()}
    outer = set(FORBIDDEN["liveavatar"])
    for module, path in paths.items():
        graph[module] = _imports(module, path, set(paths) | outer)
    named = {m: sorted(d for d in deps if d.split(".")[0] in outer)
             for m, deps in graph.items() if m.split(".")[0] == "liveavatar"}
    # the command line is an edge like the nodes: with --gpus it hands the job to a worker group
    # (imported in that branch only; importing liveavatar.cli loads no parallel, see above)
    assert named.pop("liveavatar.cli") == ["parallel.handle"]
    assert not {m: d for m, d in named.items() if d}, named
    # the check sees what it should: the edges the layering wants are there
    assert "parallel.group" in graph["parallel.handle"] and "liveavatar.pipeline.model" in graph["parallel.engine"]

    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path_stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path_stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                return path_stack[path_stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path_stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
