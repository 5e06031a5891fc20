"""Merge a LoRA (the Live Avatar DMD LoRA or a ComfyUI-style LoRA file) into a loaded DiT.

The reference wraps the DiT with peft (rank 128, alpha 64, targets `q,k,v,o,ffn.0,ffn.2` matched
by module-name suffix: 448 Linear layers of the 14B, the audio injector's q/k/v/o included),
loads the file non-strictly and merges: `W <- bf16(W + (alpha / r) * B @ A)`, the product taken
in float32. Here the same merge is done layer by layer on the weight's device without peft, and a
file that matches no layer is an error instead of a silent no-op.

Accepted key spellings (any mix): prefixes `base_model.model.`, `model.diffusion_model.`,
`diffusion_model.`, `lora_unet_` (kohya: dots written as underscores); down/up matrices as
`lora_A`/`lora_B` (with or without an adapter name such as `.default`, with or without
`.weight`), `lora_down`/`lora_up`, `lora.down`/`lora.up`, `_lora.down`/`_lora.up`; optional
per-layer `<module>.alpha` scalars.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import LoRAConfig
from .safetensors_io import CheckpointError, TensorSource, as_source, format_keys

log = logging.getLogger(__name__)

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
_KOHYA_PREFIX = "lora_unet_"
_PATTERNS: tuple[tuple[re.Pattern[str], dict[str, str]], ...] = (
    (re.compile(r"^(?P<m>.+)\.lora_(?P<k>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$"), {"A": "A", "B": "B"}),
    (re.compile(r"^(?P<m>.+)\.lora_(?P<k>[AB])$"), {"A": "A", "B": "B"}),
    (re.compile(r"^(?P<m>.+)\.lora_(?P<k>down|up)\.weight$"), {"down": "A", "up": "B"}),
    (re.compile(r"^(?P<m>.+)\.lora\.(?P<k>down|up)\.weight$"), {"down": "A", "up": "B"}),
    (re.compile(r"^(?P<m>.+)_lora\.(?P<k>down|up)\.weight$"), {"down": "A", "up": "B"}),
    (re.compile(r"^(?P<m>.+)\.(?P<k>alpha)$"), {"alpha": "alpha"}),
)


def normalize_lora_key(key: str) -> tuple[str, str] | None:
    """`(module_name, "A" | "B" | "alpha")` for a LoRA tensor name, None if it is not one.

    `A` is the down projection [r, in], `B` the up projection [out, r]. Kohya names
    (`lora_unet_blocks_0_self_attn_q...`) come back with underscores (`blocks_0_self_attn_q`);
    `merge_lora` resolves them against the model's layer names.
    """
    name = key
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    if name.startswith(_KOHYA_PREFIX):
        name = name[len(_KOHYA_PREFIX):]
    for pattern, kinds in _PATTERNS:
        match = pattern.match(name)
        if match:
            module = match.group("m")
            if module.endswith((".lora_A", ".lora_B", ".lora_down", ".lora_up")):
                return None
            return module, kinds[match.group("k")]
    return None


def peft_target_names(model: nn.Module, targets: Iterable[str] | None = None) -> list[str]:
    """Names of the Linear layers peft would wrap: name == target or name ends with '.' + target."""
    targets = tuple(targets if targets is not None else LoRAConfig().targets)
    return [
        name for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]


@dataclass
class MergeReport:
    """What `merge_lora` did.

    `matched`: layers merged; `targets`: peft target layers of the model (448 for the 14B);
    `unmatched_keys`: file keys that were not used; `missing_targets`: target layers without a
    LoRA; `extra_layers`: merged layers outside the peft targets; `scale`: strength * alpha / r of
    the first layer; `rank`: r of the first layer.
    """

    matched: int
    targets: int
    unmatched_keys: list[str] = field(default_factory=list)
    missing_targets: list[str] = field(default_factory=list)
    extra_layers: list[str] = field(default_factory=list)
    scale: float = 0.0
    rank: int = 0


def _metadata_alpha(source: TensorSource) -> float | None:
    md = source.metadata()
    for key in ("lora_alpha", "alpha", "ss_network_alpha"):
        if key in md:
            try:
                return float(md[key])
            except ValueError:
                pass
    return None


class LoraPlan:
    """A LoRA file resolved against a model's Linear layers (see `plan_lora`): which file keys go
    to which layer, at which scale. `apply(name, linear)` merges one layer; `finish()` logs what
    was left over and returns the report. The model may still be on the meta device while
    planning (only shapes are read), so layers can be merged one by one as they are loaded."""

    def __init__(self, source: TensorSource, usable: dict[str, dict[str, str]], scales: dict[str, float],
                 report: MergeReport, targets: set[str]):
        self.source = source
        self.layers = usable
        self.scales = scales
        self.report = report
        self._targets = targets
        self._done: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    @torch.no_grad()
    def apply(self, name: str, linear: nn.Module) -> None:
        """weight += scale * B @ A for layer `name` (float32 product, one rounding to the weight dtype)."""
        if name in self._done:
            raise RuntimeError(f"LoRA: layer {name} merged twice")
        weight = linear.weight
        if weight.is_meta:
            raise CheckpointError(f"{self.source.describe()}: {name}: weight is on the meta device "
                                  "(load the base weights first)")
        kinds, scale = self.layers[name], self.scales[name]
        if scale != 0.0:
            a = self.source.get(kinds["A"], device=weight.device, dtype=torch.float32)
            b = self.source.get(kinds["B"], device=weight.device, dtype=torch.float32)
            delta = b @ a
            delta.mul_(scale)
            weight.add_(delta)  # computed in float32, rounded once to the weight dtype
            del a, b, delta
        self._done.add(name)
        self.report.matched += 1
        if name not in self._targets:
            self.report.extra_layers.append(name)

    def finish(self) -> MergeReport:
        """The report (warnings logged for unused keys, targets without LoRA, non-target layers)."""
        report, source = self.report, self.source
        left = sorted(set(self.layers) - self._done)
        if left:
            raise CheckpointError(f"{source.describe()}: LoRA layers never merged: {format_keys(left)}")
        if report.unmatched_keys or report.missing_targets:
            log.warning(
                "%s: LoRA merged into %d layers (%d targets); %d keys unused %s; %d targets without LoRA %s",
                source.describe(), report.matched, report.targets, len(report.unmatched_keys),
                format_keys(report.unmatched_keys), len(report.missing_targets), format_keys(report.missing_targets),
            )
        if report.extra_layers:
            log.warning("%s: LoRA also merged into %d non-target layers %s", source.describe(),
                        len(report.extra_layers), format_keys(report.extra_layers))
        return report


def plan_lora(
    model: nn.Module,
    lora_source: TensorSource | Mapping[str, torch.Tensor] | str | Path,
    *,
    strength: float = 1.0,
    rank: int | None = None,
    alpha: float | None = None,
    config: LoRAConfig | None = None,
) -> LoraPlan:
    """Resolve a LoRA file against `model` (scales as `merge_lora` documents), without touching
    any weight. Raises `CheckpointError` when no key matches a layer or a LoRA matrix does not fit
    its layer (every layer is checked first)."""
    config = config or LoRAConfig()
    source = as_source(lora_source)
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    by_underscore = {name.replace(".", "_"): name for name in linears}
    targets = set(peft_target_names(model, config.targets))

    groups: dict[str, dict[str, str]] = {}
    unmatched: list[str] = []
    for key in source.keys():
        parsed = normalize_lora_key(key)
        if parsed is None:
            unmatched.append(key)
            continue
        module, kind = parsed
        module = module if module in linears else by_underscore.get(module, module)
        if kind in groups.setdefault(module, {}):
            raise CheckpointError(f"{source.describe()}: two keys for {module}.{kind}: "
                                  f"{groups[module][kind]!r} and {key!r}")
        groups[module][kind] = key

    usable: dict[str, dict[str, str]] = {}
    for module, kinds in groups.items():
        if module in linears and "A" in kinds and "B" in kinds:
            usable[module] = kinds
        else:
            unmatched.extend(kinds.values())
    if not usable:
        raise CheckpointError(
            f"{source.describe()}: no LoRA key matches a Linear layer of {type(model).__name__} "
            f"(first keys {format_keys(sorted(source.keys()))}; expected names like "
            f"'blocks.0.self_attn.q.lora_A.default.weight'). Is this a LoRA for this model?"
        )

    bad: list[str] = []
    for module, kinds in usable.items():
        weight = linears[module].weight
        a_shape, b_shape = source.shape(kinds["A"]), source.shape(kinds["B"])
        out_f, in_f = weight.shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_f or b_shape[0] != out_f \
                or a_shape[0] != b_shape[1]:
            bad.append(f"{module}: A {list(a_shape)}, B {list(b_shape)} vs weight {list(weight.shape)}")
    if bad:
        raise CheckpointError(f"{source.describe()}: LoRA matrices do not fit the model: {format_keys(sorted(bad))}")

    file_alpha = _metadata_alpha(source)
    report = MergeReport(matched=0, targets=len(targets))
    scales: dict[str, float] = {}
    for module, kinds in usable.items():
        r_file = source.shape(kinds["A"])[0]
        r = rank if rank is not None else r_file
        if alpha is not None:
            layer_alpha = float(alpha)
        elif "alpha" in kinds:
            layer_alpha = float(source.get(kinds["alpha"], dtype=torch.float32).reshape(-1)[0])
        elif file_alpha is not None:
            layer_alpha = file_alpha
        else:
            layer_alpha = config.alpha / config.rank * r
        scales[module] = strength * layer_alpha / r
        if len(scales) == 1:
            report.scale, report.rank = scales[module], r_file
    report.unmatched_keys = sorted(unmatched)
    report.missing_targets = sorted(targets - set(usable))
    return LoraPlan(source, usable, scales, report, targets)


def merge_lora(
    model: nn.Module,
    lora_source: TensorSource | Mapping[str, torch.Tensor] | str | Path,
    *,
    strength: float = 1.0,
    rank: int | None = None,
    alpha: float | None = None,
    config: LoRAConfig | None = None,
) -> MergeReport:
    """Add `strength * alpha / r * B @ A` to the weight of every Linear layer the file names.

    Scale: `alpha` (argument) > the file's per-layer `.alpha` tensors > a `lora_alpha` entry of
    the safetensors metadata > the config's ratio (`config.alpha / config.rank` = 0.5 for Live
    Avatar; a file without alpha keeps that ratio whatever its rank). `r` is the rank of the
    file's matrices unless `rank` is given. `strength=1` reproduces the reference merge;
    `strength=0` leaves the model unchanged.

    The product is computed in float32 on the weight's device, added, and the sum rounded once to
    the weight's dtype. Raises `CheckpointError` when no key matches a layer or a LoRA matrix does
    not fit its layer (checked for every layer before any weight changes); warns when only part
    of the file or of the targets is used.
    """
    plan = plan_lora(model, lora_source, strength=strength, rank=rank, alpha=alpha, config=config)
    linears = dict(model.named_modules())
    meta = sorted(name for name in plan.layers if linears[name].weight.is_meta)
    if meta:
        raise CheckpointError(f"{plan.source.describe()}: LoRA matrices do not fit the model: "
                              f"{format_keys([f'{n}: weight is on the meta device (load the base weights first)' for n in meta])}")
    for name in plan.layers:
        plan.apply(name, linears[name])
    return plan.finish()


__all__ = ["normalize_lora_key", "merge_lora", "plan_lora", "LoraPlan", "MergeReport", "peft_target_names"]
