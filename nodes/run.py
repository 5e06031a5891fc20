"""Drive the library's block iterator inside a ComfyUI node: progress, previews, interrupt.

One progress unit per denoising step plus one per decode, per block; the bar reaches the UI and
the websocket through `comfy.utils.ProgressBar`, with the last frame of every decoded block as the
node's live preview. Interrupt (`POST /interrupt`, the UI's cancel button) is polled between
steps through the library's `cancel` callback and re-raised as ComfyUI's
`InterruptProcessingException`, so ComfyUI reports "interrupted" and the server stays up; closing
the iterator stops a worker group's current job.
"""

from __future__ import annotations

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


class BlockProgress:
    """Maps the library's progress events and decoded blocks onto one ComfyUI progress bar."""

    def __init__(self, steps: int, node_id: str | None = None) -> None:
        self.steps = steps
        self.per_block = steps + 1  # steps + decode
        self.total = self.per_block
        self.pbar = comfy.utils.ProgressBar(self.total, node_id=node_id)
        self.preview_size = _preview_size()

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


def run_generation(handle: Any, text: Any, audio: Any, reference: Any, *, seed: int, steps: int,
                   num_clip: int, on_block: Callable[[Any], None], node_id: str | None = None) -> int:
    """Generate every block and hand each to `on_block`; returns the number of blocks.

    num_clip 0 means "until the audio ends" (None to the library).
    Raises `comfy.model_management.InterruptProcessingException` when the user interrupts.
    """
    progress = BlockProgress(steps, node_id)
    cancel = mm.processing_interrupted
    gen = handle.generate(text, audio, reference, seed=int(seed), steps=int(steps),
                          num_clip=(int(num_clip) or None), progress=progress.on_event, cancel=cancel)
    count = 0
    try:
        for block in gen:
            on_block(block)
            progress.on_block(block)
            count += 1
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
    return count


__all__ = ["BlockProgress", "run_generation"]
