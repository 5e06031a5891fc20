"""Benchmarks of ComfyUI-LiveAvatar, kept outside the library (`liveavatar/` and `parallel/` never
import this package). Run from the repository root:

    python -m bench --random-weights --size 704*384 --steps 4 --blocks 6 [--fp8] [--compile] ...

Modules: `cli` (flags, the JSON line), `random_model` (random-weight DiT / VAE, speed options,
random conditioning), `scopes` (the timed DiT and end-to-end loops), `group` + `group_engine`
(worker-group runs), `benchlib` (model-agnostic helpers, also loaded by path by
`ref_harness.py`). The scripts next to them (`*.sh`, `*_micro.py`, `ref_harness.py`, `table.py`)
are described in bench/README.md.
"""
