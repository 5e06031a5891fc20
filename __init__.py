"""ComfyUI-LiveAvatar: ComfyUI entry point.

ComfyUI imports this file as a package (custom_nodes/ComfyUI-LiveAvatar/__init__.py) and calls
`comfy_entrypoint()` to get the node list (V3 schema). Importing it is cheap: no model code, no
torch models, no transformers/diffusers; those load when a node runs.

The pack's own directory is appended to `sys.path` so that the model library (`liveavatar`) and
the multi-GPU layer (`parallel`) import by their plain names, also in worker processes.
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

from .nodes import comfy_entrypoint  # noqa: E402

__all__ = ["comfy_entrypoint"]
