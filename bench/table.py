"""Print a short table of bench JSON lines (one per run): `python bench/table.py bench.jsonl`.

`--save bench/results [--command "..."]` also stores the runs as one JSON file named after the
date and the card (`bench/results/2026-11-25_NVIDIA-H100-80GB-HBM3.json`).

Ratios are ours / reference: against the reference run with the same fp8/compile options when
one is in the file, else against the reference bf16 eager run (column `vs`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "y" if v else "n"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, list):
        return "/".join(_fmt(x, digits) for x in v)
    return str(v)


def load(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def table(rows: list[dict]) -> str:
    refs = {(r.get("fp8"), r.get("compile")): r for r in rows if r.get("impl") == "reference" and r.get("fps")}
    base = refs.get((False, False))
    head = ("run", "impl", "scope", "fp8", "comp", "attn", "fps", "block_ms", "step_ms", "peak_GiB", "mfu", "ttff_s",
            "comp_s", "recomp", "ratio", "vs", "psnr", "note")
    out = [head]
    for r in rows:
        ratio, vs = None, "-"
        if r.get("impl") == "ours" and r.get("fps"):
            ref = refs.get((r.get("fp8"), r.get("compile"))) or base
            if ref:
                ratio = r["fps"] / ref["fps"]
                vs = "ref " + ("fp8" if ref.get("fp8") else "bf16") + ("+c" if ref.get("compile") else "")
        psnr = (r.get("vs_saved_latents") or {}).get("psnr_db")
        note = r.get("error") or ("non-finite output" if r.get("output_finite") is False else "")
        out.append((r.get("run", "-"), r.get("impl"), r.get("scope"), _fmt(r.get("fp8")), _fmt(r.get("compile")), r.get("attn"),
                    _fmt(r.get("fps"), 2), _fmt(r.get("block_ms")), _fmt(r.get("step_ms")),
                    _fmt(r.get("peak_mem_gb")), _fmt(r.get("mfu"), 3), _fmt(r.get("ttff_s")),
                    _fmt(r.get("compile_s")), _fmt(r.get("recompiles")), _fmt(ratio, 2), vs, _fmt(psnr),
                    str(note)[:60]))
    widths = [max(len(str(row[i])) for row in out) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in out)


def save(rows: list[dict], folder: str | Path, command: str = "") -> Path:
    import datetime
    import re

    card = re.sub(r"[^A-Za-z0-9.]+", "-", str(rows[0].get("device", "unknown"))).strip("-") if rows else "none"
    day = datetime.date.today().isoformat()
    path = Path(folder) / f"{day}_{card}.json"
    n = 1
    while path.exists():
        n += 1
        path = Path(folder) / f"{day}_{card}_{n}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": day, "device": rows[0].get("device") if rows else None,
                                "command": command, "runs": rows}, indent=1) + "\n")
    return path


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python bench/table.py")
    p.add_argument("jsonl")
    p.add_argument("--save", default=None, help="folder to store the runs in (bench/results)")
    p.add_argument("--command", default="bash bench/run_device.sh", help="recorded with --save")
    args = p.parse_args(argv)
    rows = load(args.jsonl)
    if rows:
        first = rows[0]
        print(f"device: {first.get('device')}  torch {first.get('torch')}  size {first.get('size')}  "
              f"steps {first.get('steps')}  matmul peak {_fmt(first.get('matmul_peak_tflops'))} TFLOP/s")
    print(table(rows))
    if args.save and rows:
        print(f"saved {save(rows, args.save, args.command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
