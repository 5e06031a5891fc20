"""Node file inputs are confined to ComfyUI's folders (nodes/paths.py): the rule on real files and
symlinks, and through a real headless ComfyUI (needs COMFYUI_DIR) where a checkpoint folder that is
a symlink leading out of models/ is refused in the node's error, the server stays up and the next
prompt runs."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
from comfy_server import PACK, Server, needs_server
from test_nodes_support import AUDIO_NAME, IMAGE_NAME, REPO, TINY_NAME, make_tiny, pack_submodule, write_wav

paths = pack_submodule("nodes.paths")
errors = pack_submodule("nodes.errors")


@pytest.fixture()
def tree(tmp_path) -> dict[str, Path]:
    models, inp, out, outside = (tmp_path / n for n in ("models", "input", "output", "outside"))
    for d in (models / "loras", inp, out, outside / "ckpt"):
        d.mkdir(parents=True)
    (models / "loras" / "ok.safetensors").write_bytes(b"x")
    (outside / "ckpt" / "config.json").write_text("{}")
    (outside / "secret.safetensors").write_bytes(b"x")
    return {"models": models, "input": inp, "output": out, "outside": outside, "roots": [models, inp, out]}


def _refused(tree, path) -> str:
    with pytest.raises(errors.LiveAvatarInputError) as err:
        paths.confine("Loader", "lora", str(path), tree["roots"])
    return str(err.value)


def test_paths_inside_comfyui_folders_pass(tree):
    ok = tree["models"] / "loras" / "ok.safetensors"
    assert paths.confine("Loader", "lora", str(ok), tree["roots"]) == str(ok)
    os.symlink(ok, tree["models"] / "loras" / "alias.safetensors")  # a link that stays inside
    assert paths.is_inside(str(tree["models"] / "loras" / "alias.safetensors"), tree["roots"])
    linked_root = tree["outside"].parent / "models_link"  # the models folder itself is a link
    os.symlink(tree["models"], linked_root)
    assert paths.is_inside(str(linked_root / "loras" / "ok.safetensors"), [linked_root])


def test_dotdot_absolute_and_symlink_escapes_are_refused(tree):
    secret = tree["outside"] / "secret.safetensors"
    msg = _refused(tree, tree["models"] / "loras" / ".." / ".." / "outside" / "secret.safetensors")
    assert msg.startswith("Loader: input 'lora': ") and str(secret) in msg and "extra_model_paths.yaml" in msg
    _refused(tree, secret)  # absolute path elsewhere
    _refused(tree, "/etc/passwd")
    os.symlink(secret, tree["models"] / "loras" / "link.safetensors")  # file link leading out
    _refused(tree, tree["models"] / "loras" / "link.safetensors")
    os.symlink(tree["outside"], tree["input"] / "sub")  # a folder link leading out, then a file below it
    _refused(tree, tree["input"] / "sub" / "secret.safetensors")
    # a sibling whose name merely starts with a root's name is not inside it
    sibling = tree["models"].parent / "models_evil"
    sibling.mkdir()
    _refused(tree, sibling)


@pytest.mark.comfyui
@pytest.mark.slow
@needs_server()
def test_symlink_escape_refused_through_real_comfyui(tmp_path):
    from test_comfyui_integration import _api, _node, _ok

    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(REPO, base / "custom_nodes" / PACK)
    make_tiny(base / "models" / "liveavatar" / TINY_NAME)
    make_tiny(tmp_path / "elsewhere" / "ckpt")
    os.symlink(tmp_path / "elsewhere" / "ckpt", base / "models" / "liveavatar" / "escape")
    (base / "input").mkdir()
    shutil.copy(REPO / "assets" / "avatar.png", base / "input" / IMAGE_NAME)
    write_wav(base / "input" / AUDIO_NAME, 0.44, rate=44100, channels=2)
    srv = Server(base)
    try:
        srv.wait_ready()
        client = str(uuid.uuid4())
        prompt = _api("liveavatar_tiny_cpu")
        loader_id, loader = _node(prompt, "LiveAvatarModelLoader")
        # `..` / absolute names (not in the checkpoint list; this ComfyUI queues them anyway): the
        # node refuses them, naming the input
        for name in ("../../etc", "/etc", "../" * 12 + "tmp"):
            bad = json.loads(json.dumps(prompt))
            bad[loader_id]["inputs"]["checkpoint"] = name
            status, body = srv.post("/prompt", {"prompt": bad, "client_id": client})
            if status == 200:
                hist = srv.wait_history(body["prompt_id"])
                err = dict(hist["status"]["messages"])["execution_error"]
                assert err["node_id"] == loader_id and "input 'checkpoint'" in err["exception_message"]
            else:
                assert status == 400 and "checkpoint" in json.dumps(body)
        # a listed folder that is a symlink out of models/: refused by the node, in its error
        loader["inputs"]["checkpoint"] = "escape"
        hist = srv.wait_history(srv.queue(prompt, client))
        assert hist["status"]["status_str"] == "error"
        err = dict(hist["status"]["messages"])["execution_error"]
        assert err["node_id"] == loader_id and "input 'ckpt_dir'" in err["exception_message"]
        assert "outside ComfyUI's model, input and output folders" in err["exception_message"]
        # the server is alive and the next prompt, with the real folder, runs
        loader["inputs"]["checkpoint"] = TINY_NAME
        _ok(srv.wait_history(srv.queue(prompt, client)))
    finally:
        srv.stop()
