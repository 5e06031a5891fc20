"""Drive the library's block iterator inside a ComfyUI node: progress, previews, interrupt.

One progress unit per denoising step plus one per decode, per block; the bar reaches the UI and
the websocket through `comfy.utils.ProgressBar`, with the last frame of every decoded block as the
node's live preview. After every block the node shows a line of text (block n/N, frames, its DiT
and decode time) and at the end a summary (frames, video duration, blocks, wall time): ComfyUI's
progress-text message (`PromptServer.send_progress_text`), which the frontend draws inside the
node and keeps there after the run. Interrupt (`POST /interrupt`, the UI's cancel button) is
polled between steps through the library's `cancel` callback and re-raised as ComfyUI's
`InterruptProcessingException`, so ComfyUI reports "interrupted" and the server stays up; closing
the iterator stops a worker group's current job.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import comfy.model_management as mm
import comfy.utils

from .convert import preview_image


def _preview_size() -> int:
    try:
        from comfy.cli_args import args

        return int(args.preview_size)
    except Exception:
        return 512


def executing_node_id() -> str | None:
    """Id of the node ComfyUI is executing now (None outside an execution)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    return None if ctx is None else str(ctx.node_id)


def show_text(text: str, node_id: str | None = None) -> None:
    """Draw `text` inside the node in ComfyUI's frontend (progress-text message); no-op without a server."""
    node_id = node_id or executing_node_id()
    module = sys.modules.get("server")  # ComfyUI's server.py, imported by main.py when a server runs
    server = getattr(getattr(module, "PromptServer", None), "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id)


@dataclass
class RunReport:
    """What a generation produced: blocks, video frames, wall seconds, frame rate."""

    blocks: int = 0
    frames: int = 0
    seconds: float = 0.0
    fps: int = 25

    def text(self) -> str:
        per_block = self.seconds / self.blocks if self.blocks else 0.0
        return (f"{self.frames} frames ({self.frames / self.fps:.2f} s at {self.fps} fps), {self.blocks} blocks "
                f"in {self.seconds:.1f} s ({per_block:.2f} s per block)")


class BlockProgress:
    """Maps the library's progress events and decoded blocks onto one ComfyUI progress bar."""

    def __init__(self, steps: int, node_id: str | None = None) -> None:
        self.steps = steps
        self.per_block = steps + 1  # steps + decode
        self.total = self.per_block
        self.pbar = comfy.utils.ProgressBar(self.total, node_id=node_id)
        self.preview_size = _preview_size()
        self.node_id = node_id or executing_node_id()
        self.report = RunReport()
        self.start = time.perf_counter()

    def on_event(self, event: dict) -> None:
        """Library `progress` callback: {"event": "step", "block", "step", "steps", "total_blocks"}."""
        total_blocks = int(event.get("total_blocks") or 1)
        self.total = total_blocks * self.per_block
        if event.get("event") == "step":
            value = int(event.get("block", 0)) * self.per_block + int(event.get("step", 0)) + 1
            self.pbar.update_absolute(min(value, self.total), self.total)

    def on_block(self, block: Any) -> None:
        """A decoded block: advance past its decode unit and show its last frame."""
        self.total = int(block.total_blocks) * self.per_block
        preview = None
        if block.frames.shape[0] > 0:
            preview = ("JPEG", preview_image(block.frames[-1], self.preview_size), self.preview_size)
        self.pbar.update_absolute((int(block.index) + 1) * self.per_block, self.total, preview)
        frames = int(block.frames.shape[0])
        self.report.blocks += 1
        self.report.frames += frames
        self.report.fps = int(getattr(block, "fps", self.report.fps))
        self.report.seconds = time.perf_counter() - self.start
        timings = getattr(block, "timings", None) or {}
        parts = ", ".join(f"{k} {timings[k]:.2f} s" for k in ("dit", "decode") if k in timings)
        show_text(f"block {int(block.index) + 1}/{int(block.total_blocks)}: {frames} frames"
                  + (f" ({parts})" if parts else "") + f"; {self.report.frames} frames in "
                  f"{self.report.seconds:.1f} s", self.node_id)


def run_generation(handle: Any, text: Any, audio: Any, reference: Any, *, seed: int, steps: int,
                   num_clip: int, on_block: Callable[[Any], None], node_id: str | None = None,
                   kv_fp8: bool = False) -> RunReport:
    """Generate every block and hand each to `on_block`; returns what was generated (also shown on the node).

    num_clip 0 means "until the audio ends" (None to the library). kv_fp8: fp8 KV caches (resolved).
    Raises `comfy.model_management.InterruptProcessingException` when the user interrupts.
    """
    progress = BlockProgress(steps, node_id)
    cancel = mm.processing_interrupted
    gen = handle.generate(text, audio, reference, seed=int(seed), steps=int(steps),
                          num_clip=(int(num_clip) or None), progress=progress.on_event, cancel=cancel,
                          kv_fp8=bool(kv_fp8))
    try:
        for block in gen:
            on_block(block)
            progress.on_block(block)
    except Exception as exc:
        if mm.processing_interrupted() or type(exc).__name__ == "GenerationCancelled":
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException() from exc
        raise
    finally:
        close = getattr(gen, "close", None)
        if callable(close):
            close()
    mm.throw_exception_if_processing_interrupted()
    show_text(progress.report.text(), progress.node_id)
    return progress.report


__all__ = ["BlockProgress", "RunReport", "run_generation", "show_text"]
