"""ConsisID transformers from their diffusers folder, loaded offline into ``ConsisIDTransformer3DModel``.

The format is the diffusers folder (BestWishYsh/ConsisID-preview layout: ``transformer/`` +
``scheduler/`` + ``vae/``): core ComfyUI has no ConsisID. The folder's config.json is checked
against the weights' shapes before any weight is read. Models with keypoint conditioning
(``is_kps``) are refused by name: the face keypoints need the face detector this pack does not run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .folder_transformers import FolderTransformer, sincos_patch_table
from .safetensors_files import CheckpointError

CONSISID_CLASS = "ConsisIDTransformer3DModel"
CONSISID_SIGNATURES = {
    "diffusers": (
        "patch_embed.proj.weight",
        "transformer_blocks.0.attn1.norm_q.weight",
        "local_facial_extractor.latents",
        "perceiver_cross_attention.0.to_q.weight",
        "norm_final.weight",
    ),
}


def _refuse_keypoints(config_path: Path, config: dict) -> None:
    if config.get("is_kps"):
        raise CheckpointError(f"{config_path}: ConsisID with face keypoint conditioning (is_kps) is not supported; "
                              "use ConsisID-preview (is_kps false)")


CONSISID = FolderTransformer("ConsisID", CONSISID_CLASS, _refuse_keypoints, sincos_patch_table)


def read_consisid_config(path: str | Path) -> dict:
    return CONSISID.read_config(path)


def load_consisid_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    return CONSISID.load(path, dtype, device)
