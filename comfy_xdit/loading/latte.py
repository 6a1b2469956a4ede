"""Latte transformers from their diffusers folder, loaded offline into ``LatteTransformer3DModel``.

Only the diffusers folder (maxin-cn/Latte-1 layout: ``transformer/`` + ``scheduler/`` + ``vae/``)
is a format here: core ComfyUI has no Latte, so there is no other file layout users have. The
folder's config.json is checked against the weights' shapes before any weight is read; the two
sin-cos tables diffusers keeps as non-persistent buffers (spatial and temporal positions) are
computed, not read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .folder_transformers import FolderTransformer
from .safetensors_files import CheckpointError

LATTE_CLASS = "LatteTransformer3DModel"
LATTE_SIGNATURES = {
    "diffusers": (
        "pos_embed.proj.weight",
        "caption_projection.linear_1.weight",
        "adaln_single.linear.weight",
        "transformer_blocks.0.attn1.to_q.weight",
        "temporal_transformer_blocks.0.attn1.to_q.weight",
    ),
}


def _check_config(config_path: Path, config: dict) -> None:
    if config.get("norm_type") != "ada_norm_single":
        # The model embeds the timestep with adaLN-single and hands its rows to every block.
        raise CheckpointError(f"{config_path}: norm_type {config.get('norm_type')!r} is not Latte's 'ada_norm_single'")
    channels = config.get("in_channels")
    if channels is None or config.get("out_channels") != 2 * channels:
        # LattePipeline reads the first half of the output channels as the noise prediction.
        raise CheckpointError(f"{config_path}: out_channels {config.get('out_channels')} is not twice in_channels "
                              f"{channels} (noise prediction and learned variance), as LattePipeline reads it")


def _materialize_buffers(model, device) -> None:
    """diffusers' spatial and temporal sin-cos tables are non-persistent buffers: rebuilt off the meta device."""
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    from .pixart import _materialize_pos_embed

    _materialize_pos_embed(model, device)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    frames = torch.arange(0, model.config.video_length, device=device).unsqueeze(1)
    table = get_1d_sincos_pos_embed_from_grid(width, frames, output_type="pt")
    model.register_buffer("temp_pos_embed", table.float().unsqueeze(0), persistent=False)


LATTE = FolderTransformer("Latte", LATTE_CLASS, _check_config, _materialize_buffers)


def read_latte_config(path: str | Path) -> dict:
    return LATTE.read_config(path)


def load_latte_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    return LATTE.load(path, dtype, device)
