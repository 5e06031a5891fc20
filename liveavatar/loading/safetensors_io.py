"""Lazy, tensor-by-tensor checkpoint reading and strict loading into meta-built modules.

A 14B DiT is 32 GB in bf16: it must never exist twice, and never as a whole CPU copy. The
pieces here let a loader

1. read only the safetensors headers (names, shapes, dtypes; a few kB per file),
2. check the key set and every shape against a module built on the meta device,
3. then read one tensor at a time, cast it and place it on the target device.

`TensorSource` is the lazy view (one file, a folder of shards, or a sharded index json);
`DictSource` wraps an in-memory state dict (e.g. a weights-only `.pth`) with the same interface;
`RemappedSource` renames keys and transforms tensors on the fly (ComfyUI layouts, fp8 scales).
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# safetensors header dtype names -> torch dtypes (only those torch can hold).
_ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)

_HEADER_LIMIT = 100 * 1024 * 1024  # a header larger than this is not a safetensors file


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked. The message names the file and the keys."""


def format_keys(keys: Iterable[str], limit: int = 5) -> str:
    """`['a', 'b', ...] (+N more)`: the first `limit` keys of a (sorted) problem list."""
    keys = list(keys)
    head = ", ".join(repr(k) for k in keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{head}]{more}"


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Parse a safetensors header without touching the data.

    Returns ({key: {"dtype": str, "shape": list[int], "data_offsets": [a, b]}}, metadata).
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            (size,) = struct.unpack("<Q", raw)
            if size > _HEADER_LIMIT:
                raise CheckpointError(f"{path}: not a safetensors file (header size {size})")
            header = json.loads(fh.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    try:
        data_end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed safetensors header ({exc!r})") from exc
    have, want = path.stat().st_size, 8 + size + data_end
    if have < want:
        raise CheckpointError(f"{path}: truncated: {have} bytes, its header describes {want}; the copy or "
                              "download did not finish, fetch this file again")
    return header, metadata


class TensorSource:
    """Lazy, read-only view over the tensors of one or several safetensors files.

    Nothing but headers is read until `get(key)`, which reads exactly one tensor (through
    `safetensors.safe_open`, one handle per file, kept open until `close()`) and returns it on
    the asked device / dtype in memory of its own (never shared with another `get`). Subclasses (`DictSource`, `RemappedSource`) keep the same interface, so
    loaders accept any of them.

    Attributes: `origin` (the path the source was opened from, used in error messages),
    `reads` (number of tensors returned by `get`), `bytes_read` (their size as stored).
    """

    def __init__(self, files: Iterable[str | Path] = (), origin: str | Path | None = None) -> None:
        self._entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...]]] = {}
        self._metadata: dict[Path, dict[str, str]] = {}
        self._handles: dict[Path, Any] = {}
        files = [Path(f) for f in files]
        self.origin = Path(origin) if origin is not None else (files[0] if len(files) == 1 else None)
        self.reads = 0
        self.bytes_read = 0
        for file in files:
            header, metadata = read_safetensors_header(file)
            self._metadata[file] = metadata
            for key, info in header.items():
                if key in self._entries:
                    raise CheckpointError(
                        f"{file}: key {key!r} is also in {self._entries[key][0]}; shards must not overlap"
                    )
                dtype = _ST_DTYPES.get(info.get("dtype", ""))
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {info.get('dtype')}")
                self._entries[key] = (file, dtype, tuple(int(s) for s in info["shape"]))

    # -- mapping-like interface --------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[2]

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key)[1]

    def numel(self, key: str) -> int:
        n = 1
        for s in self.shape(key):
            n *= s
        return n

    def path_of(self, key: str) -> Path | None:
        """The file that holds `key` (None for in-memory sources)."""
        return self._entry(key)[0]

    def metadata(self) -> dict[str, str]:
        """The union of the files' `__metadata__` dicts."""
        out: dict[str, str] = {}
        for md in self._metadata.values():
            out.update(md)
        return out

    def describe(self) -> str:
        """What to call this source in an error message."""
        return str(self.origin) if self.origin is not None else "<state dict>"

    def get(self, key: str, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor and return it on `device` (default CPU) in `dtype` (default: as stored)."""
        file, _, _ = self._entry(key)
        device = torch.device(device) if device is not None else torch.device("cpu")
        tensor = self._handle(file).get_tensor(key)  # a view of the file mapping (no read yet)
        self._count(tensor)
        return _place(tensor, device, dtype)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()}, {len(self)} tensors)"

    # -- internals ----------------------------------------------------------------------------
    def _entry(self, key: str) -> tuple[Path, torch.dtype, tuple[int, ...]]:
        try:
            return self._entries[key]
        except KeyError:
            raise CheckpointError(f"{self.describe()}: no tensor named {key!r}") from None

    def _handle(self, file: Path) -> Any:
        from safetensors import safe_open

        # Read through the CPU mapping and copy once to the target device: only this tensor's
        # pages are touched, and no state-dict-wide CPU copy ever exists.
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file]

    def _count(self, tensor: torch.Tensor) -> None:
        self.reads += 1
        self.bytes_read += tensor.numel() * tensor.element_size()


def _place(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Move then cast (a cast on the GPU is cheaper than on the CPU), always into new memory.

    The result never aliases the source's buffer: safetensors hands out views of the file
    mapping (the same memory for repeated reads of one key), and loaders modify weights in place
    (LoRA merge), which must not leak into another model read from the same source.
    """
    out = tensor
    if out.device != device:
        out = out.to(device)
    if dtype is not None and out.dtype != dtype:
        out = out.to(dtype)
    return out.clone() if out is tensor else out


class DictSource(TensorSource):
    """A plain `{name: Tensor}` dict behind the `TensorSource` interface."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], origin: str | Path | None = None) -> None:
        super().__init__((), origin)
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{self.describe()}: entries that are not tensors: {format_keys(sorted(bad))}")
        self._tensors = dict(tensors)
        self._entries = {k: (None, v.dtype, tuple(v.shape)) for k, v in self._tensors.items()}  # type: ignore[misc]

    def get(self, key: str, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        self._entry(key)
        tensor = self._tensors[key]
        self._count(tensor)
        device = torch.device(device) if device is not None else tensor.device
        return _place(tensor, device, dtype)

    def path_of(self, key: str) -> Path | None:
        self._entry(key)
        return self.origin


class RemappedSource(TensorSource):
    """A renamed / transformed view over another source.

    `names` maps new key -> base key. `transform(new_key, tensor) -> tensor` (optional) is applied
    after reading (e.g. fp8 dequantisation); `shapes` / `dtypes` override the header values for
    keys whose transform changes them.
    """

    def __init__(self, base: TensorSource, names: Mapping[str, str],
                 transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                 dtypes: Mapping[str, torch.dtype] | None = None,
                 shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        super().__init__((), base.origin)
        self.base = base
        self._names = dict(names)
        self._transform = transform
        self._entries = {
            k: (base.path_of(b), (dtypes or {}).get(k, base.dtype(b)), tuple((shapes or {}).get(k, base.shape(b))))
            for k, b in self._names.items()
        }  # type: ignore[misc]

    def base_key(self, key: str) -> str:
        self._entry(key)
        return self._names[key]

    def metadata(self) -> dict[str, str]:
        return self.base.metadata()

    def get(self, key: str, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        base_key = self.base_key(key)
        if self._transform is None:
            tensor = self.base.get(base_key, device=device, dtype=dtype)
        else:
            tensor = self._transform(key, self.base.get(base_key, device=device))  # owned by us
            if dtype is not None and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
        self._count(tensor)
        return tensor

    def close(self) -> None:
        self.base.close()


def open_tensor_source(path: str | Path) -> TensorSource:
    """Open a checkpoint lazily.

    `path` may be: a `.safetensors` file; a `*.safetensors.index.json` (diffusers / HF sharded
    index, `weight_map` key -> shard file); a folder holding one index json or safetensors files;
    or a `.pth` / `.pt` / `.bin` torch file (loaded with `load_pth_state_dict`, memory-mapped).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return _open_index(indexes[0], origin=path)
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files {[p.name for p in indexes]}; pass one of them")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files or index json in this folder")
        return TensorSource(files, origin=path)
    name = path.name
    if name.endswith(".index.json"):
        return _open_index(path, origin=path)
    if name.endswith(".safetensors"):
        return TensorSource([path], origin=path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return DictSource(load_pth_state_dict(path), origin=path)
    raise CheckpointError(f"{path}: unknown checkpoint type (expected .safetensors, an index json or .pth)")


def _open_index(index: Path, origin: Path) -> TensorSource:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a sharded-checkpoint index (needs a 'weight_map'): {exc}") from exc
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard files listed in the index are missing: {format_keys(missing)}")
    source = TensorSource([index.parent / s for s in shards], origin=origin)
    # The index and the shards must agree key by key.
    wrong = [k for k, s in weight_map.items() if k not in source or source.path_of(k).name != Path(s).name]
    extra = [k for k in source.keys() if k not in weight_map]
    if wrong or extra:
        raise CheckpointError(
            f"{index}: index and shards disagree; keys not in their listed shard: {format_keys(sorted(wrong))}, "
            f"keys in shards but not in the index: {format_keys(sorted(extra))}"
        )
    return source


def load_pth_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a torch `.pth` state dict safely: `torch.load(weights_only=True, mmap=True)`.

    Never unpickles arbitrary objects: a file whose pickle holds anything but tensors and plain
    containers is refused with a `CheckpointError`. Tensors stay memory-mapped (no RAM copy until
    each is moved). A `{"state_dict": {...}}` / `{"model": {...}}` wrapper is unwrapped. Files in
    the legacy (pre-zip) torch format cannot be memory-mapped; they are read whole, still with
    `weights_only=True`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    import pickle

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zipfile" not in str(exc):
                raise
            log.warning("%s: legacy torch format, cannot memory-map; reading it whole", path)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: not a weights-only checkpoint (its pickle holds objects other than tensors); "
            f"refusing to unpickle it. Convert it to safetensors with a trusted tool. ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({exc})") from exc
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model", "module"):
            if set(obj) == {wrapper} and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: entries that are not named tensors: {format_keys(bad)}")
    return obj


def as_source(source: TensorSource | Mapping[str, torch.Tensor] | str | Path) -> TensorSource:
    """Accept a TensorSource, a state dict or a path."""
    if isinstance(source, TensorSource):
        return source
    if isinstance(source, (str, Path)):
        return open_tensor_source(source)
    if isinstance(source, Mapping):
        return DictSource(source)
    raise TypeError(f"expected a TensorSource, a dict of tensors or a path, got {type(source).__name__}")


def _where(source: TensorSource, keys: list[str]) -> str:
    """The file(s) holding `keys`, or the source's description."""
    files = sorted({str(source.path_of(k)) for k in keys if k in source and source.path_of(k) is not None})
    return ", ".join(files) if files else source.describe()


def check_fits(module: nn.Module, source: TensorSource, key_map: Callable[[str], str | None] | None = None,
               strict: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], list[str]]:
    """Compare `source`'s keys and shapes (headers only) with `module`'s state dict (meta is fine).

    Raises one `CheckpointError` naming the file(s) and the first keys of each problem (several
    keys for one name, shape mismatches; with `strict` also missing and unexpected keys).
    Returns (module state dict, {module name: source key}, missing names, unexpected source keys).
    """
    expected = module.state_dict(keep_vars=True)

    provided: dict[str, str] = {}
    duplicates: list[str] = []
    for key in source.keys():
        target = key_map(key) if key_map is not None else key
        if target is None:
            continue
        if target in provided:
            duplicates.append(f"{provided[target]} & {key} -> {target}")
        provided[target] = key
    missing = sorted(k for k in expected if k not in provided)
    unexpected = sorted(provided[k] for k in provided if k not in expected)
    mismatched = sorted(
        f"{provided[k]}: file {list(source.shape(provided[k]))} vs model {list(expected[k].shape)}"
        for k in provided
        if k in expected and tuple(source.shape(provided[k])) != tuple(expected[k].shape)
    )
    problems = []
    if duplicates:
        problems.append(f"several keys map to one name: {format_keys(duplicates)}")
    if mismatched:
        problems.append(f"shape mismatch: {format_keys(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys: {format_keys(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {format_keys(unexpected)}")
    if problems:
        offending = unexpected[:5] + [provided[k] for k in provided if k in expected
                                      and tuple(source.shape(provided[k])) != tuple(expected[k].shape)][:5]
        where = source.describe()
        files = _where(source, offending) if offending else where
        if files != where:
            where = f"{where} (in {files})"
        raise CheckpointError(
            f"{where}: does not fit {type(module).__name__} ({len(expected)} tensors expected, "
            f"{len(provided)} given): " + "; ".join(problems)
        )
    return expected, provided, missing, unexpected


def load_into_module(
    module: nn.Module,
    source: TensorSource | Mapping[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    key_map: Callable[[str], str | None] | None = None,
    strict: bool = True,
    keep_fp32: Callable[[str], bool] | None = None,
    on_assigned: Callable[[str], None] | None = None,
) -> None:
    """Fill `module`'s parameters and persistent buffers from `source`, one tensor at a time.

    The module is typically built under `torch.device("meta")` (no storage). Every key is first
    checked against the module: missing, unexpected (after `key_map`; a key mapped to None is
    dropped) and shape-mismatched keys raise one `CheckpointError` naming the file(s) and the
    first keys of each kind, before any tensor is read. With `strict=False` missing / unexpected
    keys only warn (missing meta tensors are then zero-filled on `device`); shape mismatches
    always raise. Then each tensor is read, cast to `dtype` (floating-point tensors only; float32
    where `keep_fp32(name)` is true; `dtype=None` keeps the stored dtype) and assigned on
    `device` in place of the module's tensor. Parameters come back with `requires_grad=False`.

    A module may define `init_non_persistent_buffers(device)`; it is called afterwards to rebuild
    buffers that are not in the state dict (e.g. RoPE tables), which would otherwise stay meta.

    `on_assigned(name)` is called after each tensor is in place (state-dict order, so a layer's
    weight and bias arrive together): the caller may transform a finished submodule right away
    (LoRA merge, fp8 conversion), which keeps the peak memory at the final size plus one layer.
    """
    source = as_source(source)
    device = torch.device(device)
    expected, provided, missing, unexpected = check_fits(module, source, key_map=key_map, strict=strict)
    if missing:
        log.warning("%s: %d keys missing, left zero: %s", source.describe(), len(missing), format_keys(missing))
    if unexpected:
        log.warning("%s: %d unexpected keys ignored: %s", source.describe(), len(unexpected), format_keys(unexpected))

    # tied tensors (one tensor under several names): id(original) -> loaded tensor. Only those are
    # kept here, so a tensor the caller transforms in `on_assigned` (e.g. to fp8) can be freed.
    counts: dict[int, int] = {}
    for t in expected.values():
        counts[id(t)] = counts.get(id(t), 0) + 1
    done: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for name, old in expected.items():
            if id(old) in done:
                new = done[id(old)]
            elif name in provided:
                want = dtype
                if old.is_floating_point() and dtype is not None and keep_fp32 is not None and keep_fp32(name):
                    want = torch.float32
                src_key = provided[name]
                is_float = source.dtype(src_key).is_floating_point
                new = source.get(src_key, device=device, dtype=want if (is_float and old.is_floating_point()) else None)
                if not old.is_floating_point() and new.dtype != old.dtype:
                    new = new.to(old.dtype)
            elif old.is_meta:
                new = torch.zeros(old.shape, dtype=dtype or old.dtype, device=device)
            else:
                continue
            if counts[id(old)] > 1:
                done[id(old)] = new
            _assign(module, name, new)
            del new
            if on_assigned is not None:
                on_assigned(name)

    init = getattr(module, "init_non_persistent_buffers", None)
    if callable(init):
        init(device)
    still_meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if still_meta and device.type != "meta":
        raise CheckpointError(
            f"{source.describe()}: {type(module).__name__} still has meta tensors after loading "
            f"(non-persistent buffers need an `init_non_persistent_buffers(device)` method): {format_keys(still_meta)}"
        )


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter / buffer `name` of `module` by `tensor` (no copy)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:  # pragma: no cover - state_dict() only yields parameters and buffers
        raise CheckpointError(f"{type(module).__name__} has no parameter or buffer {name!r}")


__all__ = [
    "CheckpointError", "TensorSource", "DictSource", "RemappedSource", "open_tensor_source",
    "load_pth_state_dict", "load_into_module", "check_fits", "as_source", "read_safetensors_header", "format_keys",
]
