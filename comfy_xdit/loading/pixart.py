"""PixArt-alpha / PixArt-Sigma transformer checkpoints, loaded offline into diffusers' ``PixArtTransformer2DModel``.

Accepted: a single .safetensors file in the original PixArt layout (``x_embedder``, ``t_block``,
``y_embedder``, ``blocks.N.attn.qkv``, ...) as ComfyUI users keep it in models/diffusion_models or
models/checkpoints, with ComfyUI's ``model.diffusion_model.`` prefix or none; a single file in
diffusers' key layout; and a diffusers folder (plain, sharded, or a pipeline with ``transformer/``).

diffusers ships no converter for the original layout (only a script that reads the .pth release),
so the mapping is the small explicit table below: the fused self-attention ``qkv`` and the
cross-attention ``kv_linear`` are split, everything else is renamed. The training-time
unconditional caption (``y_embedding``) and a stored ``pos_embed`` table are not weights of the
diffusers model; the table only fixes the positional interpolation (see below).

The config is inferred from shapes in the headers, as ComfyUI does (comfy/model_detection.py):
- PixArt-alpha (micro-conditions) if the ``ar_embedder`` / ``aspect_ratio_embedder`` weights are
  there, PixArt-Sigma (and the 512px alpha model) otherwise;
- 16 heads whatever the width, as ComfyUI assumes for every PixArt file (a diffusers folder's
  config.json says otherwise where it has to);
- a stored ``pos_embed`` of N positions fixes the positional interpolation to
  sqrt(N) * patch / 64 (diffusers' ``interpolation_scale``); without one ComfyUI derives it from
  the resolution, which ``interpolation_scale`` None means here (models/pixart.py).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint_files import DIFFUSERS_LAYOUT, ConvertedCheckpoint, detect_layout, map_block_tensor
from .safetensors_files import CheckpointError, assign_weights

ORIGINAL_LAYOUT = "original"
PIXART_HEADS = 16  # ComfyUI's fixed head count for PixArt
DEFAULT_SAMPLE_SIZE = 128  # the 1024px models; only diffusers' default positional grid

PIXART_SIGNATURES = {
    ORIGINAL_LAYOUT: (
        "t_block.1.weight",
        "x_embedder.proj.weight",
        "y_embedder.y_proj.fc1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.cross_attn.kv_linear.weight",
        "final_layer.linear.weight",
    ),
    DIFFUSERS_LAYOUT: (
        "adaln_single.linear.weight",
        "pos_embed.proj.weight",
        "caption_projection.linear_1.weight",
        "transformer_blocks.0.attn2.to_k.weight",
        "proj_out.weight",
    ),
}

# original name -> diffusers name, outside the blocks
_TOP_LEVEL = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
# inside block N: original -> diffusers (weights and biases alike)
_IN_BLOCK = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# fused projections split along the output dimension, in this order
_SPLIT_IN_BLOCK = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
# stored but not weights of the diffusers model
_NOT_WEIGHTS = {
    ORIGINAL_LAYOUT: ("y_embedder.y_embedding", "pos_embed"),
    DIFFUSERS_LAYOUT: ("caption_projection.y_embedding", "pos_embed.pos_embed"),
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")


def original_to_diffusers(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename (and split) original-layout tensors; returns (diffusers state dict, keys not mapped)."""
    out, unused = {}, []
    for key, tensor in state_dict.items():
        if key == "final_layer.scale_shift_table":
            out["scale_shift_table"] = tensor
            continue
        block = re.fullmatch(r"blocks\.(\d+)\.scale_shift_table", key)
        if block:
            out[f"transformer_blocks.{block.group(1)}.scale_shift_table"] = tensor
            continue
        name, _, suffix = key.rpartition(".")
        if suffix in ("weight", "bias") and name in _TOP_LEVEL:
            out[f"{_TOP_LEVEL[name]}.{suffix}"] = tensor
            continue
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            index, inner, suffix = match.groups()
            if map_block_tensor(key, tensor, f"transformer_blocks.{index}.", inner, suffix, _IN_BLOCK, _SPLIT_IN_BLOCK, out):
                continue
        unused.append(key)
    return out, sorted(unused)


def _detect_layout(keys) -> tuple[str, str]:
    return detect_layout(keys, PIXART_SIGNATURES, "PixArt-alpha / PixArt-Sigma", {ORIGINAL_LAYOUT: "original / ComfyUI", DIFFUSERS_LAYOUT: "diffusers"})



def _count_blocks(keys: Iterable[str], pattern: str) -> int:
    regex = re.compile(pattern)
    indices = sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})
    count = indices[-1] + 1 if indices else 0
    if indices != list(range(count)):
        raise CheckpointError(f"block indices are not contiguous: {pattern} has {indices}")
    return count


def _infer_config(shape, keys: list[str], layout: str) -> dict:
    """The diffusers config, from shapes in the headers only (ComfyUI's assumptions where shapes cannot tell)."""
    if layout == ORIGINAL_LAYOUT:
        patch, caption, final, blocks, ar = "x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "final_layer.linear.weight", r"blocks\.(\d+)\.", "ar_embedder.mlp.0.weight"
        pos_embed = "pos_embed"
    else:
        patch, caption, final, blocks, ar = "pos_embed.proj.weight", "caption_projection.linear_1.weight", "proj_out.weight", r"transformer_blocks\.(\d+)\.", "adaln_single.emb.aspect_ratio_embedder.linear_1.weight"
        pos_embed = "pos_embed.pos_embed"
    width, in_channels, patch_size, _ = shape(patch)
    if width % PIXART_HEADS:
        raise CheckpointError(f"model width {width} does not divide into PixArt's {PIXART_HEADS} heads")
    sample_size, interpolation = DEFAULT_SAMPLE_SIZE, None
    if pos_embed in keys:
        positions = shape(pos_embed)[1]
        grid = math.isqrt(positions)
        if grid * grid != positions:
            raise CheckpointError(f"{pos_embed} holds {positions} positions, not a square grid")
        sample_size = grid * patch_size
        interpolation = sample_size // 64  # ComfyUI's pe_interpolation for such a file
        if interpolation == 0:
            raise CheckpointError(f"{pos_embed} is for {sample_size * 8} px images; ComfyUI's PixArt needs at least 512 px")
    return {
        "num_attention_heads": PIXART_HEADS,
        "attention_head_dim": width // PIXART_HEADS,
        "in_channels": in_channels,
        "out_channels": shape(final)[0] // (patch_size * patch_size),
        "num_layers": _count_blocks(keys, blocks),
        "cross_attention_dim": width,
        "caption_channels": shape(caption)[1],
        "patch_size": patch_size,
        "sample_size": sample_size,
        "interpolation_scale": interpolation,
        "use_additional_conditions": ar in keys,
    }


def _merge_folder_config(config: dict, config_path: Path) -> dict:
    """A diffusers folder's config.json, checked against the shapes; it decides what shapes cannot tell."""
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    class_name = stored.get("_class_name")
    if class_name not in (None, "PixArtTransformer2DModel"):
        raise CheckpointError(f"{config_path}: the folder holds a {class_name}, not a PixArtTransformer2DModel")
    merged = dict(config)
    for name in ("num_attention_heads", "attention_head_dim", "sample_size", "interpolation_scale"):
        if stored.get(name) is not None:
            merged[name] = stored[name]
    if merged["num_attention_heads"] * merged["attention_head_dim"] != config["num_attention_heads"] * config["attention_head_dim"]:
        raise CheckpointError(f"{config_path}: heads x head width does not match the model width of the weights")
    for name in ("in_channels", "out_channels", "num_layers", "caption_channels", "patch_size"):
        if stored.get(name) is not None and stored[name] != config[name]:
            raise CheckpointError(f"{config_path}: {name} is {stored[name]!r} but the weights say {config[name]!r}")
    return merged


def _meta_model(config: dict):
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        return PixArtTransformer2DModel(**config)


def _materialize_pos_embed(model, device) -> None:
    """diffusers keeps its default positional table as a non-persistent buffer: rebuild it off the meta device."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    patch_embed = model.pos_embed
    grid = patch_embed.height
    table = get_2d_sincos_pos_embed(patch_embed.pos_embed.shape[-1], grid, base_size=patch_embed.base_size,
                                    interpolation_scale=patch_embed.interpolation_scale, device=device)
    patch_embed.register_buffer("pos_embed", table.float().unsqueeze(0), persistent=False)


class PixArtCheckpoint(ConvertedCheckpoint):
    """An opened PixArt checkpoint: layout, config and key mapping checked, no weight read yet."""

    describes = "a PixArt transformer"
    quantized_use = "use a bf16, fp16 or fp32 file"
    unexpected_note = "; KV-compressed or qk-norm PixArt variants are not supported"

    def _open(self, config_path: Path | None) -> None:
        self.layout, self.prefix = _detect_layout(self.source.keys())
        keys = self.unprefixed_keys()
        self.weight_keys = sorted(k for k in keys if k not in _NOT_WEIGHTS[self.layout])
        config = _infer_config(self.shape, keys, self.layout)
        if config_path is not None:
            config = _merge_folder_config(config, config_path)
        self.config = config
        self._validate()

    def convert_original(self, state_dict):
        return original_to_diffusers(state_dict)

    def meta_model(self):
        return _meta_model(self.config)


def read_pixart_config(path: str | Path) -> dict:
    """The inferred ``PixArtTransformer2DModel`` config, from headers only (for early validation)."""
    with PixArtCheckpoint(path) as checkpoint:
        return dict(checkpoint.config)


def pixart_transformer_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], device="cpu"):
    model = _meta_model(config)
    _materialize_pos_embed(model, device)
    return assign_weights(model, state_dict, f"PixArtTransformer2DModel({config})")


def load_pixart_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    """Load a PixArt-alpha / Sigma transformer from a single file or a diffusers folder, fully offline."""
    with PixArtCheckpoint(path) as checkpoint:
        return pixart_transformer_from_state_dict(checkpoint.config, checkpoint.state_dict(dtype=dtype, device=device), device)
