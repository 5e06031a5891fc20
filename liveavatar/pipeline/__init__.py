"""Generation pipeline: loaded model (`LiveAvatar`), block plan, the step loop and streaming.

Names are imported lazily so `import liveavatar.pipeline` stays light.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "LiveAvatar": "liveavatar.pipeline.model",
    "DecodedBlock": "liveavatar.pipeline.conditioning",
    "AudioConditioning": "liveavatar.pipeline.conditioning",
    "ImageConditioning": "liveavatar.pipeline.conditioning",
    "ReferenceLatents": "liveavatar.pipeline.conditioning",
    "GenerationCancelled": "liveavatar.pipeline.conditioning",
    "generate": "liveavatar.pipeline.generate",
    "RankJob": "liveavatar.pipeline.job",
    "JobOptions": "liveavatar.pipeline.job",
    "make_plan": "liveavatar.pipeline.plan",
    "StepRunner": "liveavatar.pipeline.sampler",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS)
