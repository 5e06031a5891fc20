"""The ComfyExtension that registers every LiveAvatar node (V3 schema, `comfy_api.latest`)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import comfy_memory, handle, model_files
from .encode import LiveAvatarAudioEncode, LiveAvatarReferenceImage, LiveAvatarTextEncode
from .loader import LiveAvatarModelLoader, LiveAvatarModelLoaderFiles
from .sampler import LiveAvatarSampler, LiveAvatarSaveMP4

NODES: list[type[io.ComfyNode]] = [
    LiveAvatarModelLoader,
    LiveAvatarModelLoaderFiles,
    LiveAvatarTextEncode,
    LiveAvatarAudioEncode,
    LiveAvatarReferenceImage,
    LiveAvatarSampler,
    LiveAvatarSaveMP4,
]


class LiveAvatarExtension(ComfyExtension):
    async def on_load(self) -> None:
        model_files.register_folder()
        comfy_memory.add_status_route(handle.status)

    async def get_node_list(self) -> list[type[io.ComfyNode]]:  # (this ComfyUI never calls on_load)
        model_files.register_folder()
        comfy_memory.add_status_route(handle.status)
        return list(NODES)
