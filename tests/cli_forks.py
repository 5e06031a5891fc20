"""Many `python -m liveavatar ...` runs for the price of one interpreter start (test support).

`run_cli_forked(jobs, parallel)` starts this file as a fresh interpreter, which imports the CLI
(and with it torch) once and then forks one child per job: each child is a process of its own
with the job's arguments, environment additions, stdout and stderr, runs `liveavatar.cli.main`
as `python -m liveavatar` would (argparse's exit, the interpreter's exit handlers and
finalizers included) and exits with its status. The parent runs no tensor work before forking, so
the children start as a fresh `python -m liveavatar` would, minus the ~2-4 s of imports. Used by
the bad-input matrix (tests/test_bad_input_matrix.py), ~70 CLI runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli_forked(jobs: list[dict], parallel: int, workdir: Path) -> list[subprocess.CompletedProcess]:
    """jobs: [{"argv": [...], "env": {...}}]; each runs as `python -m liveavatar *argv` with `env`
    added, from the repository root. -> one CompletedProcess (args, returncode, stdout, stderr)
    per job, in order."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "jobs.json"
    jobs = [{**job, "stdout": str(workdir / f"{i}.out"), "stderr": str(workdir / f"{i}.err")}
            for i, job in enumerate(jobs)]
    spec.write_text(json.dumps({"parallel": parallel, "jobs": jobs}))
    proc = subprocess.run([sys.executable, __file__, str(spec)], cwd=REPO, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"fork runner failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    codes = json.loads((workdir / "codes.json").read_text())
    return [subprocess.CompletedProcess(["python", "-m", "liveavatar", *job["argv"]], codes[i],
                                        Path(job["stdout"]).read_text(errors="replace"),
                                        Path(job["stderr"]).read_text(errors="replace"))
            for i, job in enumerate(jobs)]


def _child(job: dict) -> None:
    """In the forked child: become `python -m liveavatar *argv`; never returns."""
    code = 1
    try:
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.environ.update(job["env"])
        sys.argv = [str(REPO / "liveavatar" / "__main__.py"), *job["argv"]]
        from liveavatar.cli import main

        try:
            code = main(job["argv"])
        except SystemExit as exc:  # argparse's usage errors, as the interpreter would report them
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:  # an uncaught exception: traceback and status 1, as `python -m` gives
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()  # exit handlers and weakref finalizers, as at interpreter exit
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    import liveavatar.cli  # noqa: F401  (the imports every child shares)

    jobs, running, codes = spec["jobs"], {}, [None] * len(spec["jobs"])
    pending = list(range(len(jobs)))
    while pending or running:
        while pending and len(running) < spec["parallel"]:
            i = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(jobs[i])
            running[pid] = i
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    (spec_path.parent / "codes.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    _serve(Path(sys.argv[1]))
