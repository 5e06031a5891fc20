"""Worker process: `python -m parallel.worker` (one per rank), driven over the control channel.

Two ways to start it:

- spawned by `parallel.group.WorkerGroup` (default): `--connect HOST:PORT --rank R --world-size N
  --parent-pid PID`; the secret arrives as one hex line on stdin (never on the command line).
- under torchrun (`WorkerGroup(..., launch="attach")`): `torchrun --nproc_per_node=N -m
  parallel.worker --connect HOST:PORT --secret-file FILE`; rank and world size come from torchrun's
  environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), the process group is
  initialised with `env://`, and a GPU rank uses `cuda:LOCAL_RANK` (so several hosts work).

Lifetime: the worker exits when the controlling process dies (PR_SET_PDEATHSIG on Linux, a
watchdog on the parent pid, and end-of-file on the control channel), on a `shutdown` message,
or when killed. Between jobs it waits on the control channel, never inside a collective.

Messages in: ("init", params), ("load", engine_spec, engine_config, role, sys_path),
("job", job_id, job), ("cancel", job_id), ("shutdown",).
Messages out: ("hello", rank, pid, info), ("store", port), ("ready", rank, info),
("loaded", rank, seconds), ("frames", job_id, clip, block, frames),
("done", job_id, rank, complete, stats), ("error", rank, phase, job_id, message, traceback),
("hb", rank, time, job_id, blocks, age) (the current or last job, the blocks this rank finished of
it and the seconds since the last one: the controller names the ranks that stopped first when a
job stalls, `parallel.stall`).
"""

from __future__ import annotations

import argparse
import dataclasses
import ctypes
import faulthandler
import importlib
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

from parallel.channel import Channel, ChannelClosed, connect

log = logging.getLogger("parallel.worker")

PR_SET_PDEATHSIG = 1
SECRET_ENV = "LIVEAVATAR_CONTROL_SECRET"


def arm_parent_death(parent_pid: int | None) -> None:
    """Exit when the parent dies: kernel signal (Linux) plus a polling watchdog on the pid."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    if not parent_pid:
        return
    if os.getppid() != parent_pid:  # parent died before prctl took effect
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def load_engine(spec: str) -> Any:
    """Instantiate an engine from "package.module:factory" (factory() -> engine)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"engine spec {spec!r} must look like 'package.module:Factory'")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory()


def _to_host(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    return obj


class Worker:
    """One rank's state and main loop."""

    def __init__(self, chan: Channel, rank: int, world_size: int, torchrun: bool,
                 heartbeat_s: float = 1.0) -> None:
        self.chan, self.rank, self.world_size, self.torchrun = chan, rank, world_size, torchrun
        self.heartbeat_s = heartbeat_s
        self.inbox: queue.Queue = queue.Queue()
        self.cancel_id: int | None = None
        self.current_job: int | None = None
        self.stats: Any = None  # RankStats of the current job (its `blocks` go out with each heartbeat)
        self.shutting_down = False
        self.engine: Any = None
        self.role: Any = None
        self.device: Any = None
        self.link_groups: Any = None
        self.coll_device: Any = None  # where collective tensors live (the GPU under nccl, else the CPU)

    # -- threads ---------------------------------------------------------------------------
    def _reader(self) -> None:
        while True:
            try:
                msg = self.chan.recv()
            except ChannelClosed:
                log.warning("control channel closed: the controlling process is gone; exiting")
                os._exit(0)
            if msg[0] == "cancel":
                self.cancel_id = msg[1]
            elif msg[0] == "heartbeat":
                self.heartbeat_s = float(msg[1])
            else:
                if msg[0] == "shutdown":
                    self.shutting_down = True
                self.inbox.put(msg)

    def _heartbeat(self) -> None:
        while True:
            try:
                stats = self.stats
                self.chan.send(("hb", self.rank, time.time(), self.current_job,
                                *((stats.blocks, time.monotonic() - stats.last_block_at) if stats else (0, 0.0))))
            except ChannelClosed:
                os._exit(0)
            time.sleep(self.heartbeat_s)

    # -- phases ----------------------------------------------------------------------------
    def _error(self, phase: str, job_id: int | None, exc: BaseException) -> None:
        tb = traceback.format_exc()
        log.error("%s failed: %s\n%s", phase, exc, tb)
        self.chan.send(("error", self.rank, phase, job_id, f"{type(exc).__name__}: {exc}", tb))

    def _init(self, params: dict) -> None:
        import torch
        import torch.distributed as dist

        device = torch.device(params["device"])
        if self.torchrun and device.type == "cuda" and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per local rank
        info: dict[str, Any] = {"device": str(device), "host": socket.gethostname(), "pid": os.getpid()}
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0 or (device.index or 0) >= count:
                raise RuntimeError(
                    f"rank {self.rank}: {device} requested but {count} CUDA device(s) are visible "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                    "give one visible GPU per rank or fewer ranks"
                )
            torch.cuda.set_device(device)
            prop = torch.cuda.get_device_properties(device)
            info.update(name=prop.name, uuid=str(getattr(prop, "uuid", device.index)),
                        total_gb=round(prop.total_memory / 2**30, 1))
        self.device = device
        backend = params["backend"]
        timeout = timedelta(seconds=float(params["pg_timeout_s"]))
        rendezvous = timedelta(seconds=float(params["rendezvous_timeout_s"]))
        # nccl binds a GPU; gloo (CPU ranks, or several ranks sharing one GPU) talks through the host
        extra = {"device_id": device} if backend == "nccl" else {}
        self.coll_device = device if backend == "nccl" else torch.device("cpu")
        if self.torchrun:
            dist.init_process_group(backend, init_method="env://", timeout=timeout, **extra)
        else:
            host = params["store_host"]
            if self.rank == 0:
                store = dist.TCPStore(host, 0, self.world_size, is_master=True,
                                      timeout=rendezvous, wait_for_workers=False)
                self.chan.send(("store", store.port))
            else:
                store = dist.TCPStore(host, int(params["store_port"]), self.world_size,
                                      is_master=False, timeout=rendezvous)
            dist.init_process_group(backend, store=store, rank=self.rank,
                                    world_size=self.world_size, timeout=timeout, **extra)
        t0 = time.perf_counter()
        probe = torch.full((1,), float(self.rank + 1), device=self.coll_device)
        dist.all_reduce(probe)
        got, want = float(probe.item()), self.world_size * (self.world_size + 1) / 2
        if got != want:
            raise RuntimeError(f"rank {self.rank}: all_reduce smoke test gave {got}, expected {want}")
        info["smoke_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        from parallel.tpp import make_link_groups

        self.link_groups = make_link_groups(self.world_size, int(params["num_dit_ranks"]), rank=self.rank,
                                            ring=bool(params.get("ring")))
        self.chan.send(("ready", self.rank, info))

    def _load(self, spec: str, config: dict, role: Any, sys_path: list[str]) -> None:
        for p in reversed(sys_path):
            if p not in sys.path:
                sys.path.insert(0, p)
        t0 = time.perf_counter()
        self.role = dataclasses.replace(role, device=str(self.device))  # the device actually used
        self.engine = load_engine(spec)
        self.engine.load(config, role)
        self.chan.send(("loaded", self.rank, time.perf_counter() - t0))

    def _agree(self, ok: bool) -> bool:
        """All ranks prepared the job? (one tiny all_reduce; False if any rank failed)."""
        if self.world_size == 1:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.coll_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _job(self, job_id: int, job: dict) -> None:
        import torch

        from parallel.slices import run_any
        from parallel.tpp import Links, RankStats

        self.current_job, self.stats = job_id, None
        engine = self.engine
        plan = None
        try:
            plan = engine.prepare(job)
        except Exception as exc:  # noqa: BLE001 - reported to the controller
            self._error("prepare", job_id, exc)
        if not self._agree(plan is not None):
            try:
                engine.end_job()
            finally:
                self.chan.send(("done", job_id, self.rank, False, {"prepare_failed": True}))
            return
        stats = self.stats = RankStats(self.rank)
        links = (Links(plan, torch.device("cpu"), stats, self.rank, self.link_groups)  # gloo links
                 if self.world_size > 1 else None)

        def cancelled() -> bool:
            return self.cancel_id == job_id or self.shutting_down

        try:
            for bf in run_any(engine, self.role, plan, cancelled, stats, links):
                self.chan.send(("frames", job_id, bf.clip, bf.block, _to_host(bf.frames)))
        finally:
            engine.end_job()
        complete = stats.blocks == plan.num_blocks
        if torch.device(self.device).type == "cuda":  # since the process started: weights included
            stats.extra["peak_mem_gib"] = torch.cuda.max_memory_allocated(torch.device(self.device)) / 2**30
        self.chan.send(("done", job_id, self.rank, complete, stats.as_dict()))

    def serve(self) -> None:
        threading.Thread(target=self._reader, name="control-reader", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        while True:
            msg = self.inbox.get()
            kind = msg[0]
            if kind == "shutdown":
                self._shutdown()
                return
            try:
                if kind == "init":
                    self._init(msg[1])
                elif kind == "load":
                    self._load(*msg[1:])
                elif kind == "job":
                    self._job(msg[1], msg[2])
                else:
                    log.warning("ignoring unknown control message %r", kind)
            except ChannelClosed:
                os._exit(0)
            except Exception as exc:  # noqa: BLE001 - reported to the controller
                phase = {"init": "init", "load": "load", "job": "run"}.get(kind, kind)
                self._error(phase, msg[1] if kind == "job" else None, exc)

    def _shutdown(self) -> None:
        threading.Timer(10.0, lambda: os._exit(0)).start()  # never hang on teardown
        try:
            if self.engine is not None:
                self.engine.unload()
        except Exception:  # noqa: BLE001
            log.exception("engine unload failed")
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            log.exception("destroy_process_group failed")
        log.info("shut down")
        os._exit(0)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m parallel.worker", description=__doc__.split("\n")[0])
    ap.add_argument("--connect", required=True, help="HOST:PORT of the controller's control channel")
    ap.add_argument("--rank", type=int, help="this rank (spawn mode; torchrun sets RANK)")
    ap.add_argument("--world-size", type=int, help="number of ranks (spawn mode)")
    ap.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    ap.add_argument("--secret-file", help="file holding the hex secret (torchrun mode)")
    ap.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torchrun = args.rank is None
    rank = int(os.environ["RANK"]) if torchrun else args.rank
    world = int(os.environ["WORLD_SIZE"]) if torchrun else args.world_size
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s")
    faulthandler.enable()
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    arm_parent_death(args.parent_pid)
    if args.secret_file:
        with open(args.secret_file) as f:
            secret_hex = f.read().strip()
    elif torchrun:
        secret_hex = os.environ.get(SECRET_ENV, "")
    else:
        secret_hex = sys.stdin.readline().strip()
    if not secret_hex:
        log.error("no control-channel secret (stdin, --secret-file or %s)", SECRET_ENV)
        return 2
    import torch  # noqa: F401,PLC0415  (before "hello": the rendezvous then never waits on imports)

    host, _, port = args.connect.rpartition(":")
    chan = connect((host, int(port)), bytes.fromhex(secret_hex), timeout=60.0)
    chan.send(("hello", rank, os.getpid(), {"world_size": world, "host": socket.gethostname(),
                                             "local_rank": os.environ.get("LOCAL_RANK")}))
    Worker(chan, rank, world, torchrun, args.heartbeat).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
