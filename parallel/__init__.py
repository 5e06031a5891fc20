"""Worker groups over torch.distributed and the TPP schedule (see `parallel.group` for usage).

Importing this package is cheap: submodules (and torch) load on first attribute access.

- `parallel.schedule`: step-to-rank assignment (single / tpp / layers / auto), pure Python.
- `parallel.slices`: the loop of a layer-sharded DiT rank (schedule kind "layers").
- `parallel.channel`: authenticated loopback control channel.
- `parallel.tpp`: the per-rank runner around an `Engine` (the same loop in-process and in workers).
- `parallel.group`: launch, lifetime, faults and teardown of a group (`WorkerGroup`, `GroupManager`);
  `parallel.jobs`: one job on it (`JobHandle`); `parallel.faults`: their errors;
  `parallel.stall`: when a job with every rank alive counts as stuck (`StallLimit`).
- `parallel.worker`: the worker process (`python -m parallel.worker`).
- `parallel.engine`: Live Avatar (`liveavatar.pipeline`) as a per-rank engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GroupConfig": "parallel.group", "WorkerGroup": "parallel.group", "GroupManager": "parallel.group",
    "GroupError": "parallel.faults", "GroupStartError": "parallel.faults", "WorkerError": "parallel.faults",
    "JobInputError": "parallel.faults", "JobResult": "parallel.jobs", "JobHandle": "parallel.jobs",
    "StallLimit": "parallel.stall",
    "Engine": "parallel.tpp", "JobPlan": "parallel.tpp", "BlockFrames": "parallel.tpp",
    "RankStats": "parallel.tpp", "run_rank": "parallel.tpp", "run_inprocess": "parallel.tpp",
    "Schedule": "parallel.schedule", "Role": "parallel.schedule", "make_schedule": "parallel.schedule",
    "auto_schedule": "parallel.schedule", "MemoryNeed": "parallel.schedule",
    "DeviceInfo": "parallel.schedule",
    "open_worker_group": "parallel.handle", "GroupModel": "parallel.handle",
    "LiveAvatarEngine": "parallel.engine", "make_job": "parallel.engine", "memory_need": "parallel.engine",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("schedule", "channel", "tpp", "group", "jobs", "faults", "worker", "engine", "procs", "handle",
                "slices", "stall"):
        return importlib.import_module(f"parallel.{name}")
    raise AttributeError(f"module 'parallel' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
