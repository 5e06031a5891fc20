"""Worker groups: launch, readiness, jobs with streamed frames, cancel, faults, teardown.

    from parallel import GroupConfig, GroupManager, schedule
    cfg = GroupConfig(schedule.tpp(4, 4, separate_decode=True, devices=[f"cuda:{i}" for i in range(5)]),
                      engine="liveavatar.some.module:Factory", engine_config={...})
    manager = GroupManager()                  # keeps one group alive across jobs
    for bf in manager.run(cfg, job, should_cancel=interrupted):   # BlockFrames as blocks finish
        ...

Launch modes:
- "spawn" (default): one `python -m parallel.worker` subprocess per rank on this host, rank i on
  `schedule.devices[i]`; control channel and rendezvous on 127.0.0.1 with free ports.
- "attach": the controller only listens (`listen` host/port) and writes the secret to a 0600
  file; the user starts the ranks with torchrun, on one or more hosts, e.g.
  `torchrun --nproc_per_node=5 -m parallel.worker --connect HOST:PORT --secret-file FILE`
  (`WorkerGroup.attach_command()` prints the exact line). Listening beyond loopback exposes the
  port to the network: only the secret protects it; keep the file private.

Faults: a worker that exits, closes its channel or misses heartbeats for `heartbeat_timeout_s`
ends the current job with `WorkerError` (rank, detail, its last traceback from the log) and the
group is torn down; `GroupManager` starts a fresh one for the next job. So does a job that
yields no block for longer than `GroupConfig.stall` allows (`parallel.stall.StallLimit`: a
multiple of the measured block time, with a floor and a cap, and a generous limit for the first
block, compile included) while every rank is alive: the message names the rank(s) that stopped
making progress first, the measured block time and the limit, and where each rank stands (from
the stacks it dumps).
A job whose inputs fail `engine.prepare` raises `JobInputError` and leaves the group usable.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from parallel.channel import Channel, ChannelClosed, ControlListener
from parallel.faults import GroupError, GroupStartError, WorkerError, with_remedy
from parallel.jobs import JobHandle
from parallel.procs import exit_text, last_traceback, popen, tail
from parallel.schedule import Schedule
from parallel.stall import RankProgress, StallLimit
from parallel.tpp import BlockFrames

log = logging.getLogger(__name__)
PACK_ROOT = Path(__file__).resolve().parents[1]
NCCL_REMEDIES = (
    "try NCCL_P2P_DISABLE=1 (broken GPU peer-to-peer, e.g. PCIe ACS or some VMs), "
    "NCCL_IB_DISABLE=1 (no usable InfiniBand), NCCL_SOCKET_IFNAME=<interface>, "
    "NCCL_DEBUG=INFO for details (pass them in GroupConfig.env); check that no other process "
    "holds the GPUs"
)

GLOO_REMEDIES = ("check GLOO_SOCKET_IFNAME (lo on one host, the NIC that reaches the other hosts "
                 "under torchrun) and that the hosts can reach each other")


@dataclass(frozen=True)
class GroupConfig:
    """Everything that defines a group; a different config means a new group."""

    schedule: Schedule
    engine: str  # "package.module:factory", imported in each worker
    engine_config: Mapping[str, Any] = field(default_factory=dict)
    launch: str = "spawn"  # or "attach" (torchrun)
    listen: tuple[str, int] = ("127.0.0.1", 0)
    pg_timeout_s: float = 600.0  # torch.distributed timeout of every collective / p2p op
    start_timeout_s: float = 120.0  # every rank started and connected (imports included)
    init_timeout_s: float = 60.0  # then: rendezvous + all_reduce smoke test
    load_timeout_s: float = 3600.0
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 15.0
    # a job that yields no block for longer than this allows is stuck (ranks alive, heartbeats
    # fine, e.g. in a GPU kernel or a collective): stacks dumped, job ended with WorkerError,
    # group torn down. A multiple of the measured block time (floor, cap); the first block has
    # its own limit (torch.compile: a few minutes cold for the 14B + VAE).
    stall: StallLimit = StallLimit()
    env: Mapping[str, str] = field(default_factory=dict)  # extra worker env (NCCL_* ...)
    sys_path: tuple[str, ...] = ()  # extra import paths for the engine module
    log_dir: str | None = None  # per-rank logs (default: a fresh temp dir)


_LIVE: "weakref.WeakSet[WorkerGroup]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for g in list(_LIVE):
        g.close(timeout=5.0)


class WorkerGroup:
    """A started group of ranks running one `Schedule`; takes one job at a time."""

    def __init__(self, config: GroupConfig) -> None:
        self.config = config
        self.world_size = config.schedule.world_size
        self.state = "new"
        self.listener: ControlListener | None = None
        self.procs: dict[int, subprocess.Popen] = {}
        self.chans: dict[int, Channel] = {}
        self.info: dict[int, dict] = {}
        self._own_log_dir = config.log_dir is None
        self.log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="liveavatar-group-"))
        self.secret_file: Path | None = None
        self._events: queue.Queue = queue.Queue()
        self._last_hb: dict[int, float] = {}
        self.progress: dict[int, RankProgress] = {}  # what each rank's heartbeat says of its job
        self._reported: set[int] = set()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._job_lock = threading.Lock()
        self._job_ids = itertools.count(1)
        _LIVE.add(self)

    # -- start -----------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.state == "ready"

    @property
    def pids(self) -> dict[int, int]:
        return {r: i.get("pid", 0) for r, i in self.info.items()}

    def log_path(self, rank: int) -> Path:
        return self.log_dir / f"rank{rank}.log"

    def listen(self) -> tuple[str, int]:
        """Open the control channel (called by `start`; call first yourself in attach mode)."""
        if self.listener is None:
            self.listener = ControlListener(*self.config.listen)
            if self.config.launch == "attach":
                self.secret_file = self.log_dir / "control.secret"
                fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(self.listener.secret.hex())
        return self.listener.address

    def attach_command(self, nproc_per_node: int | None = None) -> str:
        """The torchrun line that attaches workers to this group (attach mode)."""
        host, port = self.listen()
        n = nproc_per_node or self.world_size
        return (f"torchrun --nproc_per_node={n} -m parallel.worker --connect {host}:{port} "
                f"--secret-file {self.secret_file}")

    def _spawn(self) -> None:
        host, port = self.listen()
        env = dict(os.environ)
        env.update(self.config.env)
        paths = [str(PACK_ROOT), *self.config.sys_path]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: keep gloo on loopback
        if self.config.schedule.backend == "gloo":  # CPU ranks share the cores
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.world_size)))
        env.setdefault("PYTHONUNBUFFERED", "1")
        for rank in range(self.world_size):
            cmd = [sys.executable, "-m", "parallel.worker", "--connect", f"{host}:{port}",
                   "--rank", str(rank), "--world-size", str(self.world_size),
                   "--parent-pid", str(os.getpid()), "--heartbeat", str(self.config.heartbeat_s)]
            logf = open(self.log_path(rank), "ab")
            proc = popen(cmd, stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT,
                          cwd=str(PACK_ROOT), env=env, close_fds=True)
            logf.close()
            proc.stdin.write(self.listener.secret.hex().encode() + b"\n")
            proc.stdin.close()
            self.procs[rank] = proc

    def _check_devices(self) -> None:
        """Spawn mode: every CUDA device of the schedule must be visible here (before any spawn)."""
        devs = self.config.schedule.devices
        if not devs[0].startswith("cuda"):
            return
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        idx = [int(d.partition(":")[2] or 0) for d in devs]
        if max(idx) >= count:
            self.state = "broken"
            raise GroupStartError(
                f"the schedule puts {len(devs)} ranks on {list(devs)} but {count} CUDA device(s) "
                f"are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
                "; use fewer ranks or schedule 'auto'", None, "topology")

    def _fail_start(self, message: str, rank: int | None = None, phase: str = "",
                    tb: str = "") -> GroupStartError:
        self._teardown(force=True)
        self.state = "broken"
        where = f" (logs: {self.log_dir})"
        return GroupStartError(message + where, rank, phase, tb)

    def _accept_all(self, deadline: float) -> None:
        pending: list[Channel] = []
        while len(self.chans) < self.world_size:
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(self.chans))
                raise self._fail_start(f"ranks {missing} did not connect within "
                                       f"{self.config.start_timeout_s:g} s", missing[0], "connect")
            for rank, proc in self.procs.items():
                if rank not in self.chans and proc.poll() is not None:
                    text = tail(self.log_path(rank))
                    raise self._fail_start(f"rank {rank} exited with code {proc.returncode} before "
                                           f"connecting:\n{last_traceback(text)}", rank, "connect",
                                           text)
            chan = self.listener.accept(timeout=0.2)
            if chan is not None:
                pending.append(chan)
            for chan in list(pending):
                if chan.poll(0):
                    pending.remove(chan)
                    try:
                        msg = chan.recv()
                    except ChannelClosed:
                        continue
                    if msg[0] != "hello" or not 0 <= msg[1] < self.world_size or msg[1] in self.chans:
                        chan.close()
                        continue
                    if msg[3].get("world_size") != self.world_size:
                        raise self._fail_start(f"rank {msg[1]} was started with world size "
                                               f"{msg[3].get('world_size')}, the schedule needs "
                                               f"{self.world_size}", msg[1], "connect")
                    self.chans[msg[1]] = chan
                    self.info[msg[1]] = {"pid": msg[2], **msg[3]}
                    self._last_hb[msg[1]] = time.monotonic()
        self.listener.close()  # nobody else may connect to this group

    def start(self) -> "WorkerGroup":
        """Launch (or wait for) every rank, check topology and interconnect, load the engine."""
        if self.state != "new":
            raise GroupError(f"group already {self.state}")
        self.state = "starting"
        sched = self.config.schedule
        t0 = time.monotonic()
        deadline = t0 + self.config.start_timeout_s
        if self.config.launch == "spawn":
            self._check_devices()
            self._spawn()
        elif self.config.launch != "attach":
            raise GroupError(f"GroupConfig.launch must be 'spawn' or 'attach', not {self.config.launch!r}")
        else:
            log.info("waiting for %d ranks: %s", self.world_size, self.attach_command())
        self._accept_all(deadline)
        deadline = time.monotonic() + self.config.init_timeout_s
        self._reader = threading.Thread(target=self._read_loop, name="group-reader", daemon=True)
        self._reader.start()
        params = {"backend": sched.backend, "pg_timeout_s": self.config.pg_timeout_s,
                  "rendezvous_timeout_s": max(1.0, deadline - time.monotonic()),
                  "store_host": "127.0.0.1", "store_port": None,
                  "num_dit_ranks": sched.num_dit_ranks, "ring": sched.num_slices > 1}
        self.chans[0].send(("init", {**params, "device": sched.devices[0]}))
        ready: dict[int, dict] = {}
        sent_rest = self.world_size == 1 or self.config.launch == "attach"
        if self.config.launch == "attach":
            for r in range(1, self.world_size):
                self.chans[r].send(("init", {**params, "device": sched.devices[r]}))
        while len(ready) < self.world_size:
            msg = self._next_event(deadline)
            if msg is None:
                missing = sorted(set(range(self.world_size)) - set(ready))
                raise self._fail_start(
                    f"ranks {missing} did not finish the rendezvous + all_reduce check within "
                    f"{self.config.init_timeout_s:g} s; the interconnect may be broken: "
                    + (NCCL_REMEDIES if sched.backend == "nccl" else GLOO_REMEDIES),
                    missing[0], "init")
            if msg[0] == "store" and not sent_rest:
                for r in range(1, self.world_size):
                    self.chans[r].send(("init", {**params, "store_port": msg[1],
                                                 "device": sched.devices[r]}))
                sent_rest = True
            elif msg[0] == "ready":
                ready[msg[1]] = msg[2]
                self.info[msg[1]].update(msg[2])
            elif msg[0] in ("error", "lost", "hung"):
                raise self._start_failure(msg, "init")
        uuids = [i.get("uuid") for i in ready.values() if i.get("uuid")]
        if len(set(uuids)) != len(uuids) and not sched.shared_devices:
            raise self._fail_start(f"two ranks share a GPU ({[ready[r].get('uuid') for r in sorted(ready)]}):"
                                   " give each rank its own device", None, "topology")
        log.info("group of %d ready in %.1f s (%s); loading %s", self.world_size,
                 time.monotonic() - t0, sched.describe(), self.config.engine)
        for r in range(self.world_size):
            self.chans[r].send(("load", self.config.engine, dict(self.config.engine_config),
                                sched.role(r), list(self.config.sys_path)))
        loaded: set[int] = set()
        load_deadline = time.monotonic() + self.config.load_timeout_s
        while len(loaded) < self.world_size:
            msg = self._next_event(load_deadline)
            if msg is None:
                raise self._fail_start(f"ranks {sorted(set(range(self.world_size)) - loaded)} did "
                                       f"not load within {self.config.load_timeout_s:g} s", None, "load")
            if msg[0] == "loaded":
                loaded.add(msg[1])
            elif msg[0] in ("error", "lost", "hung"):
                raise self._start_failure(msg, "load")
        self.state = "ready"
        log.info("group loaded in %.1f s", time.monotonic() - t0)
        return self

    def _start_failure(self, msg: tuple, phase: str) -> GroupStartError:
        rank = msg[1]
        if msg[0] == "error":
            _, _, ph, _, text, tb = msg
            if ph == "init":
                text += f" ({NCCL_REMEDIES if self.config.schedule.backend == 'nccl' else GLOO_REMEDIES})"
            return self._fail_start(f"rank {rank} failed to {ph}: {with_remedy(text)}", rank, ph, tb)
        text = tail(self.log_path(rank))
        return self._fail_start(f"rank {rank} {msg[2]} during {phase}:\n{last_traceback(text)}",
                                rank, phase, text)

    # -- events ----------------------------------------------------------------------------
    def _read_loop(self) -> None:
        by_conn = {c.conn: r for r, c in self.chans.items()}
        hb_timeout = self.config.heartbeat_timeout_s
        while not self._stop.is_set():
            try:
                ready = mp_wait(list(by_conn), timeout=0.2)
            except OSError:
                ready = []
            for conn in ready:
                rank = by_conn[conn]
                try:
                    msg = self.chans[rank].recv()
                except ChannelClosed:
                    del by_conn[conn]
                    self._lost(rank, "closed its control channel")
                    continue
                self._last_hb[rank] = time.monotonic()
                if msg[0] != "hb":
                    self._events.put(msg)
                elif len(msg) >= 6:
                    self.progress.setdefault(rank, RankProgress()).update(msg[3], msg[4],
                                                                          self._last_hb[rank] - msg[5])
            now = time.monotonic()
            for rank, proc in self.procs.items():
                if proc.poll() is not None:
                    self._lost(rank, f"exited ({exit_text(proc.returncode)})")
            for rank, t in list(self._last_hb.items()):
                if now - t > hb_timeout and rank not in self._reported:
                    self._dump_stacks(rank)
                    self._reported.add(rank)
                    self._events.put(("hung", rank, f"sent no heartbeat for {now - t:.0f} s"))

    def dump_stacks(self) -> None:
        """Ask every live rank to write the stacks of all its threads to its log; they land
        within a moment."""
        for rank in range(self.world_size):
            self._dump_stacks(rank)

    def _dump_stacks(self, rank: int) -> None:
        """SIGUSR1 to one rank: its faulthandler writes every thread's stack to its log."""
        pid = self.info.get(rank, {}).get("pid")
        if pid and hasattr(signal, "SIGUSR1"):
            try:
                os.kill(pid, signal.SIGUSR1)
            except OSError:
                pass

    def _lost(self, rank: int, detail: str) -> None:
        if rank in self._reported or self._stop.is_set():
            return
        proc = self.procs.get(rank)
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None and proc.returncode is not None and "exited" not in detail:
            detail += f", exited ({exit_text(proc.returncode)})"
        self._reported.add(rank)
        self._events.put(("lost", rank, detail))

    def _next_event(self, deadline: float | None, poll_s: float = 0.1) -> tuple | None:
        while True:
            wait = poll_s if deadline is None else min(poll_s, deadline - time.monotonic())
            if wait <= 0:
                return None
            try:
                return self._events.get(timeout=wait)
            except queue.Empty:
                if deadline is None:
                    return ("tick",)

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, job: Mapping[str, Any]) -> JobHandle:
        """Send a job to every rank; iterate `handle.frames()` for its frames."""
        if self.state != "ready":
            raise GroupError(f"worker group is {self.state}; start a new one (GroupManager does)")
        if not self._job_lock.acquire(blocking=False):
            raise GroupError("this worker group is already running a job")
        job_id = next(self._job_ids)
        try:
            for r in range(self.world_size):
                self.chans[r].send(("job", job_id, dict(job)))
        except ChannelClosed as exc:
            self._job_lock.release()
            self._break()
            raise WorkerError(f"could not send the job: {exc}", -1) from exc
        return JobHandle(self, job_id)

    def run(self, job: Mapping[str, Any], should_cancel: Callable[[], bool] | None = None
            ) -> Iterator[BlockFrames]:
        """`submit(job)` and yield its frames; returns the JobResult (StopIteration.value)."""
        handle = self.submit(job)
        yield from handle.frames(should_cancel)
        return handle.result

    def _break(self) -> None:
        self.state = "broken"
        self._teardown(force=True)

    # -- teardown --------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Ask every rank to shut down; kill what is still alive after `timeout` s."""
        if self.state == "closed":
            return
        graceful = self.state == "ready"
        self.state = "closed"
        self._teardown(force=not graceful, timeout=timeout)
        if graceful and self._own_log_dir:  # logs of a failed group stay for the error message
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def _teardown(self, force: bool, timeout: float = 10.0) -> None:
        self._stop.set()
        if not force:
            for chan in self.chans.values():
                try:
                    chan.send(("shutdown",))
                except ChannelClosed:
                    pass
        deadline = time.monotonic() + (0.0 if force else timeout)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
                log.error("worker pid %d did not exit after SIGKILL", proc.pid)
        for chan in self.chans.values():
            chan.close()
        if self.listener is not None:
            self.listener.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2.0)
        _LIVE.discard(self)

    def __enter__(self) -> "WorkerGroup":
        return self if self.state != "new" else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class GroupManager:
    """Keeps one group alive across jobs; a new config (or a broken group) starts a fresh one."""

    def __init__(self) -> None:
        self.group: WorkerGroup | None = None
        self._lock = threading.Lock()

    def get(self, config: GroupConfig) -> WorkerGroup:
        with self._lock:
            g = self.group
            if g is not None and g.config == config and g.healthy:
                return g
            if g is not None:
                log.info("closing the worker group (%s)",
                         "config changed" if g.config != config else f"group {g.state}")
                g.close()
                self.group = None
            self.group = WorkerGroup(config).start()
            return self.group

    def run(self, config: GroupConfig, job: Mapping[str, Any],
            should_cancel: Callable[[], bool] | None = None) -> Iterator[BlockFrames]:
        """Run `job` on the group for `config` (starting it if needed) and yield its frames."""
        handle = self.get(config).submit(job)
        yield from handle.frames(should_cancel)
        return handle.result

    def close(self) -> None:
        with self._lock:
            if self.group is not None:
                self.group.close()
                self.group = None
