"""Latte transformers from their diffusers folder, loaded offline into ``LatteTransformer3DModel``.

Only the diffusers folder (maxin-cn/Latte-1 layout: ``transformer/`` + ``scheduler/`` + ``vae/``)
is a format here: core ComfyUI has no Latte, so there is no other file layout users have. The
folder's config.json is checked against the weights' shapes before any weight is read; the two
sin-cos tables diffusers keeps as non-persistent buffers (spatial and temporal positions) are
computed, not read.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from .checkpoint_files import TransformerCheckpoint, as_load_dtype, refuse_key_mismatch, refuse_quantized, refuse_shape_mismatch
from .diffusers_folders import folder_of_weights_file
from .safetensors_files import CheckpointError, assign_weights

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


def _init_names() -> set[str]:
    from diffusers import LatteTransformer3DModel

    return set(inspect.signature(LatteTransformer3DModel.__init__).parameters) - {"self"}


def _folder_config(config_path: Path | None) -> dict:
    if config_path is None:
        raise CheckpointError("Latte loads from its diffusers folder (transformer/config.json beside the weights); "
                              "point the loader at the folder, not a single file")
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    if stored.get("_class_name") != LATTE_CLASS:
        raise CheckpointError(f"{config_path}: the folder holds a {stored.get('_class_name')}, not a {LATTE_CLASS}")
    config = {k: v for k, v in stored.items() if k in _init_names()}
    if config.get("norm_type") != "ada_norm_single":
        # The model embeds the timestep with adaLN-single and hands its rows to every block.
        raise CheckpointError(f"{config_path}: norm_type {config.get('norm_type')!r} is not Latte's 'ada_norm_single'")
    channels = config.get("in_channels")
    if channels is None or config.get("out_channels") != 2 * channels:
        # LattePipeline reads the first half of the output channels as the noise prediction.
        raise CheckpointError(f"{config_path}: out_channels {config.get('out_channels')} is not twice in_channels "
                              f"{channels} (noise prediction and learned variance), as LattePipeline reads it")
    return config


def _meta_model(config: dict):
    from diffusers import LatteTransformer3DModel

    with torch.device("meta"):
        return LatteTransformer3DModel(**config)


def _materialize_buffers(model, device) -> None:
    """diffusers' spatial and temporal sin-cos tables are non-persistent buffers: rebuilt off the meta device."""
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    from .pixart import _materialize_pos_embed

    _materialize_pos_embed(model, device)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    frames = torch.arange(0, model.config.video_length, device=device).unsqueeze(1)
    table = get_1d_sincos_pos_embed_from_grid(width, frames, output_type="pt")
    model.register_buffer("temp_pos_embed", table.float().unsqueeze(0), persistent=False)


class LatteCheckpoint(TransformerCheckpoint):
    def _open(self, config_path: Path | None) -> None:
        self.config = _folder_config(config_path)
        self.weight_keys = sorted(self.source.keys())
        refuse_quantized(self.source, self.weight_keys, use="use a bf16, fp16 or fp32 folder")
        expected = {k: tuple(v.shape) for k, v in _meta_model(self.config).state_dict().items()}
        refuse_key_mismatch(expected, self.weight_keys, f"a {LATTE_CLASS} with its config.json")
        refuse_shape_mismatch({k: self.shape(k) for k in self.weight_keys}, expected, naming="")


def read_latte_config(path: str | Path) -> dict:
    with LatteCheckpoint(folder_of_weights_file(path)) as checkpoint:
        return dict(checkpoint.config)


def load_latte_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    dtype = as_load_dtype(dtype)
    with LatteCheckpoint(folder_of_weights_file(path)) as checkpoint:
        model = _meta_model(checkpoint.config)
        _materialize_buffers(model, device)
        weights = {k: checkpoint._read(k).to(device=device, dtype=dtype) for k in checkpoint.weight_keys}
        return assign_weights(model, weights, f"{LATTE_CLASS}({checkpoint.config})")
