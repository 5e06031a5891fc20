"""Model files through ComfyUI's `folder_paths` (dropdown lists and name -> path).

- `liveavatar`: our own folder (default `models/liveavatar`, extra_model_paths.yaml may add more)
  holding whole official checkpoint folders: any sub-folder (up to two levels deep) with a
  `config.json` and DiT weights (the shard index or the single file), e.g.
  `models/liveavatar/Wan2.2-S2V-14B/`. Folders inside a checkpoint (its wav2vec2 folder has a
  `config.json` too) are not checkpoints and are not listed.
- single files in ComfyUI's standard folders: `diffusion_models` (DiT), `text_encoders` (umT5),
  `vae` (Wan2.1 VAE), `audio_encoders` (wav2vec2), `loras` (Live Avatar LoRA).
"""

from __future__ import annotations

import os

import folder_paths
from liveavatar.config import OFFICIAL_FILES

FOLDER = "liveavatar"
NONE = "none"
AUTO = "auto"
LORA_FILE = "liveavatar.safetensors"  # the LoRA's file name in Quark-Vision/Live-Avatar
_MAX_DEPTH = 2


def register_folder() -> None:
    """Register `models/liveavatar` (keeps paths that extra_model_paths.yaml already added)."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))


def _roots() -> list[str]:
    try:
        return folder_paths.get_folder_paths(FOLDER)
    except KeyError:
        register_folder()
        return folder_paths.get_folder_paths(FOLDER)


def is_checkpoint_folder(path: str) -> bool:
    """Whether `path` holds an official checkpoint: config.json and the DiT weights (index or single file).
    Other files may still be missing; the loader names them."""
    f = OFFICIAL_FILES
    return os.path.isfile(os.path.join(path, f.config)) and any(
        os.path.isfile(os.path.join(path, name)) for name in (f.dit_index, f.dit_single))


def checkpoint_folders() -> list[str]:
    """Relative names (with '/') of checkpoint folders under every `liveavatar` root (not their sub-folders)."""
    found: set[str] = set()
    for root in _roots():
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if depth >= _MAX_DEPTH:
                dirnames[:] = []
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if rel != "." and is_checkpoint_folder(dirpath):
                found.add(rel.replace(os.sep, "/"))
                dirnames[:] = []  # a checkpoint's own folders (wav2vec2, google/umt5-xxl) are parts of it
    return sorted(found)


def checkpoint_path(name: str) -> str | None:
    """Full path of a checkpoint folder listed by `checkpoint_folders`, or None."""
    rel = os.path.normpath(name.replace("/", os.sep))
    if rel.startswith("..") or os.path.isabs(rel):
        return None
    for root in _roots():
        full = os.path.join(root, rel)
        if is_checkpoint_folder(full):
            return full
    return None


_TOKENIZER_FILES = ("tokenizer_config.json", "spiece.model", "tokenizer.json")


def tokenizer_folders() -> list[str]:
    """umT5 tokenizer folders (e.g. `Wan2.2-S2V-14B/google/umt5-xxl`) under the `liveavatar` and
    `text_encoders` roots, as "<folder type>/<relative path>"."""
    found: set[str] = set()
    for kind in (FOLDER, "text_encoders"):
        try:
            roots = _roots() if kind == FOLDER else folder_paths.get_folder_paths(kind)
        except KeyError:
            continue
        for root in roots:
            if not os.path.isdir(root):
                continue
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                rel = os.path.relpath(dirpath, root)
                depth = 0 if rel == "." else rel.count(os.sep) + 1
                if depth >= 3:
                    dirnames[:] = []
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                if rel != "." and any(f in filenames for f in _TOKENIZER_FILES):
                    found.add(f"{kind}/{rel.replace(os.sep, '/')}")
    return sorted(found)


def tokenizer_path(name: str) -> str | None:
    """Full path of an entry of `tokenizer_folders`, or None."""
    kind, _, rel = name.partition("/")
    if kind not in (FOLDER, "text_encoders") or not rel:
        return None
    rel = os.path.normpath(rel.replace("/", os.sep))
    if rel.startswith("..") or os.path.isabs(rel):
        return None
    roots = _roots() if kind == FOLDER else folder_paths.get_folder_paths(kind)
    for root in roots:
        full = os.path.join(root, rel)
        if os.path.isdir(full) and any(os.path.isfile(os.path.join(full, f)) for f in _TOKENIZER_FILES):
            return full
    return None


def auto_lora(ckpt_dir: str) -> str | None:
    """The Live Avatar LoRA for a checkpoint folder: inside it, next to it, or under a `liveavatar` root."""
    candidates = [os.path.join(ckpt_dir, LORA_FILE)]
    parent = os.path.dirname(os.path.normpath(ckpt_dir))
    if os.path.isdir(parent):
        candidates.append(os.path.join(parent, LORA_FILE))
        for sub in sorted(os.listdir(parent)):
            candidates.append(os.path.join(parent, sub, LORA_FILE))
    for root in _roots():
        candidates.append(os.path.join(root, LORA_FILE))
    for c in candidates:
        if os.path.isfile(c):
            return c
    return None


def files(folder: str) -> list[str]:
    """`folder_paths.get_filename_list(folder)` (empty if the folder type does not exist)."""
    try:
        return folder_paths.get_filename_list(folder)
    except KeyError:
        return []


def file_path(folder: str, name: str) -> str | None:
    return folder_paths.get_full_path(folder, name)


__all__ = ["FOLDER", "NONE", "AUTO", "register_folder", "is_checkpoint_folder", "checkpoint_folders",
           "checkpoint_path", "tokenizer_folders", "tokenizer_path", "auto_lora", "files", "file_path"]
