"""A weights file picked inside a diffusers folder stands for the folder.

ComfyUI's model lists show files, so a diffusers folder under models/diffusion_models appears as
``<folder>/transformer/diffusion_pytorch_model*.safetensors``. For the families whose format is
the diffusers folder (DiT, CogVideoX, ConsisID, Latte), such a file means its folder: the folder's config.json,
all its shards and its ``scheduler/`` apply, not a single file's inferred defaults.
"""

from __future__ import annotations

from pathlib import Path


def folder_of_weights_file(path: str | Path) -> Path:
    """The folder of a weights file that sits beside a diffusers config.json, else ``path`` itself."""
    path = Path(path).expanduser()
    if path.is_file() and (path.parent / "config.json").is_file():
        return path.parent
    return path
