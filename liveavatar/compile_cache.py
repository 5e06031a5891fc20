"""Where torch.compile keeps what it compiled, so that a new process starts warm.

A cold start compiles every region of the DiT and the VAE decoder (tens of seconds on an H200). Two
caches make the next process start warm:

- inductor's and AOTAutograd's on-disk caches (generated kernels, compiled graphs): always on in
  PyTorch; they live in `TORCHINDUCTOR_CACHE_DIR` (PyTorch's default: `/tmp/torchinductor_<user>`,
  which a reboot empties). `use_cache_dir` points them at a lasting folder.
- dynamo's precompile cache (`torch._dynamo.config.caching_precompile`, opt-in with
  `LIVEAVATAR_PRECOMPILE=1`): the traced graphs and guards of the full-graph regions made by
  `compiled_region` (the DiT's fused layer regions, the VAE decoder's frame steps), so a warm
  start skips their tracing too. PyTorch writes it only when asked
  (`torch.compiler.save_cache_artifacts()`): `save_compiled` does that once per process, after
  the second decoded block.

Which folder: `LIVEAVATAR_COMPILE_CACHE` if set, else an already set `TORCHINDUCTOR_CACHE_DIR`,
else `~/.cache/liveavatar/torch-compile` (`$XDG_CACHE_HOME` honoured). The folder holds pickled
compiler artifacts that PyTorch itself loads: it must be private to the user (created 0700); never
point it at files from someone else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("liveavatar")

ENV_DIR = "LIVEAVATAR_COMPILE_CACHE"
ENV_PRECOMPILE = "LIVEAVATAR_PRECOMPILE"  # "1" turns dynamo's precompile cache on
_state = {"dir": None, "saved": False, "precompile": False}
_scope = {"depth": 0, "prior": False}  # precompile_scope's nesting over all threads
_scope_lock = threading.Lock()


def default_cache_dir() -> Path:
    """The folder `use_cache_dir()` picks (see the module docstring)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "liveavatar" / "torch-compile"


def use_cache_dir(path: Path | None = None, precompile: bool | None = None) -> Path:
    """Point torch.compile's caches at `path` (default `default_cache_dir()`) for this process and
    choose whether the DiT's regions use dynamo's precompile cache (`precompile`, default: on when
    `LIVEAVATAR_PRECOMPILE=1`). Call before the first compile; a later call without arguments
    keeps the first choice. Returns the folder."""
    if path is None and precompile is None and _state["dir"] is not None:
        return _state["dir"]  # the edge chose already
    path = Path(path).expanduser() if path is not None else default_cache_dir()
    if precompile is None:
        precompile = os.environ.get(ENV_PRECOMPILE, "0") == "1"
    if _state["dir"] == path and _state["precompile"] == precompile:
        return path
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by inductor at each cache access
    if precompile:
        import torch._dynamo.package as dynamo_package

        # the dynamo cache object takes its folder when torch._dynamo.package is imported: re-point it
        dynamo_package.DynamoCache = dynamo_package.DiskDynamoCache(str(path / "dynamo"))
        _fresh_global_names()
    _state.update(dir=path, precompile=bool(precompile), saved=False)
    log.info("torch.compile caches in %s (precompile %s)", path, "on" if precompile else "off")
    return path


def _fresh_global_names() -> None:
    """Start dynamo's counter of installed-global names (`__builtins_dict___<n>`, ...) at a random
    offset. A region loaded from the precompile cache puts the names of the process that traced it
    into its module's globals; dynamo numbers new ones from 0 in each process, so in PyTorch 2.11
    the first trace after a load (a frame size not in the cache) would reuse a loaded name and fail
    (`assert name not in scope`)."""
    import itertools
    import secrets

    import torch._dynamo.bytecode_transformation as bt

    if hasattr(bt, "_unique_id_counter"):
        bt._unique_id_counter = itertools.count(secrets.randbelow(1 << 40) * 1000)


def _precompile_mode():
    """`caching_precompile=True` for dynamo while any thread is inside (a count under a lock: the
    overlapped decode calls VAE regions while the DiT thread calls its own)."""
    import torch._dynamo.config as dynamo_config

    with _scope_lock:
        if _scope["depth"] == 0:
            _scope["prior"] = dynamo_config.caching_precompile
            dynamo_config.caching_precompile = True
        _scope["depth"] += 1
    try:
        yield
    finally:
        with _scope_lock:
            _scope["depth"] -= 1
            if _scope["depth"] == 0:
                dynamo_config.caching_precompile = _scope["prior"]


def recording() -> bool:
    """True while the precompiled regions still have to be traced and saved (cheap: per call)."""
    return _state["precompile"] and not _state["saved"]


def precompile_scope():
    """Context in which `torch.compile` wrappers are created and first called to take part in
    dynamo's precompile cache. Only full-graph regions may use it (`compiled_region`): PyTorch
    2.11's precompile cache cannot reload graph breaks (its resume functions collide on a warm
    start), and dynamo drops identity guards of whatever it traces in this mode. Active for the
    whole process once precompile is on, not only until `save_compiled`: a region traced in this
    mode leaves globals behind that a later trace outside it trips over (a new frame size in the
    same process would fail instead of compiling)."""
    if not _state["precompile"]:
        return contextlib.nullcontext()
    return contextlib.contextmanager(_precompile_mode)()


def compiled_region(fn: Callable) -> Callable:
    """`torch.compile(fn, fullgraph=True, dynamic=False)`, taking part in dynamo's precompile cache:
    created and called inside `precompile_scope()` (a warm start loads the traced graph at the
    first call instead of tracing; the scope costs a few us per call, with precompile on only). `fn` must be a pure function of its
    arguments (tensors, tuples of them, modules whose weights it reads), one graph, no breaks."""
    import torch

    with precompile_scope():
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)

    def run(*args):
        if _state["precompile"]:
            with precompile_scope():
                return compiled(*args)
        return compiled(*args)

    run.__name__ = run.__qualname__ = f"compiled_{getattr(fn, '__name__', 'region')}"
    return run


def save_compiled() -> float | None:
    """Write what this process compiled to dynamo's precompile cache, once per process (call it when
    every region has compiled); returns the seconds it took, or None when there was nothing to do."""
    if not recording():
        return None
    import torch

    t0 = time.perf_counter()
    try:
        with precompile_scope():
            torch.compiler.save_cache_artifacts()
    except Exception as exc:  # a cache that cannot be written costs the next start, never this run
        log.warning("torch.compile precompile cache not written (%s: %s)", type(exc).__name__, exc)
        return None
    finally:
        _state["saved"] = True
    return time.perf_counter() - t0


def state() -> dict:
    """This process's choice: {"dir": folder or None, "precompile": bool, "saved": bool}."""
    return {"dir": str(_state["dir"]) if _state["dir"] else None, "precompile": _state["precompile"],
            "saved": _state["saved"]}


__all__ = ["compiled_region", "default_cache_dir", "precompile_scope", "recording", "save_compiled", "state", "use_cache_dir"]
