"""CogVideoX transformers from their diffusers folder, loaded offline into ``CogVideoXTransformer3DModel``.

Only the diffusers folder (THUDM/CogVideoX-2b / -5b layout: ``transformer/`` + ``scheduler/``) is a
format here: core ComfyUI has no CogVideoX, so there is no other file layout users have. The
folder's config.json is checked against the weights' shapes before any weight is read. CogVideoX
1.0 (2b, 5b) and 1.5 (THUDM/CogVideoX1.5-5B: ``patch_size_t`` 2) text-to-video load; image-to-video
(32 input channels, 1.5-I2V's ofs embedding) is refused by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .folder_transformers import FolderTransformer, sincos_patch_table
from .safetensors_files import CheckpointError

COGVIDEOX_CLASS = "CogVideoXTransformer3DModel"
COGVIDEOX_SIGNATURES = {
    "diffusers": (
        "patch_embed.text_proj.weight",
        "patch_embed.proj.weight",
        "transformer_blocks.0.norm1.linear.weight",
        "transformer_blocks.0.attn1.norm_q.weight",
        "norm_final.weight",
    ),
}


def _refuse_image_to_video(config_path: Path, config: dict) -> None:
    if config.get("ofs_embed_dim") is not None or config.get("in_channels", 16) != config.get("out_channels", 16):
        version = "1.5" if config.get("patch_size_t") is not None else "1.0"
        raise CheckpointError(f"{config_path}: CogVideoX {version} image-to-video ({config.get('in_channels')} input "
                              "channels: the noise and the image's latent) is not supported yet; use a text-to-video "
                              "model (CogVideoX-2b, -5b or CogVideoX1.5-5B)")


COGVIDEOX = FolderTransformer("CogVideoX", COGVIDEOX_CLASS, _refuse_image_to_video, sincos_patch_table)


def read_cogvideox_config(path: str | Path) -> dict:
    return COGVIDEOX.read_config(path)


def load_cogvideox_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    return COGVIDEOX.load(path, dtype, device)
