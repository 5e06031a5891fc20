"""Our model inside ComfyUI's model management, in a real ComfyUI (headless, CPU: the "VRAM" is the
CPU device, ComfyUI's torch device there).

After a run the in-process model is one of ComfyUI's loaded models (`/liveavatar/status`:
registered, DiT loaded). ComfyUI's own `/free` with `unload_models` runs
`comfy.model_management.unload_all_models()` -> `free_memory(...)`, which takes our weights back
(our patcher's detach: the DiT moves to ComfyUI's offload device and counts as not loaded). The next
prompt re-registers and reloads it through `load_models_gpu` and runs as before.
"""

from __future__ import annotations

import json
import time

import pytest

from comfy_server import needs_server
from test_nodes_support import REPO

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, needs_server()]


def _api(name: str) -> dict:
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())


def _run(server, prompt: dict) -> None:
    hist = server.wait_history(server.queue(prompt, "memory-test"), timeout=600)
    err = dict(hist["status"]["messages"]).get("execution_error")
    assert hist["status"]["status_str"] == "success", json.dumps(err, indent=1)[:4000]


def _our_model(server) -> dict:
    models = [m for m in server.get("/liveavatar/status")["models"] if not m["closed"]]
    assert len(models) == 1, models
    return models[0]


def _wait_for(server, check, timeout: float = 60) -> dict:
    end = time.time() + timeout
    while True:
        m = _our_model(server)
        if check(m) or time.time() > end:
            return m
        time.sleep(0.5)


def test_comfyui_takes_our_memory_back_and_the_next_run_reloads_it(comfyui_server):
    server = comfyui_server
    prompt = _api("liveavatar_tiny_cpu")
    sampler = next(v for v in prompt.values() if v["class_type"] == "LiveAvatarSampler")
    sampler["inputs"]["seed"] = 101
    _run(server, prompt)
    m = _our_model(server)
    assert m["mode"] == "single" and m["devices"] == ["cpu"]
    assert m["registered"] and m["loaded"] and m["dit_bytes"] > 0 and m["dit_device"] == "cpu"
    before = m["offloads"]

    # another node's load (here ComfyUI's /free) asks for the memory: our DiT goes to the offload device
    status, _ = server.post("/free", {"unload_models": True})
    assert status == 200
    m = _wait_for(server, lambda m: not m["loaded"])
    assert not m["loaded"] and not m["registered"] and m["offloads"] == before + 1, m

    # the next prompt (a new seed: only the sampler runs again) reloads it and works
    sampler["inputs"]["seed"] = 102
    _run(server, prompt)
    m = _our_model(server)
    assert m["registered"] and m["loaded"] and m["offloads"] == before + 1, m
    # a run on a loaded model moves nothing (ComfyUI re-lists it; our weights stay)
    sampler["inputs"]["seed"] = 103
    _run(server, prompt)
    m = _our_model(server)
    assert m["registered"] and m["loaded"] and m["offloads"] == before + 1, m
    assert "LiveAvatar: ComfyUI took the GPU memory back" in server.tail(200_000)
    assert "LiveAvatar: DiT weights back on cpu" in server.tail(200_000)
