"""Group lifetime across processes: a killed controller leaves no workers; torchrun attach."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from parallel import WorkerGroup, schedule
from test_parallel_group import JOB, TESTS, config, gone, video
from test_parallel_toy import naive_video

REPO = Path(__file__).resolve().parents[1]

PARENT = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from parallel import GroupManager, schedule
    from test_parallel_group import SLOW, config
    manager = GroupManager()
    cfg = config(schedule.tpp(4, 2), log_dir={logs!r})
    for i, bf in enumerate(manager.run(cfg, {{**SLOW, "num_clips": 200}})):
        if i == 1:
            print(json.dumps(list(manager.group.pids.values())), flush=True)
""")


def test_killed_controller_leaves_no_orphans(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(repo=str(REPO), tests=TESTS, logs=str(tmp_path)))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        line = parent.stdout.readline()
        pids = json.loads(line)
        assert len(pids) == 2 and all(pid != parent.pid for pid in pids)
        assert not gone(pids, timeout=0.5)  # mid-job, alive
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        t0 = time.monotonic()
        assert gone(pids, timeout=10.0), "workers outlived their controller"
        assert time.monotonic() - t0 < 10.0
    finally:
        if parent.poll() is None:
            parent.kill()


def test_torchrun_attach(tmp_path):
    want = naive_video(JOB)
    group = WorkerGroup(config(schedule.tpp(4, 2), launch="attach", log_dir=str(tmp_path)))
    host, port = group.listen()
    assert host == "127.0.0.1" and oct(group.secret_file.stat().st_mode & 0o777) == "0o600"
    cmd = group.attach_command().split()
    assert cmd[0] == "torchrun" and cmd[1] == "--nproc_per_node=2"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), TESTS]), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")
    log = open(tmp_path / "torchrun.log", "wb")
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              *cmd[1:]], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        group.start()
        handle = group.submit(JOB)
        assert torch.equal(video(handle.wait()), want)
        assert handle.result.status == "ok"
        group.close()
        assert agent.wait(timeout=30) == 0, (tmp_path / "torchrun.log").read_text()[-2000:]
    finally:
        group.close()
        if agent.poll() is None:
            agent.kill()
