"""Stable Diffusion 3 / 3.5 transformer checkpoints, loaded offline into diffusers' ``SD3Transformer2DModel``.

Accepted: a single .safetensors file in Stability AI's original MMDiT layout (``joint_blocks``,
``x_embedder``, ...) as ComfyUI users keep it: a whole checkpoint in models/checkpoints (the
transformer under ``model.diffusion_model.``, text encoders and VAE beside it, which are
ignored) or the transformer alone in models/diffusion_models (with or without that prefix); a
single file in diffusers' key layout; and a diffusers folder (plain, sharded, or a pipeline
folder with a ``transformer/`` subfolder).

The key mapping is diffusers' own SD3 converter
(``convert_sd3_transformer_checkpoint_to_diffusers``). It is first run on meta tensors with the
header shapes, so a file that does not fit is refused before any weight is read; the config is
inferred from shapes (no hub): SD3 medium (24 blocks x 24 heads), SD3.5 large (qk RMSNorm) and
SD3.5 medium (qk RMSNorm, image-only ``attn2`` in its first blocks).

The head width is 64 in every SD3 release (ComfyUI assumes the same); a file with qk norms
states it through the norm's length, a file without takes 64.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint_files import DIFFUSERS_LAYOUT, ConvertedCheckpoint, as_load_dtype
from .safetensors_files import CheckpointError, assign_weights, find_layouts

SAI_LAYOUT = "sai"
SD3_HEAD_DIM = 64
# Only sets diffusers' default positional grid, which the file's pos_embed replaces.
SD3_SAMPLE_SIZE = 128

# Keys (after the prefix) that identify each layout of an SD3 transformer. Flux's diffusers layout
# shares transformer_blocks and context_embedder but has x_embedder, never pos_embed.proj.
SD3_SIGNATURES = {
    SAI_LAYOUT: (
        "joint_blocks.0.context_block.attn.qkv.weight",
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "y_embedder.mlp.0.weight",
        "context_embedder.weight",
        "final_layer.linear.weight",
        "pos_embed",
    ),
    DIFFUSERS_LAYOUT: (
        "transformer_blocks.0.attn.add_q_proj.weight",
        "pos_embed.proj.weight",
        "pos_embed.pos_embed",
        "time_text_embed.text_embedder.linear_1.weight",
        "context_embedder.weight",
        "proj_out.weight",
    ),
}


def find_sd3_layouts(keys: Iterable[str]) -> list[tuple[str, str]]:
    """Every (layout, prefix) under which these keys hold a whole SD3 transformer's signature."""
    return find_layouts(keys, SD3_SIGNATURES)


def _detect_layout(keys: Iterable[str]) -> tuple[str, str]:
    found = find_sd3_layouts(keys)
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"several SD3 transformers in one file (layout, prefix): {sorted(found)}")
    raise CheckpointError(
        "not a Stable Diffusion 3 / 3.5 transformer checkpoint: expected "
        f"{' + '.join(SD3_SIGNATURES[SAI_LAYOUT][:3])} (Stability AI / ComfyUI layout) or "
        f"{' + '.join(SD3_SIGNATURES[DIFFUSERS_LAYOUT][:3])} (diffusers layout)"
    )


def _block_indices(keys: Iterable[str], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def _count_blocks(keys: Iterable[str], pattern: str) -> int:
    indices = _block_indices(keys, pattern)
    count = indices[-1] + 1 if indices else 0
    if indices != list(range(count)):
        raise CheckpointError(f"block indices are not contiguous: {pattern} has {indices}")
    return count


def _infer_config(shape, keys: list[str], layout: str) -> dict:
    """The diffusers config, from shapes in the headers only."""
    if layout == SAI_LAYOUT:
        patch, pooled, final, blocks = "x_embedder.proj.weight", "y_embedder.mlp.0.weight", "final_layer.linear.weight", r"joint_blocks\.(\d+)\."
        norm_q = "joint_blocks.0.x_block.attn.ln_q.weight"
        dual = _block_indices(keys, r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight$")
        pos_embed = "pos_embed"
    else:
        patch, pooled, final, blocks = "pos_embed.proj.weight", "time_text_embed.text_embedder.linear_1.weight", "proj_out.weight", r"transformer_blocks\.(\d+)\."
        norm_q = "transformer_blocks.0.attn.norm_q.weight"
        dual = _block_indices(keys, r"transformer_blocks\.(\d+)\.attn2\.to_q\.weight$")
        pos_embed = "pos_embed.pos_embed"
    width, in_channels, patch_size, _ = shape(patch)
    has_qk_norm = norm_q in keys
    head_dim = shape(norm_q)[0] if has_qk_norm else SD3_HEAD_DIM
    if width % head_dim:
        raise CheckpointError(f"model width {width} is not a multiple of the head width {head_dim}")
    caption_dim, context_dim = shape("context_embedder.weight")
    if caption_dim != width:
        raise CheckpointError(f"context_embedder projects to {caption_dim} but the model width is {width}")
    positions = shape(pos_embed)[1]
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise CheckpointError(f"{pos_embed} holds {positions} positions, not a square grid")
    return {
        "sample_size": SD3_SAMPLE_SIZE,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "num_layers": _count_blocks(keys, blocks),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": context_dim,
        "caption_projection_dim": caption_dim,
        "pooled_projection_dim": shape(pooled)[1],
        "out_channels": shape(final)[0] // (patch_size * patch_size),
        "pos_embed_max_size": grid,
        "dual_attention_layers": tuple(dual),
        "qk_norm": "rms_norm" if has_qk_norm else None,
    }


def _merge_folder_config(config: dict, config_path: Path) -> dict:
    """Check a diffusers folder's config.json against the shapes; keep what shapes cannot tell."""
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    class_name = stored.get("_class_name")
    if class_name not in (None, "SD3Transformer2DModel"):
        raise CheckpointError(f"{config_path}: the folder holds a {class_name}, not an SD3Transformer2DModel")
    merged = dict(config)
    for name, inferred in config.items():
        if name not in stored or stored[name] is None and inferred is None:
            continue
        value = tuple(stored[name]) if isinstance(stored[name], list) else stored[name]
        if name == "sample_size":
            merged[name] = value
        elif name in ("attention_head_dim", "num_attention_heads") and config["qk_norm"] is None:
            merged[name] = value  # without qk norms the shapes only tell their product
        elif value != inferred:
            raise CheckpointError(f"{config_path}: {name} is {stored[name]!r} but the weights say {inferred!r}")
    if merged["attention_head_dim"] * merged["num_attention_heads"] != config["attention_head_dim"] * config["num_attention_heads"]:
        raise CheckpointError(f"{config_path}: heads x head width does not match the model width of the weights")
    return merged


def _meta_model(config: dict):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel(**config)


def _convert(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """diffusers' SD3 converter; returns (diffusers state dict, keys it left unused)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    remaining = dict(state_dict)  # the converter pops what it uses
    try:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(remaining)
    except KeyError as error:
        raise CheckpointError(f"does not match an SD3 transformer: key {error} is missing") from None
    return converted, sorted(remaining)


class SD3Checkpoint(ConvertedCheckpoint):
    """An opened SD3 checkpoint: layout, config and key mapping checked, no weight read yet."""

    describes = "an SD3 transformer"

    def _open(self, config_path: Path | None) -> None:
        self.layout, self.prefix = _detect_layout(self.source.keys())
        self.weight_keys = self.weight_names()
        config = _infer_config(self.shape, self.weight_keys, self.layout)
        if config_path is not None:
            config = _merge_folder_config(config, config_path)
        self.config = config
        self._validate()

    def convert_original(self, state_dict):
        return _convert(state_dict)

    def meta_model(self):
        return _meta_model(self.config)

    def _row_sources(self) -> dict[str, tuple[str, torch.Tensor]]:
        """diffusers tensor -> (source tensor, its source rows), found by converting row numbers, not weights.

        Each source tensor is stood in for by a vector that numbers its rows (and says which tensor
        it is); the converter only renames, chunks and concatenates along rows, so what comes out
        for each diffusers tensor says where its rows live in the file.
        """
        if getattr(self, "_row_map", None) is None:
            stride = float(2 ** 32)
            rows = lambda k: (self.shape(k) or (1,))[0]  # noqa: E731
            numbered = {k: i * stride + torch.arange(rows(k), dtype=torch.float64) for i, k in enumerate(self.weight_keys)}
            converted, _ = self._to_diffusers(numbered)
            self._row_map = {target: (self.weight_keys[int(v[0] // stride)], (v - (v[0] // stride) * stride).long())
                             for target, v in converted.items()}
        return self._row_map

    def locate(self, target: str) -> tuple[str, int, int]:
        """(source tensor, first row, rows) that a diffusers tensor is taken from (a run of whole rows)."""
        source, rows = self._row_sources()[target]
        start = int(rows[0])
        if not torch.equal(rows, torch.arange(start, start + len(rows))):
            raise KeyError(f"internal: {target!r} is not a run of rows of one checkpoint tensor")
        return source, start, len(rows)

    def state_dict(self, dtype=torch.bfloat16, device: str | torch.device = "cpu", include=None) -> dict[str, torch.Tensor]:
        """The diffusers state dict; ``include(key)`` picks a subset (source tensors only others need are not read)."""
        dtype = as_load_dtype(dtype)
        needed = set(self.weight_keys)
        if include is not None:
            needed = {source for target, (source, _) in self._row_sources().items() if include(target)}
        # Source tensors no included target needs stand in as meta tensors: shapes only, nothing read.
        source = {k: self._read(k).to(dtype) if k in needed else torch.empty(self.shape(k), device="meta")
                  for k in self.weight_keys}
        converted, _ = self._to_diffusers(source)
        # contiguous: the converter's chunks are views; each parameter gets its own storage.
        return {k: v.to(device).contiguous() for k, v in converted.items() if include is None or include(k)}


def read_sd3_config(path: str | Path) -> dict:
    """The inferred ``SD3Transformer2DModel`` config, from headers only (for early validation)."""
    with SD3Checkpoint(path) as checkpoint:
        return dict(checkpoint.config)


def sd3_transformer_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], prepare=None):
    """Build the diffusers model around complete weights; ``prepare(meta_model) -> model`` may reshape it first."""
    model = _meta_model(config)
    if prepare is not None:
        model = prepare(model)
    return assign_weights(model, state_dict, f"SD3Transformer2DModel({config})")


def load_sd3_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    """Load an SD3 / SD3.5 transformer from a single file or a diffusers folder, fully offline."""
    with SD3Checkpoint(path) as checkpoint:
        return sd3_transformer_from_state_dict(checkpoint.config, checkpoint.state_dict(dtype=dtype, device=device))
