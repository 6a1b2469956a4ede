"""HunyuanDiT v1.0-1.2 transformer checkpoints, loaded offline into diffusers' ``HunyuanDiT2DModel``.

Accepted: a single .safetensors file in the original HunyuanDiT layout (``mlp_t5``, ``pooler``,
``x_embedder``, ``blocks.N.attn1.Wqkv``, ...) as ComfyUI users keep it (models/checkpoints or
models/diffusion_models), with ComfyUI's ``model.diffusion_model.`` prefix or none; a single file
in diffusers' key layout; and a diffusers folder (plain, sharded, or a pipeline with ``transformer/``).

diffusers ships no single-file converter for HunyuanDiT (only a script for the .pt release), so
the mapping is the explicit table below. Three things are more than renames: the fused
self-attention ``Wqkv`` and cross-attention ``kv_proj`` are split; the original's ``norm2``
(before the MLP) and ``norm3`` (before the cross-attention) are diffusers' ``norm3`` and ``norm2``;
and the final modulation's halves are swapped (the original chunks (shift, scale), diffusers'
AdaLayerNormContinuous (scale, shift)).

The config is inferred from shapes in the headers, as ComfyUI does (comfy/model_detection.py):
16 heads whatever the width (ComfyUI's fixed count), depth from the block keys, the MLP width
from ``mlp.fc1``, v1.0/1.1 (size and style conditions) when the style embedder is there, text
widths and lengths from ``mlp_t5``, the padding table and the pooler.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint_files import DIFFUSERS_LAYOUT, ConvertedCheckpoint, map_block_tensor
from .safetensors_files import CheckpointError, assign_weights, find_layouts

ORIGINAL_LAYOUT = "original"
HUNYUAN_DIT_HEADS = 16  # ComfyUI's fixed head count for HunyuanDiT

HUNYUAN_DIT_SIGNATURES = {
    ORIGINAL_LAYOUT: (
        "mlp_t5.0.weight",
        "pooler.positional_embedding",
        "x_embedder.proj.weight",
        "extra_embedder.0.weight",
        "blocks.0.attn1.Wqkv.weight",
        "final_layer.linear.weight",
    ),
    DIFFUSERS_LAYOUT: (
        "text_embedder.linear_1.weight",
        "time_extra_emb.pooler.positional_embedding",
        "pos_embed.proj.weight",
        "blocks.0.attn1.to_q.weight",
        "proj_out.weight",
    ),
}

# original name -> diffusers name, outside the blocks (weights and biases alike)
_TOP_LEVEL = {
    "mlp_t5.0": "text_embedder.linear_1",
    "mlp_t5.2": "text_embedder.linear_2",
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_extra_emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_extra_emb.timestep_embedder.linear_2",
    "extra_embedder.0": "time_extra_emb.extra_embedder.linear_1",
    "extra_embedder.2": "time_extra_emb.extra_embedder.linear_2",
    "pooler.q_proj": "time_extra_emb.pooler.q_proj",
    "pooler.k_proj": "time_extra_emb.pooler.k_proj",
    "pooler.v_proj": "time_extra_emb.pooler.v_proj",
    "pooler.c_proj": "time_extra_emb.pooler.c_proj",
    "style_embedder": "time_extra_emb.style_embedder",
    "final_layer.linear": "proj_out",
}
_TOP_LEVEL_TENSORS = {
    "text_embedding_padding": "text_embedding_padding",
    "pooler.positional_embedding": "time_extra_emb.pooler.positional_embedding",
}
# inside block N: original -> diffusers
_IN_BLOCK = {
    "norm1": "norm1.norm",
    "default_modulation.1": "norm1.linear",
    "attn1.q_norm": "attn1.norm_q",
    "attn1.k_norm": "attn1.norm_k",
    "attn1.out_proj": "attn1.to_out.0",
    "norm3": "norm2",  # before the cross-attention
    "attn2.q_proj": "attn2.to_q",
    "attn2.q_norm": "attn2.norm_q",
    "attn2.k_norm": "attn2.norm_k",
    "attn2.out_proj": "attn2.to_out.0",
    "norm2": "norm3",  # before the MLP
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "skip_norm": "skip_norm",
    "skip_linear": "skip_linear",
}
# fused projections split along the output dimension, in this order
_SPLIT_IN_BLOCK = {
    "attn1.Wqkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn2.kv_proj": ("attn2.to_k", "attn2.to_v"),
}
_FINAL_MODULATION = "final_layer.adaLN_modulation.1"
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def original_to_diffusers(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename (split, reorder) original-layout tensors; returns (diffusers state dict, keys not mapped)."""
    out, unused = {}, []
    for key, tensor in state_dict.items():
        if key in _TOP_LEVEL_TENSORS:
            out[_TOP_LEVEL_TENSORS[key]] = tensor
            continue
        name, _, suffix = key.rpartition(".")
        if suffix in ("weight", "bias") and name in _TOP_LEVEL:
            out[f"{_TOP_LEVEL[name]}.{suffix}"] = tensor
            continue
        if suffix in ("weight", "bias") and name == _FINAL_MODULATION:
            out[f"norm_out.linear.{suffix}"] = _swap_halves(tensor)
            continue
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            index, inner, suffix = match.groups()
            if map_block_tensor(key, tensor, f"blocks.{index}.", inner, suffix, _IN_BLOCK, _SPLIT_IN_BLOCK, out):
                continue
        unused.append(key)
    return out, sorted(unused)


def _detect_layout(keys: Iterable[str]) -> tuple[str, str]:
    found = find_layouts(keys, HUNYUAN_DIT_SIGNATURES)
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"several HunyuanDiT transformers in one file (layout, prefix): {sorted(found)}")
    raise CheckpointError(
        "not a HunyuanDiT transformer checkpoint: expected "
        f"{' + '.join(HUNYUAN_DIT_SIGNATURES[ORIGINAL_LAYOUT][:3])} (original / ComfyUI layout) or "
        f"{' + '.join(HUNYUAN_DIT_SIGNATURES[DIFFUSERS_LAYOUT][:3])} (diffusers layout)"
    )


def _count_blocks(keys: Iterable[str]) -> int:
    indices = sorted({int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))})
    count = indices[-1] + 1 if indices else 0
    if indices != list(range(count)):
        raise CheckpointError(f"block indices are not contiguous: {indices}")
    return count


def _infer_config(shape, keys: list[str], layout: str) -> dict:
    """The diffusers config, from shapes in the headers only (ComfyUI's assumptions where shapes cannot tell)."""
    names = {
        ORIGINAL_LAYOUT: ("x_embedder.proj.weight", "mlp_t5.0.weight", "text_embedding_padding",
                          "pooler.positional_embedding", "pooler.c_proj.weight", "blocks.0.mlp.fc1.weight",
                          "style_embedder.weight"),
        DIFFUSERS_LAYOUT: ("pos_embed.proj.weight", "text_embedder.linear_1.weight", "text_embedding_padding",
                           "time_extra_emb.pooler.positional_embedding", "time_extra_emb.pooler.c_proj.weight",
                           "blocks.0.ff.net.0.proj.weight", "time_extra_emb.style_embedder.weight"),
    }[layout]
    patch, text_t5, padding, pooler_positions, pooler_out, mlp_in, style = names
    width, in_channels, patch_size, _ = shape(patch)
    if width % HUNYUAN_DIT_HEADS or (width // HUNYUAN_DIT_HEADS) % 4:
        raise CheckpointError(f"model width {width} does not divide into HunyuanDiT's {HUNYUAN_DIT_HEADS} heads "
                              "of a width divisible by 4 (the 2-D rotary embedding)")
    text_tokens, text_width = shape(padding)
    t5_tokens = shape(pooler_positions)[0] - 1
    if text_tokens <= t5_tokens:
        raise CheckpointError(f"{padding} has {text_tokens} rows, not more than the pooler's {t5_tokens} mT5 tokens")
    return {
        "num_attention_heads": HUNYUAN_DIT_HEADS,
        "attention_head_dim": width // HUNYUAN_DIT_HEADS,
        "in_channels": in_channels,
        "patch_size": patch_size,
        "hidden_size": width,
        "num_layers": _count_blocks(keys),
        # int(width * ratio) must give the stored MLP width back (DiT-g/2's is 4.3637)
        "mlp_ratio": (shape(mlp_in)[0] + 0.5) / width,
        "learn_sigma": True,  # ComfyUI's HunyuanDiT always predicts the variance as well
        "cross_attention_dim": text_width,
        "cross_attention_dim_t5": shape(text_t5)[1],
        "pooled_projection_dim": shape(pooler_out)[0],
        "text_len": text_tokens - t5_tokens,
        "text_len_t5": t5_tokens,
        "use_style_cond_and_image_meta_size": style in keys,
    }


def _merge_folder_config(config: dict, config_path: Path) -> dict:
    """A diffusers folder's config.json, checked against the shapes; it decides the head count."""
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    class_name = stored.get("_class_name")
    if class_name not in (None, "HunyuanDiT2DModel"):
        raise CheckpointError(f"{config_path}: the folder holds a {class_name}, not a HunyuanDiT2DModel")
    merged = dict(config)
    for name in ("num_attention_heads", "attention_head_dim", "sample_size"):
        if stored.get(name) is not None:
            merged[name] = stored[name]
    if merged["num_attention_heads"] * merged["attention_head_dim"] != config["hidden_size"]:
        raise CheckpointError(f"{config_path}: heads x head width does not match the model width of the weights")
    for name in ("in_channels", "patch_size", "num_layers", "cross_attention_dim", "cross_attention_dim_t5",
                 "pooled_projection_dim", "text_len", "text_len_t5", "use_style_cond_and_image_meta_size", "learn_sigma"):
        if stored.get(name) is not None and stored[name] != config[name]:
            raise CheckpointError(f"{config_path}: {name} is {stored[name]!r} but the weights say {config[name]!r}")
    return merged


def _meta_model(config: dict):
    from diffusers import HunyuanDiT2DModel

    with torch.device("meta"):
        return HunyuanDiT2DModel(**config)


class HunyuanDiTCheckpoint(ConvertedCheckpoint):
    """An opened HunyuanDiT checkpoint: layout, config and key mapping checked, no weight read yet."""

    describes = "a HunyuanDiT transformer"
    quantized_use = "use a bf16, fp16 or fp32 file"

    def _open(self, config_path: Path | None) -> None:
        self.layout, self.prefix = _detect_layout(self.source.keys())
        keys = self.unprefixed_keys()
        self.weight_keys = sorted(keys)
        config = _infer_config(self.shape, keys, self.layout)
        if config_path is not None:
            config = _merge_folder_config(config, config_path)
        self.config = config
        self._validate()

    def convert_original(self, state_dict):
        return original_to_diffusers(state_dict)

    def meta_model(self):
        return _meta_model(self.config)


def read_hunyuan_dit_config(path: str | Path) -> dict:
    """The inferred ``HunyuanDiT2DModel`` config, from headers only (for early validation)."""
    with HunyuanDiTCheckpoint(path) as checkpoint:
        return dict(checkpoint.config)


def load_hunyuan_dit_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    """Load a HunyuanDiT transformer from a single file or a diffusers folder, fully offline."""
    with HunyuanDiTCheckpoint(path) as checkpoint:
        config = checkpoint.config
        return assign_weights(_meta_model(config), checkpoint.state_dict(dtype=dtype, device=device),
                              f"HunyuanDiT2DModel({config})")
