"""Torch ops per block of the long run's tiny checkpoint (64*64), counted on the CPU (issue 18).

    python -m bench.ops_per_block [--blocks 6] [--skip 5]

At 64*64 a GPU block is launch-bound: its time is about (ops launched) x (per-op CPU cost), so
the op count is the CPU-measurable proxy of the GPU rate. Every aten op dispatched in the
steady-state blocks (after `--skip`) is counted (TorchDispatchMode), split into: `dit_body` (the
DiT call body that `CausalS2VDiT.use_cuda_graphs` replays as one graph per step on CUDA),
`vae_decoder` (the decoder calls that `WanVAE.use_cuda_graphs` replays as one graph per latent
frame once steady) and `outside` (what stays eager on CUDA with graphs: RoPE factors, audio
encoder, Euler updates, frame conversion, ...). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path


def count(blocks: int, skip: int, work: Path) -> dict:
    import torch
    from PIL import Image
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench.long_run import _prepare
    from liveavatar.media.audio import open_audio
    from liveavatar.pipeline.model import LiveAvatar

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.where, self.by_part, self.by_op = "outside", collections.Counter(), collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.by_part[self.where] += 1
            self.by_op[str(func)] += 1
            return func(*args, **(kwargs or {}))

    mode = Count()

    def tagged(fn, part):
        def call(*a, **k):
            old, mode.where = mode.where, part
            try:
                return fn(*a, **k)
            finally:
                mode.where = old
        return call

    ckpt, image_path, wav, _ = _prepare(work, 1.0)
    model = LiveAvatar.from_checkpoint(ckpt, device=torch.device("cpu"), dtype="fp32")
    model.dit._block_body = tagged(model.dit._block_body, "dit_body")
    model.vae.model.decoder.forward = tagged(model.vae.model.decoder.forward, "vae_decoder")
    img = model.prepare_image(Image.open(image_path).convert("RGB"), "64*64", "exact")
    audio = open_audio(wav)
    gen = model.generate(model.encode_prompt("a person talking"), model.encode_audio(audio), img, seed=0)
    for blk in gen:
        if blk.index == skip:
            mode.__enter__()
        if blk.index == skip + blocks:
            mode.__exit__(None, None, None)
            gen.close()
            break
    per = {k: round(v / blocks, 1) for k, v in mode.by_part.items()}
    return {"bench": "ops_per_block", "size": "64*64", "blocks": blocks, "skip": skip,
            "ops_per_block": round(sum(mode.by_part.values()) / blocks, 1), "by_part": per,
            "top_ops": {k: round(v / blocks, 1) for k, v in mode.by_op.most_common(12)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ops_per_block", description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=6, help="steady blocks counted (default 6)")
    p.add_argument("--skip", type=int, default=5, help="blocks run before counting (default 5)")
    p.add_argument("--work", default="/tmp/liveavatar_ops_per_block", help="folder of the tiny checkpoint and audio")
    args = p.parse_args(argv)
    print(json.dumps(count(args.blocks, args.skip, Path(args.work))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
