"""Mochi 1 (Genmo mochi-1-preview) transformer checkpoints, loaded offline into diffusers' ``MochiTransformer3DModel``.

Accepted: a single .safetensors file in Genmo's layout (``x_embedder.proj``, ``t5_yproj``,
``t5_y_embedder``, ``blocks.N.attn.qkv_x``, ``final_layer``, ``pos_frequencies``), as ComfyUI users
keep it in models/diffusion_models (e.g. mochi_preview_bf16.safetensors, fp8 scaled included),
with or without ComfyUI's ``model.diffusion_model.`` prefix; a single file in diffusers' key
layout; and a diffusers folder (plain, sharded, or a pipeline folder with ``transformer/``).

The key mapping is diffusers' own Mochi converter (``convert_mochi_transformer_checkpoint_to_diffusers``),
first run on meta tensors with the header shapes, so a file that does not fit is refused before
any weight is read. That converter assumes the release's 48 blocks, the last without text outputs
(no ``proj_y`` / ``mlp_y``): a file with fewer blocks is handed over with its last block numbered
47 and empty (meta) placeholders in between, which are dropped again after conversion, so smaller
files (the tests' tiny ones) convert too. The config is inferred from shapes (no hub).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint_files import (
    DIFFUSERS_LAYOUT, ConvertedCheckpoint, detect_layout, refuse_key_mismatch, refuse_quantized, refuse_shape_mismatch,
)
from .safetensors_files import CheckpointError, assign_weights
from .sd3 import _count_blocks

GENMO_LAYOUT = "genmo"
RELEASE_BLOCKS = 48  # what diffusers' converter assumes
LATENT_CHANNELS = 12

MOCHI_SIGNATURES = {
    GENMO_LAYOUT: ("t5_yproj.weight", "x_embedder.proj.weight", "t5_y_embedder.to_kv.weight",
                   "blocks.0.attn.qkv_x.weight", "final_layer.linear.weight", "pos_frequencies"),
    DIFFUSERS_LAYOUT: ("time_embed.caption_proj.weight", "patch_embed.proj.weight", "time_embed.pooler.to_kv.weight",
                       "transformer_blocks.0.attn1.to_q.weight", "proj_out.weight", "pos_frequencies"),
}

# The keys of one Genmo block that carries text outputs (all but the last), for the converter's placeholders.
_FULL_BLOCK_KEYS = ("mod_x.weight", "mod_x.bias", "mod_y.weight", "mod_y.bias", "attn.qkv_x.weight", "attn.q_norm_x.weight",
                    "attn.k_norm_x.weight", "attn.proj_x.weight", "attn.proj_x.bias", "attn.qkv_y.weight",
                    "attn.q_norm_y.weight", "attn.k_norm_y.weight", "attn.proj_y.weight", "attn.proj_y.bias",
                    "mlp_x.w1.weight", "mlp_x.w2.weight", "mlp_y.w1.weight", "mlp_y.w2.weight")


def _detect_layout(keys) -> tuple[str, str]:
    return detect_layout(keys, MOCHI_SIGNATURES, "Mochi", {GENMO_LAYOUT: "Genmo / ComfyUI", DIFFUSERS_LAYOUT: "diffusers"}, shown=4)



def _convert_genmo(state_dict: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """diffusers' Mochi converter on a file of ``blocks`` blocks (see the module docstring); leftovers are unexpected keys."""
    from diffusers.loaders.single_file_utils import convert_mochi_transformer_checkpoint_to_diffusers

    if not 1 <= blocks <= RELEASE_BLOCKS:
        raise CheckpointError(f"the file has {blocks} blocks; Mochi 1 has {RELEASE_BLOCKS}")
    last = blocks - 1
    given = {}
    for key, tensor in state_dict.items():
        if key.startswith(f"blocks.{last}."):
            key = f"blocks.{RELEASE_BLOCKS - 1}." + key[len(f"blocks.{last}."):]
        given[key] = tensor
    for i in range(last, RELEASE_BLOCKS - 1):
        for name in _FULL_BLOCK_KEYS:
            given[f"blocks.{i}.{name}"] = torch.empty(6, device="meta")
    try:
        converted = convert_mochi_transformer_checkpoint_to_diffusers(given)
    except KeyError as error:  # the converter pops each tensor it maps
        raise CheckpointError(f"missing tensor {error.args[0]!r} (Genmo / ComfyUI name) for a Mochi transformer of "
                              f"{blocks} blocks") from None
    leftover = sorted(given)  # the converter pops what it maps
    if leftover:
        raise CheckpointError(f"{len(leftover)} unexpected keys for a Mochi transformer (first: {', '.join(leftover[:5])})")
    out = {}
    for key, tensor in converted.items():
        if key.startswith("transformer_blocks."):
            index = int(key.split(".")[1])
            if last <= index < RELEASE_BLOCKS - 1:
                continue  # a placeholder
            if index == RELEASE_BLOCKS - 1:
                key = f"transformer_blocks.{last}." + key.split(".", 2)[2]
        out[key] = tensor
    return out


def _infer_config(shape) -> dict:
    """The diffusers config, from the shapes of the diffusers-named tensors."""
    inner, in_channels, patch, patch_w = shape("patch_embed.proj.weight")
    if patch != patch_w:
        raise CheckpointError(f"patch_embed has non-square patches {(patch, patch_w)}")
    if in_channels != LATENT_CHANNELS:
        raise CheckpointError(f"the model takes {in_channels} latent channels; Mochi 1 takes {LATENT_CHANNELS}")
    _, heads, half_head = shape("pos_frequencies")
    pooled_dim, text_dim = shape("time_embed.caption_proj.weight")
    return {
        "patch_size": patch,
        "num_attention_heads": heads,
        "attention_head_dim": 2 * half_head,
        "pooled_projection_dim": pooled_dim,
        "in_channels": in_channels,
        "out_channels": shape("proj_out.weight")[0] // (patch * patch),
        "text_embed_dim": text_dim,
        "time_embed_dim": shape("time_embed.timestep_embedder.linear_1.weight")[1],
    }


def _merge_folder_config(config: dict, config_path: Path) -> dict:
    """Check a diffusers folder's config.json against the shapes."""
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    class_name = stored.get("_class_name")
    if class_name not in (None, "MochiTransformer3DModel"):
        raise CheckpointError(f"{config_path}: the folder holds a {class_name}, not a MochiTransformer3DModel")
    for name, inferred in config.items():
        if name in stored and stored[name] is not None and stored[name] != inferred:
            raise CheckpointError(f"{config_path}: {name} is {stored[name]!r} but the weights say {inferred!r}")
    return config


def _meta_model(config: dict):
    from diffusers import MochiTransformer3DModel

    with torch.device("meta"):
        return MochiTransformer3DModel(**config)


class MochiCheckpoint(ConvertedCheckpoint):
    """An opened Mochi checkpoint: layout, config and key mapping checked, no weight read yet."""

    def _open(self, config_path: Path | None) -> None:
        self.layout, self.prefix = _detect_layout(self.source.keys())
        self.weight_keys = self.weight_names()
        pattern = r"blocks\.(\d+)\." if self.layout == GENMO_LAYOUT else r"transformer_blocks\.(\d+)\."
        self.blocks = _count_blocks(self.weight_keys, pattern)
        refuse_quantized(self.source, [self.prefix + k for k in self.weight_keys])
        # The whole mapping on meta tensors: key names and shapes, without reading any weight.
        converted, _ = self._to_diffusers({k: torch.empty(self.shape(k), device="meta") for k in self.weight_keys})
        config = _infer_config(lambda name: tuple(converted[name].shape) if name in converted else self._missing(name))
        config["num_layers"] = self.blocks
        if config_path is not None:
            config = _merge_folder_config(config, config_path)
        self.config = config
        expected = {k: tuple(v.shape) for k, v in _meta_model(config).state_dict().items()}
        refuse_key_mismatch(expected, converted, f"a Mochi transformer ({self.layout} layout, prefix {self.prefix!r}; "
                                                 "diffusers names)")
        refuse_shape_mismatch({k: t.shape for k, t in converted.items()}, expected)

    @staticmethod
    def _missing(name: str):
        raise CheckpointError(f"missing tensor {name!r} (diffusers name)")

    def convert_original(self, state_dict):
        return _convert_genmo(dict(state_dict), self.blocks), []


def read_mochi_config(path: str | Path) -> dict:
    """The inferred ``MochiTransformer3DModel`` config, from headers only (for early validation)."""
    with MochiCheckpoint(path) as checkpoint:
        return dict(checkpoint.config)


def mochi_transformer_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor]):
    # The model has no computed buffers (rotary tables are made per call), so meta + assign is complete.
    return assign_weights(_meta_model(config), state_dict, f"MochiTransformer3DModel({config})")


def load_mochi_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    """Load a Mochi 1 transformer from a single file or a diffusers folder, fully offline."""
    with MochiCheckpoint(path) as checkpoint:
        return mochi_transformer_from_state_dict(checkpoint.config, checkpoint.state_dict(dtype=dtype, device=device))
