"""Errors of worker groups (`parallel.group`) and of the jobs they run (`parallel.jobs`)."""

from __future__ import annotations

from liveavatar.pipeline.memory import OOM_REMEDY


class GroupError(RuntimeError):
    """The worker group cannot run (start failure, worker fault, closed group)."""


class GroupStartError(GroupError):
    """A rank failed to start, rendezvous or load; `rank` and `phase` say which and where."""

    def __init__(self, message: str, rank: int | None = None, phase: str = "",
                 traceback: str = "") -> None:
        super().__init__(message)
        self.rank, self.phase, self.traceback = rank, phase, traceback


class WorkerError(GroupError):
    """A worker failed or died during a job; `traceback` is its last traceback or log tail."""

    def __init__(self, message: str, rank: int, traceback: str = "") -> None:
        super().__init__(message)
        self.rank, self.traceback = rank, traceback


class JobInputError(GroupError):
    """`engine.prepare` refused the job on some rank; the group is still usable."""


def with_remedy(text: str) -> str:
    """A rank's error text, with what to do about it when that is known (out of memory)."""
    if text.startswith(("OutOfMemoryError", "torch.OutOfMemoryError")) or "CUDA out of memory" in text:
        return f"{text} [{OOM_REMEDY}]"
    return text


__all__ = ["GroupError", "GroupStartError", "JobInputError", "OOM_REMEDY", "WorkerError", "with_remedy"]
