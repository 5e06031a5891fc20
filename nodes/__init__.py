"""ComfyUI nodes of ComfyUI-LiveAvatar: thin wrappers over `liveavatar` (and `parallel`).

Nothing here is imported until ComfyUI calls `comfy_entrypoint()`, so loading the pack is cheap;
the model library itself is imported by the nodes' `execute` methods.
"""

from __future__ import annotations


async def comfy_entrypoint():
    """ComfyUI's V3 entry point (see ComfyUI `nodes.py`, `load_custom_node`)."""
    from .extension import LiveAvatarExtension

    return LiveAvatarExtension()


__all__ = ["comfy_entrypoint"]
