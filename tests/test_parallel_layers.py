"""Layer-sharded worker groups (schedule kind "layers") give the frames of one process, bitwise.

A tiny random checkpoint with 5 DiT layers (so that 5 ranks each hold one), CPU ranks over gloo,
one thread per process (fp32 sums in the same order everywhere). The reference is in-process
`LiveAvatar.generate`; the video has 6 blocks over 2 clips, so the sink refresh at clip 1 passes
through the slices too. A slice reads only its layers' tensors (a file without the others loads).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from parallel import GroupConfig, WorkerGroup, schedule
from tiny_support import group_reference
from parallel.schedule import ScheduleError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from liveavatar.loading.tiny import TINY_DIT, make_tiny_checkpoint

    cfg = dataclasses.replace(TINY_DIT, num_layers=5, audio_inject_layers=(0, 2, 4))
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny5") / "Wan2.2-S2V-14B", seed=0, dit=cfg)
    job, blocks, three = group_reference(ckpt, other_steps=3)
    return ckpt, job, blocks, three


def _config(ckpt, sched) -> GroupConfig:
    return GroupConfig(sched, "parallel.engine:LiveAvatarEngine", {"ckpt_dir": str(ckpt), "dtype": "fp32"},
                       env={"OMP_NUM_THREADS": "1"}, pg_timeout_s=120.0)


@pytest.mark.parametrize("sched", [
    schedule.layers(4, 2),
    schedule.layers(4, 3),
    schedule.layers(4, 5),
    schedule.layers(4, 2, separate_decode=True),
], ids=["2-slices", "3-slices", "5-slices", "2-slices+decode"])
@pytest.mark.slow
def test_layer_slices_equal_inprocess(setup, sched):
    ckpt, job, want, want3 = setup
    with WorkerGroup(_config(ckpt, sched)) as group:
        handle = group.submit(job)
        got = handle.wait()
        assert handle.result.status == "ok"
        if sched.num_slices == 3:  # a cancelled job leaves the slices usable; another step count re-splits
            cancelled, seen = group.submit(job), []
            for bf in cancelled.frames(should_cancel=lambda: bool(seen)):  # cancel after the first block
                seen.append(bf)
            assert seen[0].frames.index == 0 and cancelled.result.status == "cancelled" and len(seen) < 6
            assert group.healthy
            got3 = [b.frames.frames for b in group.submit({**job, "steps": 3, "num_clip": 1}).wait()]
            assert len(got3) == len(want3) and all(torch.equal(g, w) for g, w in zip(got3, want3))
    assert [b.frames.index for b in got] == [b.index for b in want]
    for g, w in zip(got, want):
        assert torch.equal(g.frames.frames, w.frames), f"block {w.index}: frames differ"
        assert torch.equal(g.frames.audio, w.audio)


def test_layer_split_checked_before_any_process():
    with pytest.raises(ScheduleError, match="6 layer slices for a DiT of 5 layers.*at most 5 ranks"):
        schedule.layers(4, 6, num_layers=5)
    with pytest.raises(ScheduleError, match="at least 2 ranks"):
        schedule.layers(4, 1)
    sched = schedule.layers(4, 5, num_layers=5)
    assert sched.kind == "layers" and sched.world_size == 5
    assert [sched.role(r).layers(5) for r in range(5)] == [range(r, r + 1) for r in range(5)]
    assert schedule.split_layers(40, 3) == (range(0, 14), range(14, 27), range(27, 40))


def test_slice_reads_only_its_layers(setup, tmp_path):
    """A DiT file without layers 3 and 4 (and the audio injector of layer 4) loads as slice 0..3
    with the file's values, and fails as the whole model, naming the missing keys."""
    from safetensors.torch import save_file

    from liveavatar.loading.official import build_dit_from_source, find_official_checkpoint
    from liveavatar.loading.safetensors_io import CheckpointError, open_tensor_source

    ckpt = find_official_checkpoint(setup[0], lora="none")
    full = {k: ckpt.dit.get(k) for k in ckpt.dit.keys()}
    drop = ("blocks.3.", "blocks.4.", "audio_injector.injector.2.", "audio_injector.injector_adain_layers.2.")
    part = {k: v for k, v in full.items() if not k.startswith(drop)}
    save_file(part, tmp_path / "dit.safetensors")
    src = open_tensor_source(tmp_path / "dit.safetensors")
    dit = build_dit_from_source(src, ckpt.config, "cpu", torch.float32, layers=range(0, 3))
    sd = dit.state_dict()
    assert set(sd) == set(part) and all(torch.equal(sd[k], part[k].float()) for k in sd)
    with pytest.raises(CheckpointError, match="missing keys"):
        build_dit_from_source(src, ckpt.config, "cpu", torch.float32)


def test_auto_picks_layer_slices_only_when_whole_copies_do_not_fit():
    """The 14B at 704*384 in fp8: five 22 GiB GPUs cannot hold a whole copy each, slices fit (the
    per-slice need agrees with `pipeline.memory` for each slice); 80 GiB GPUs get tpp."""
    from liveavatar.config import DiTConfig
    from liveavatar.pipeline.memory import estimate_memory
    from parallel.engine import memory_need
    from parallel.schedule import DeviceInfo, auto_schedule, split_layers

    cfg = DiTConfig()
    need = memory_need(cfg, 704, 384, fp8=True)
    for k, layers in enumerate(split_layers(cfg.num_layers, 5)):
        est = estimate_memory(cfg, 704, 384, steps_owned=4, fp8=True, decode_here=k == 4, layers=layers)
        assert abs(need.slice_rank(5, k, 4, decodes=k == 4) - est.total) < 0.05 * est.total
    small = [DeviceInfo(f"cuda:{i}", 22 << 30, 24 << 30) for i in range(5)]
    sched = auto_schedule(4, small, need)
    assert sched.kind == "layers" and sched.num_slices >= 2 and "no whole-model layout fits" in sched.reason
    assert all(need.slice_rank(sched.num_slices, r, 4, sched.role(r).decodes) <= 22 << 30
               for r in range(sched.num_slices))
    big = [DeviceInfo(f"cuda:{i}", 78 << 30, 80 << 30) for i in range(5)]
    assert auto_schedule(4, big, need).kind == "tpp"


def test_gpu_mode_layers_is_a_choice_everywhere_and_checked_before_spawning(setup):
    from liveavatar.cli import build_parser
    from liveavatar.options import GPU_MODES
    from nodes.handle import MODES
    from parallel.handle import GroupModel

    assert "layers" in GPU_MODES and MODES == GPU_MODES
    parsers = [build_parser()]
    parsers += [sub for a in parsers[0]._actions if hasattr(a, "choices") and isinstance(a.choices, dict)
                for sub in a.choices.values()]
    gpu_modes = [a.choices for p in parsers for a in p._actions if "--gpu-mode" in a.option_strings]
    assert gpu_modes and all(tuple(c) == GPU_MODES for c in gpu_modes)
    group = GroupModel({"ckpt_dir": str(setup[0]), "dtype": "fp32"}, ["cpu"] * 6, "layers")
    with pytest.raises(ScheduleError, match="gpu_mode 'layers': 6 layer slices for a DiT of 5 layers"):
        group._config(4, 64, 64)
    assert group.manager.group is None  # nothing started


@pytest.mark.slow
def test_sharded_bench_plumbing_on_cpu(tmp_path):
    """`python -m bench.sharded` (the lead's 5 x 22 GiB GPU run) on CPU ranks with the tiny
    random DiT: one rank, then 2 layer slices; same frames hash, one JSON line appended."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, "-m", "bench.sharded", "--tiny", "--devices", "cpu", "--ranks", "2",
                           "--blocks", "5", "--json-out", str(out)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread per rank, as the others
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["frames_equal"] is True and row["schedule"] == "layers" and row["memory_cap_gb"] == 22.0
    assert row["single"]["blocks"] == row["sharded"]["blocks"] == 5
    assert [r["layers"] for r in row["sharded"]["ranks"]] == [[0, 2], [2, 4]]
    assert all(r["estimate_gib"] > 0 for r in row["sharded"]["ranks"])


@pytest.mark.slow
def test_stopped_slice_ends_the_job_after_a_few_block_times_naming_it(setup):
    """The stall rule covers layer slices as it covers tpp (`test_parallel_stall`): slice 0 of 2
    is stopped (SIGSTOP) after 2 of the 6 blocks; the job ends once no block came for 4 x the
    slowest block (floor 1 s), naming rank 0, with nothing left running."""
    from test_parallel_stall import STALL, stop_rank_and_check

    ckpt, job, _, _ = setup
    cfg = dataclasses.replace(_config(ckpt, schedule.layers(4, 2)), stall=STALL, heartbeat_s=0.2,
                              heartbeat_timeout_s=300.0)
    with WorkerGroup(cfg) as group:
        text = stop_rank_and_check(group, job, victim=0, after=2, rule=STALL)
    # rank 1 (the last slice) waits for rank 0's next item
    assert re.search(r"rank 1: reported \d+ blocks? done, the last [\d.]+ s ago, in tpp\.py:\d+ in wait; "
                     r".*slices\.py:\d+ in _wait_item", text), text
