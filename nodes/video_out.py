"""What the Sampler hands ComfyUI: a file-backed VIDEO always, IMAGE frames only on request.

- VIDEO: every decoded block is streamed into a fragmented mp4 (H.264 + AAC, `VideoWriter`) in
  ComfyUI's temp folder (`temp/LiveAvatar/`); the output is ComfyUI's `VideoFromFile` on that path,
  which Save Video remuxes packet by packet (format/codec `auto` or `mp4`/`h264`: no decode), so no
  frame of the video is ever held in RAM. The file is playable while it grows (ffplay, VLC).
- IMAGE (+ the AUDIO of exactly those frames): float32 `[N, H, W, 3]`, 12 bytes per pixel, for
  Create Video or image nodes on short clips. Collected only when `keep_frames` is on, decided once
  before the run (`plan_frames`) from the exact frame count (`make_plan`) and the output size:
  - off: nothing is collected; the IMAGE / AUDIO outputs carry an `ExecutionBlocker` whose message
    names the fix, and a graph that connects them is refused before any generation;
  - on, estimate within `ram_limit_gb`: collected;
  - on, estimate over `ram_limit_gb`: refused before any generation when the IMAGE / AUDIO outputs
    are connected (they would need that RAM), else a warning (log + node text, with the estimate)
    and nothing is collected.
ComfyUI does not tell a node which outputs are used; the API prompt (hidden input PROMPT) does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from .convert import ImageBuffer
from .errors import LiveAvatarInputError


GB = 1e9
COLLECT_BYTES_PER_PIXEL = 12  # float32 RGB IMAGE, filled in place (convert.ImageBuffer)
SAMPLE_BYTES = 4  # float32 mono AUDIO
FRAME_OUTPUTS = (0, 1)  # the Sampler's output slots fed from RAM: frames (IMAGE), audio (AUDIO)


def collect_bytes(frames: int, width: int, height: int, samples: int) -> int:
    """Host RAM the IMAGE + AUDIO outputs need at their peak, in bytes (see COLLECT_BYTES_PER_PIXEL)."""
    return frames * width * height * COLLECT_BYTES_PER_PIXEL + samples * SAMPLE_BYTES


def linked_outputs(prompt: Any, node_id: Any) -> set[int]:
    """Output slots of node `node_id` that a node of the API prompt takes as an input (`[id, slot]`)."""
    if not isinstance(prompt, dict) or node_id is None:
        return set()
    used = set()
    for node in prompt.values():
        for value in (node.get("inputs") or {}).values() if isinstance(node, dict) else ():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id):
                used.add(int(value[1]))
    return used


@dataclass(frozen=True)
class FramePlan:
    """The decision on IMAGE frames for one run, with its numbers (bytes) and the texts to show."""

    keep: bool
    frames: int
    estimate: int  # bytes the IMAGE + AUDIO outputs would need
    limit: int  # bytes (ram_limit_gb)
    warning: str = ""  # shown on the node and logged ('' = none)
    blocked: str = ""  # message of the outputs' ExecutionBlocker when not kept

    def summary(self) -> str:
        return f"{self.frames} frames as IMAGE: about {self.estimate / GB:.2f} GB of RAM"


def plan_frames(node: str, keep_frames: bool, ram_limit_gb: float, frames: int, width: int, height: int,
                samples: int, linked: set[int]) -> FramePlan:
    """Decide whether IMAGE frames are collected (see the module docstring); raises
    `LiveAvatarInputError` when connected outputs could not be fed."""
    if not math.isfinite(float(ram_limit_gb)) or float(ram_limit_gb) < 0:
        raise LiveAvatarInputError(node, "ram_limit_gb", f"must be a finite number of GB >= 0, got {ram_limit_gb}")
    estimate = collect_bytes(frames, width, height, samples)
    limit = int(float(ram_limit_gb) * GB)
    need = f"{frames} frames at {width}x{height} need about {estimate / GB:.2f} GB of RAM as IMAGE"
    connected = bool(linked & set(FRAME_OUTPUTS))
    if not keep_frames:
        fix = "turn keep_frames on (short clips), or use the video output (Save Video)"
        if connected:
            raise LiveAvatarInputError(node, "keep_frames", f"the frames/audio outputs are connected but "
                                       f"keep_frames is off; {fix} ({need})")
        return FramePlan(False, frames, estimate, limit, blocked=f"{node}: frames were not kept; {fix}")
    if estimate <= limit:
        return FramePlan(True, frames, estimate, limit)
    over = f"{need}, over ram_limit_gb = {float(ram_limit_gb):g}"
    fix = "use the video output (Save Video), which streams from disk, or raise ram_limit_gb"
    if connected:
        raise LiveAvatarInputError(node, "ram_limit_gb", f"{over}; {fix}")
    warning = f"warning: frames not kept: {over} ({fix})"
    return FramePlan(False, frames, estimate, limit, warning=warning, blocked=f"{node}: {warning}")


class FrameCollector:
    """Fills an `ImageBuffer` with each decoded block (uint8 frames `[n, H, W, 3]`, mono samples `[m]`)
    when the plan says so; `outputs()` -> (IMAGE or blocker, AUDIO or blocker)."""

    def __init__(self, plan: FramePlan, width: int, height: int, samples: int, sample_rate: int) -> None:
        self.plan = plan
        self.buffer = ImageBuffer(plan.frames, height, width, samples, sample_rate) if plan.keep else None

    def add(self, block: Any) -> None:
        if self.buffer is not None:
            self.buffer.add(block.frames, block.audio)

    def outputs(self) -> tuple[Any, Any]:
        if self.buffer is None:
            from comfy_execution.graph_utils import ExecutionBlocker

            blocker = ExecutionBlocker(self.plan.blocked)
            return blocker, blocker
        return self.buffer.image(), self.buffer.audio()


def temp_video_path(prefix: str, width: int, height: int) -> str:
    """A new mp4 path under ComfyUI's temp folder (`temp/<prefix>_NNNNN_.mp4`)."""
    import folder_paths

    folder, name, counter, _, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_temp_directory(), width, height)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}_{counter:05}_.mp4")


__all__ = ["FrameCollector", "FramePlan", "collect_bytes", "linked_outputs", "plan_frames", "temp_video_path"]
