"""Live Avatar in plain PyTorch: streaming, audio-driven talking-avatar video.

Importable without ComfyUI and without a GPU. Heavy submodules (torch models, transformers,
diffusers) are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"
