"""The one rule for file paths that reach a node: ComfyUI's own folders only.

A path a node is about to read (a checkpoint folder, a single model file, a LoRA, a tokenizer
folder) must resolve, symlinks followed, inside one of ComfyUI's folders: every registered model
folder (`models/*` and those extra_model_paths.yaml adds), input, output and temp. `..`, absolute
paths elsewhere and symlinks leading out are refused with a `LiveAvatarInputError` naming the node
and the input, before anything is opened. A model stored elsewhere is reached by adding its real
folder to extra_model_paths.yaml, which makes it one of ComfyUI's folders.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .errors import LiveAvatarInputError

__all__ = ["comfy_roots", "is_inside", "confine"]


def comfy_roots() -> list[str]:
    """Real paths of ComfyUI's model, input, output and temp folders (those that exist)."""
    import folder_paths

    roots = [folder_paths.models_dir, folder_paths.get_input_directory(), folder_paths.get_output_directory(),
             folder_paths.get_temp_directory()]
    for paths, _exts in folder_paths.folder_names_and_paths.values():
        roots.extend(paths)
    return sorted({os.path.realpath(r) for r in roots if os.path.isdir(r)})


def is_inside(path: str, roots: Iterable[str]) -> bool:
    """Whether `path`, resolved (symlinks, `..`), is one of `roots` or below one."""
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if real == root or os.path.commonpath([real, root]) == root:
            return True
    return False


def confine(node: str, input_name: str, path: str, roots: Iterable[str] | None = None) -> str:
    """`path` unchanged when it resolves inside `roots` (default: `comfy_roots()`), else
    `LiveAvatarInputError` naming the node, the input and where the path leads."""
    roots = list(comfy_roots() if roots is None else roots)
    if not is_inside(path, roots):
        raise LiveAvatarInputError(
            node, input_name,
            f"{path!r} leads to {os.path.realpath(path)}, outside ComfyUI's model, input and output folders; "
            "nodes read only from those (put the files there, or add their real folder to extra_model_paths.yaml)")
    return path
