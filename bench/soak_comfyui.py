"""Soak: jobs queued back to back through a real headless ComfyUI's /prompt (tiny checkpoint, CPU),
alternating valid and invalid ones, with the server's RSS, open files and child processes sampled
after each job. One JSON line per job (and a summary line) to stdout or --out.

    COMFYUI_DIR=/path/to/ComfyUI python bench/soak_comfyui.py --jobs 50 --out bench/results/soak.jsonl

Cycle of four: valid (a new seed each time, so the sampler runs; the loader stays cached),
invalid at run time (a checkpoint whose DiT shard is truncated: the loader node fails), valid,
invalid at queue time (a size the model cannot take: /prompt answers 400). A valid job passes when
its mp4 has the expected frames; an invalid one when ComfyUI reports the error naming the input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

SHORT_S = 0.44  # 11 frames, 2 blocks


def _sample(pid: int) -> dict:
    import psutil

    p = psutil.Process(pid)
    kids = [c for c in p.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    return {"rss_mb": round(p.memory_info().rss / 2**20, 1), "open_files": p.num_fds(), "children": len(kids)}


def make_base(base: Path) -> None:
    """A ComfyUI base directory: this pack, the tiny checkpoint, a broken copy of it, test media."""
    from test_comfyui_integration import PACK
    from test_nodes_support import AUDIO_NAME, IMAGE_NAME, TINY_NAME, make_tiny, write_wav

    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(REPO, base / "custom_nodes" / PACK)
    tiny = make_tiny(base / "models" / "liveavatar" / TINY_NAME)
    broken = shutil.copytree(tiny, base / "models" / "liveavatar" / "broken")
    shard = next(broken.glob("diffusion_pytorch_model-00001-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (base / "input").mkdir()
    shutil.copy(REPO / "assets" / "avatar.png", base / "input" / IMAGE_NAME)
    write_wav(base / "input" / AUDIO_NAME, SHORT_S, rate=44100, channels=2)


def soak(jobs: int, base: Path, emit) -> list[dict]:
    """Run `jobs` jobs on a fresh server in `base`; `emit(record)` gets each record; returns them."""
    from test_comfyui_integration import Server, _api, _node

    from liveavatar.media.video_writer import probe_video

    make_base(base)
    srv = Server(base)
    records = []
    try:
        srv.wait_ready()
        client = str(uuid.uuid4())
        template = _api("liveavatar_tiny_cpu")
        save_id, _ = _node(template, "SaveVideo")
        want_frames = int(SHORT_S * 25)
        base_sample = _sample(srv.proc.pid)
        emit({"job": 0, "kind": "idle server", "ok": True, **base_sample})
        for i in range(1, jobs + 1):
            kind = ("valid", "invalid_run", "valid", "invalid_queue")[(i - 1) % 4]
            prompt = json.loads(json.dumps(template))
            _node(prompt, "LiveAvatarSampler")[1]["inputs"]["seed"] = 1000 + i
            t0 = time.time()
            rec: dict = {"job": i, "kind": kind}
            if kind == "invalid_queue":
                _node(prompt, "LiveAvatarReferenceImage")[1]["inputs"]["size"] = "700*400"
                status, body = srv.post("/prompt", {"prompt": prompt, "client_id": client})
                rec["ok"] = status == 400 and "'size'" in json.dumps(body)
            else:
                if kind == "invalid_run":
                    _node(prompt, "LiveAvatarModelLoader")[1]["inputs"]["checkpoint"] = "broken"
                hist = srv.wait_history(srv.queue(prompt, client))
                if kind == "valid":
                    item = hist.get("outputs", {}).get(save_id, {}).get("images", [{}])[0]
                    path = base / "output" / item.get("subfolder", "") / item.get("filename", "missing")
                    rec["frames"] = probe_video(path)["frames"] if path.is_file() else 0
                    rec["ok"] = hist["status"]["status_str"] == "success" and rec["frames"] == want_frames
                else:
                    err = dict(hist["status"]["messages"]).get("execution_error", {})
                    rec["ok"] = "truncated" in err.get("exception_message", "")
                    rec["error"] = err.get("exception_message", "")[:200]
            rec["seconds"] = round(time.time() - t0, 2)
            rec.update(_sample(srv.proc.pid))
            records.append(rec)
            emit(rec)
    finally:
        srv.stop()
    return records


def summary(records: list[dict], warmup: int = 4) -> dict:
    after = [r for r in records if r["job"] > warmup]
    first = after[0] if after else records[-1]
    return {"summary": True, "jobs": len(records), "failed": [r["job"] for r in records if not r["ok"]],
            "rss_mb_after_warmup": [first["rss_mb"], records[-1]["rss_mb"]],
            "rss_mb_growth_after_warmup": round(records[-1]["rss_mb"] - first["rss_mb"], 1),
            "open_files_after_warmup": [first["open_files"], records[-1]["open_files"]],
            "children_max": max(r["children"] for r in records)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--out", help="append JSON lines here (default: stdout only)")
    ap.add_argument("--base", help="ComfyUI base directory to create (default: a temp dir)")
    args = ap.parse_args()
    import tempfile

    out = open(args.out, "a") if args.out else None  # noqa: SIM115

    def emit(rec: dict) -> None:
        line = json.dumps({"bench": "soak_comfyui", **rec})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        records = soak(args.jobs, Path(args.base) if args.base else Path(tmp) / "base", emit)
    emit(summary(records))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
