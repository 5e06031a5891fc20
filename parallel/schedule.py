"""Step-to-rank assignment: which rank runs which denoising steps, and which rank decodes.

Vocabulary (S = denoising steps per block, K = DiT ranks):

- **single**: one rank runs all S steps and decodes (K = 1, world size 1).
- **tpp** (timestep-forcing pipeline parallelism): DiT ranks 0..K-1 own contiguous groups of the
  S steps (each holds only the KV caches of its own steps); a block's latents flow from rank k to
  rank k+1; the decode rank is either its own rank K (VAE only) or the last DiT rank K-1.
- **layers** (sharded): DiT ranks 0..N-1 each hold a contiguous slice of the DiT's layers (and
  the KV caches of those layers only) and run every step for them; a (block, step) pair's tokens
  flow rank k -> k+1, the last slice applies the head and the scheduler step and hands the
  latents back to rank 0 for the next step, with different (block, step) pairs in flight on
  different slices (`parallel.slices`). For models whose whole copy does not fit one device.
- **auto**: picks one of the above for the visible devices and their free memory, and says why
  (layer slices only when no layout of whole-model ranks fits).

The names users pick from are `liveavatar.options.GPU_MODES`.

Pure Python (no torch import): the parent process calls this before any worker exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

log = logging.getLogger(__name__)


class ScheduleError(ValueError):
    """A schedule that cannot run; the message names the field and the fix."""


def split_steps(num_steps: int, num_dit_ranks: int) -> tuple[tuple[int, ...], ...]:
    """Contiguous step groups, as even as possible; earlier ranks take the extra steps.

    The last DiT rank may also decode, so when S is not a multiple of K it gets the lighter load.
    Example: split_steps(4, 3) == ((0, 1), (2,), (3,)).
    """
    if num_steps < 1:
        raise ScheduleError(f"num_steps must be >= 1 (got {num_steps})")
    if not 1 <= num_dit_ranks <= num_steps:
        raise ScheduleError(
            f"num_dit_ranks must be in 1..num_steps={num_steps} (got {num_dit_ranks}): "
            "a DiT rank owns at least one denoising step"
        )
    base, extra = divmod(num_steps, num_dit_ranks)
    groups, start = [], 0
    for k in range(num_dit_ranks):
        n = base + (1 if k < extra else 0)
        groups.append(tuple(range(start, start + n)))
        start += n
    return tuple(groups)


def split_layers(num_layers: int, num_slices: int) -> tuple[range, ...]:
    """Contiguous layer slices, as even as possible; earlier slices take the extra layers (the
    last one also applies the head, and may decode). split_layers(40, 3) == (0..14, 14..27, 27..40)."""
    if not 1 <= num_slices <= num_layers:
        raise ScheduleError(
            f"gpu_mode 'layers': {num_slices} layer slices for a DiT of {num_layers} layers; each rank "
            f"holds at least one layer: use at most {num_layers} ranks (fewer --gpus / devices)")
    base, extra = divmod(num_layers, num_slices)
    out, start = [], 0
    for k in range(num_slices):
        n = base + (1 if k < extra else 0)
        out.append(range(start, start + n))
        start += n
    return tuple(out)


@dataclass(frozen=True)
class Role:
    """What one rank does in a schedule (sent to each worker; `device` is a torch device string)."""

    rank: int
    world_size: int
    steps: tuple[int, ...]  # denoising step indices this rank runs (empty: decode-only rank)
    decodes: bool
    num_dit_ranks: int
    device: str = "cpu"
    num_slices: int = 1  # layer slices of the DiT (1: every DiT rank holds the whole model)

    @property
    def sliced(self) -> bool:
        """This DiT rank holds a layer slice (schedule kind "layers")."""
        return self.is_dit and self.num_slices > 1

    def layers(self, num_layers: int) -> range:
        """The DiT layers this rank holds (all of them unless sliced)."""
        if not self.sliced:
            return range(num_layers)
        return split_layers(num_layers, self.num_slices)[self.rank % self.num_slices]

    @property
    def is_dit(self) -> bool:
        return bool(self.steps)

    @property
    def is_last_dit(self) -> bool:
        return self.rank == self.num_dit_ranks - 1

    @property
    def prev_rank(self) -> int | None:
        """Rank that sends this rank its block latents (None for rank 0)."""
        return None if self.rank == 0 else self.rank - 1

    @property
    def next_rank(self) -> int | None:
        """Rank this rank sends block latents to (None when this rank decodes)."""
        return None if self.decodes else self.rank + 1

    def for_steps(self, num_steps: int) -> "Role":
        """This rank's role for a job of `num_steps` steps on the same ranks (steps re-split).

        A group is started for a topology (K DiT ranks + decode placement); a job may use a
        different step count as long as every DiT rank still owns one step (K <= num_steps).
        """
        if not self.is_dit:
            return self
        if self.num_slices > 1:  # every slice runs every step for its layers
            return Role(self.rank, self.world_size, tuple(range(num_steps)), self.decodes, self.num_dit_ranks,
                        self.device, self.num_slices)
        if self.num_dit_ranks > num_steps:
            raise ScheduleError(
                f"steps: this worker group has {self.num_dit_ranks} DiT ranks, so a job needs at "
                f"least {self.num_dit_ranks} denoising steps (got {num_steps}); use more steps or "
                "a group with fewer ranks")
        steps = split_steps(num_steps, self.num_dit_ranks)[self.rank]
        return Role(self.rank, self.world_size, steps, self.decodes, self.num_dit_ranks, self.device)


@dataclass(frozen=True)
class Schedule:
    """Assignment of S steps to K DiT ranks plus the decode rank; `devices` has one entry per rank.

    `num_slices` > 1 (kind "layers"): one step group (`steps_by_rank` = all steps) run by that many
    DiT ranks, each holding a layer slice. `shared_devices`: several ranks may sit on one GPU
    (memory tests: each rank capped); collectives then use gloo, as the pipeline links always do.
    """

    num_steps: int
    steps_by_rank: tuple[tuple[int, ...], ...]
    separate_decode: bool
    devices: tuple[str, ...]
    reason: str = field(default="", compare=False)
    num_slices: int = 1
    shared_devices: bool = False

    def __post_init__(self) -> None:
        if self.num_slices < 1 or (self.num_slices > 1 and len(self.steps_by_rank) != 1):
            raise ScheduleError(f"num_slices {self.num_slices}: layer slices run one group of all steps "
                                f"(got {len(self.steps_by_rank)} step groups); use gpu_mode 'layers' or 'tpp'")
        flat = [s for g in self.steps_by_rank for s in g]
        if flat != list(range(self.num_steps)) or any(not g for g in self.steps_by_rank):
            raise ScheduleError(
                f"steps_by_rank {self.steps_by_rank} must split steps 0..{self.num_steps - 1} "
                "into non-empty contiguous groups in order"
            )
        if len(self.devices) != self.world_size:
            raise ScheduleError(
                f"devices lists {len(self.devices)} entries for a world of {self.world_size} ranks "
                f"({self.num_dit_ranks} DiT{' + 1 decode' if self.separate_decode else ''})"
            )
        cuda = [d for d in self.devices if d.startswith("cuda")]
        if cuda and len(cuda) != len(self.devices):
            raise ScheduleError(f"devices {self.devices} mix CPU and CUDA; use one kind")
        if cuda and len(set(cuda)) != len(cuda) and not self.shared_devices:
            raise ScheduleError(
                f"devices {self.devices} repeat a GPU: NCCL needs one distinct GPU per rank"
            )

    @property
    def num_dit_ranks(self) -> int:
        return len(self.steps_by_rank) * self.num_slices

    @property
    def world_size(self) -> int:
        return self.num_dit_ranks + (1 if self.separate_decode else 0)

    @property
    def decode_rank(self) -> int:
        return self.num_dit_ranks if self.separate_decode else self.num_dit_ranks - 1

    @property
    def kind(self) -> str:
        return "layers" if self.num_slices > 1 else "single" if self.world_size == 1 else "tpp"

    @property
    def backend(self) -> str:
        """torch.distributed backend for these devices: nccl on GPUs (one per rank), else gloo."""
        return "nccl" if self.devices[0].startswith("cuda") and not self.shared_devices else "gloo"

    def role(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise ScheduleError(f"rank {rank} is outside 0..{self.world_size - 1}")
        steps = self.steps_by_rank[rank // self.num_slices] if rank < self.num_dit_ranks else ()
        return Role(rank, self.world_size, steps, rank == self.decode_rank, self.num_dit_ranks,
                    self.devices[rank], self.num_slices if rank < self.num_dit_ranks else 1)

    def describe(self) -> str:
        if self.num_slices > 1:
            parts = [f"rank {k}: layer slice {k + 1}/{self.num_slices}, all steps"
                     for k in range(self.num_dit_ranks)]
        else:
            parts = [f"rank {k}: steps {list(g)}" for k, g in enumerate(self.steps_by_rank)]
        parts[-1] += " + decode" if not self.separate_decode else ""
        if self.separate_decode:
            parts.append(f"rank {self.decode_rank}: decode")
        return f"{self.kind} on {self.world_size} rank(s) [{'; '.join(parts)}]"


def single(num_steps: int, device: str = "cpu") -> Schedule:
    """One rank runs all steps and decodes."""
    return Schedule(num_steps, split_steps(num_steps, 1), False, (device,), "single rank")


def tpp(num_steps: int, num_dit_ranks: int, separate_decode: bool = False,
        devices: Sequence[str] | None = None) -> Schedule:
    """K DiT ranks with contiguous step groups, plus an optional decode rank.

    `devices` defaults to CPU for every rank (gloo); give "cuda:i" strings for NCCL.
    """
    world = num_dit_ranks + (1 if separate_decode else 0)
    devs = tuple(devices) if devices is not None else ("cpu",) * world
    return Schedule(num_steps, split_steps(num_steps, num_dit_ranks), separate_decode, devs,
                    f"tpp requested: {num_dit_ranks} DiT rank(s)"
                    + (" + decode rank" if separate_decode else ", decode on the last DiT rank"))


def layers(num_steps: int, num_slices: int, separate_decode: bool = False,
           devices: Sequence[str] | None = None, num_layers: int | None = None,
           shared_devices: bool = False) -> Schedule:
    """`num_slices` DiT ranks each holding a layer slice (+ an optional decode rank).

    `num_layers` (the DiT's, when known) is checked here, before any process starts.
    """
    if num_slices < 2:
        raise ScheduleError(f"gpu_mode 'layers' needs at least 2 ranks (got {num_slices}); "
                            "use gpu_mode 'single' for one")
    if num_layers is not None:
        split_layers(num_layers, num_slices)
    world = num_slices + (1 if separate_decode else 0)
    devs = tuple(devices) if devices is not None else ("cpu",) * world
    return Schedule(num_steps, (tuple(range(num_steps)),), separate_decode, devs,
                    f"layers requested: the DiT split over {num_slices} ranks"
                    + (" + decode rank" if separate_decode else ", decode on the last slice"),
                    num_slices=num_slices, shared_devices=shared_devices)


@dataclass(frozen=True)
class DeviceInfo:
    """A visible accelerator: torch device string and its free/total memory in bytes."""

    device: str
    free_bytes: int
    total_bytes: int
    name: str = ""


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes one rank needs: DiT weights (+ text/audio encoders), one step's KV cache, the VAE path.

    `margin_bytes` covers activations and allocator slack on every rank. For layer slices:
    `layer_bytes` is the part of `dit_bytes` that grows with the layers held (their weights and
    audio injectors, the sink cache, the text state) and `num_layers` the DiT's layer count
    (0: slices not estimated, auto never picks them).
    """

    dit_bytes: int
    cache_bytes_per_step: int
    decode_bytes: int
    margin_bytes: int = 2 << 30
    layer_bytes: int = 0
    num_layers: int = 0

    def dit_rank(self, num_steps: int, decodes: bool) -> int:
        return (self.dit_bytes + num_steps * self.cache_bytes_per_step + self.margin_bytes
                + (self.decode_bytes if decodes else 0))

    def slice_rank(self, num_slices: int, index: int, num_steps: int, decodes: bool) -> int:
        """A DiT rank holding layer slice `index` of `num_slices` and the caches of all steps for
        those layers: the layer-proportional bytes scaled by its share of the layers."""
        share = len(split_layers(self.num_layers, num_slices)[index]) / self.num_layers
        scaled = share * (self.layer_bytes + num_steps * self.cache_bytes_per_step)
        return (int(self.dit_bytes - self.layer_bytes + scaled) + self.margin_bytes
                + (self.decode_bytes if decodes else 0))

    def decode_rank(self) -> int:
        return self.decode_bytes + self.margin_bytes


def visible_devices() -> list[DeviceInfo]:
    """CUDA devices visible to this process with their free memory (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(DeviceInfo(f"cuda:{i}", int(free), int(total), torch.cuda.get_device_name(i)))
    return out


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def auto_schedule(num_steps: int, devices: Sequence[DeviceInfo], need: MemoryNeed | None = None,
                  step_cost: float = 1.0, decode_cost: float = 0.73) -> Schedule:
    """Pick the schedule with the best predicted throughput for these devices, and log why.

    Throughput is set by the slowest pipeline stage: a DiT rank costs `len(steps) * step_cost`
    (+ `decode_cost` if it decodes), a decode rank `decode_cost` (units: one DiT step's time).
    decode_cost 0.73: H100, 704*384, fp8 + compile: a DiT step 184 ms, a compiled 12-frame decode
    134 ms; this predicts 870 ms per block on one GPU and 503 ms on two (measured 862-869 / 510).
    Ties go to fewer GPUs, then to decoding on the last DiT rank. Devices are used in the given
    order (rank i on devices[i]); with `need`, a layout whose ranks do not fit the free memory
    of their devices is skipped. No devices -> single rank on CPU.
    """
    if not devices:
        sched = Schedule(num_steps, split_steps(num_steps, 1), False, ("cpu",),
                         "auto: no CUDA device visible -> single rank on CPU")
        log.info(sched.reason)
        return sched
    best: tuple[tuple[float, int, int], int, bool] | None = None
    rejected: list[str] = []
    for k in range(1, min(num_steps, len(devices)) + 1):
        groups = split_steps(num_steps, k)
        for sep in (False, True):
            world = k + int(sep)
            if world > len(devices):
                continue
            if need is not None:
                short = []
                for r in range(world):
                    want = (need.decode_rank() if r == k else
                            need.dit_rank(len(groups[r]), decodes=(not sep and r == k - 1)))
                    if want > devices[r].free_bytes:
                        short.append(f"{devices[r].device} needs {_gb(want)}, "
                                     f"has {_gb(devices[r].free_bytes)} free")
                if short:
                    rejected.append(f"{k} DiT{' + decode' if sep else ''}: {short[0]}")
                    continue
            stage = max(len(g) * step_cost for g in groups)
            last = len(groups[-1]) * step_cost + (0.0 if sep else decode_cost)
            stage = max(stage, last, decode_cost if sep else 0.0)
            key = (stage, world, int(sep))
            if best is None or key < best[0]:
                best = (key, k, sep)
    if best is None and need is not None and need.num_layers:
        sliced = _auto_slices(num_steps, devices, need, step_cost, decode_cost, rejected)
        if sliced is not None:
            return sliced
    if best is None:
        dev = max(devices, key=lambda d: d.free_bytes)
        sched = Schedule(num_steps, split_steps(num_steps, 1), False, (dev.device,),
                         f"auto: no layout fits the free memory ({'; '.join(rejected[:3])}); "
                         f"single rank on {dev.device}, the GPU with the most free memory "
                         "(enable offload or fp8, or free GPU memory)")
        log.warning(sched.reason)
        return sched
    (stage, world, _), k, sep = best
    single_cost = num_steps * step_cost + decode_cost
    reason = (f"auto: {len(devices)} GPU(s) visible, {num_steps} steps -> {k} DiT rank(s)"
              f"{' + 1 decode rank' if sep else ' (decode on the last DiT rank)'}; predicted "
              f"stage time {stage:g} step(s) vs {single_cost:g} on one GPU")
    if rejected:
        reason += f"; skipped for memory: {'; '.join(rejected[:3])}"
    sched = Schedule(num_steps, split_steps(num_steps, k), sep,
                     tuple(d.device for d in devices[:world]), reason)
    log.info("%s: %s", reason, sched.describe())
    return sched


def _auto_slices(num_steps: int, devices: Sequence[DeviceInfo], need: MemoryNeed, step_cost: float,
                 decode_cost: float, rejected: list[str]) -> Schedule | None:
    """The fastest layer-sliced layout whose ranks fit (no whole-model layout did), or None."""
    best: tuple[tuple[float, int, int], int, bool] | None = None
    for k in range(2, min(len(devices), need.num_layers) + 1):
        for sep in (False, True):
            world = k + int(sep)
            if world > len(devices):
                continue
            wants = [need.slice_rank(k, r, num_steps, decodes=not sep and r == k - 1) for r in range(k)]
            wants += [need.decode_rank()] if sep else []
            short = [f"{devices[r].device} needs {_gb(w)}, has {_gb(devices[r].free_bytes)} free"
                     for r, w in enumerate(wants) if w > devices[r].free_bytes]
            if short:
                rejected.append(f"{k} layer slices{' + decode' if sep else ''}: {short[0]}")
                continue
            stage = max(num_steps * step_cost / k + (0.0 if sep else decode_cost), decode_cost if sep else 0.0)
            key = (stage, world, int(sep))
            if best is None or key < best[0]:
                best = (key, k, sep)
    if best is None:
        return None
    (stage, world, _), k, sep = best
    reason = (f"auto: no whole-model layout fits ({'; '.join(rejected[:2])}) -> the DiT split over {k} ranks "
              f"(layer slices{', + 1 decode rank' if sep else ', decode on the last slice'}); predicted stage "
              f"time {stage:g} step(s)")
    sched = Schedule(num_steps, (tuple(range(num_steps)),), sep, tuple(d.device for d in devices[:world]),
                     reason, num_slices=k)
    log.info("%s: %s", reason, sched.describe())
    return sched


def make_schedule(kind: str, num_steps: int, num_ranks: int | None = None,
                  separate_decode: bool = False, devices: Sequence[str] | None = None,
                  device_infos: Sequence[DeviceInfo] | None = None,
                  need: MemoryNeed | None = None, num_layers: int | None = None) -> Schedule:
    """Schedule by name: "single", "tpp" (`num_ranks` DiT ranks, +1 if `separate_decode`), "layers"
    (`num_ranks` layer slices, +1 if `separate_decode`; `num_layers` checked when given), "auto".

    For "auto", `device_infos` defaults to `visible_devices()`.
    """
    if kind == "single":
        return single(num_steps, (devices or ["cpu"])[0])
    if kind == "tpp":
        if num_ranks is None:
            raise ScheduleError("schedule 'tpp' needs num_ranks (the number of DiT ranks)")
        return tpp(num_steps, num_ranks, separate_decode, devices)
    if kind == "layers":
        if num_ranks is None:
            raise ScheduleError("schedule 'layers' needs num_ranks (the number of layer slices)")
        return layers(num_steps, num_ranks, separate_decode, devices, num_layers)
    if kind == "auto":
        infos = visible_devices() if device_infos is None else list(device_infos)
        return auto_schedule(num_steps, infos, need)
    raise ScheduleError(f"unknown schedule {kind!r}; use 'single', 'tpp', 'layers' or 'auto'")


__all__ = [
    "ScheduleError", "split_steps", "split_layers", "Role", "Schedule", "single", "tpp", "layers",
    "DeviceInfo",
    "MemoryNeed", "visible_devices", "auto_schedule", "make_schedule",
]
