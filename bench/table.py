"""Print a short table of bench JSON lines (one per run): `python bench/table.py bench.jsonl`.

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
    head = ("impl", "scope", "fp8", "comp", "attn", "fps", "block_ms", "step_ms", "peak_GiB", "mfu", "ttff_s",
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
        out.append((r.get("impl"), r.get("scope"), _fmt(r.get("fp8")), _fmt(r.get("compile")), r.get("attn"),
                    _fmt(r.get("fps"), 2), _fmt(r.get("block_ms")), _fmt(r.get("step_ms")),
                    _fmt(r.get("peak_mem_gb")), _fmt(r.get("mfu"), 3), _fmt(r.get("ttff_s")),
                    _fmt(r.get("compile_s")), _fmt(r.get("recompiles")), _fmt(ratio, 2), vs, _fmt(psnr),
                    str(note)[:60]))
    widths = [max(len(str(row[i])) for row in out) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in out)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python bench/table.py FILE.jsonl", file=sys.stderr)
        return 2
    rows = load(argv[0])
    if rows:
        first = rows[0]
        print(f"device: {first.get('device')}  torch {first.get('torch')}  size {first.get('size')}  "
              f"steps {first.get('steps')}  matmul peak {_fmt(first.get('matmul_peak_tflops'))} TFLOP/s")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
