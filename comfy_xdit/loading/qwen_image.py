"""Qwen-Image transformer checkpoints, loaded offline into diffusers' ``QwenImageTransformer2DModel``.

Accepted: a single .safetensors file as ComfyUI users keep it in models/diffusion_models
(qwen_image_bf16.safetensors, qwen_image_fp8_e4m3fn.safetensors), with or without ComfyUI's
``model.diffusion_model.`` prefix, and a diffusers folder (plain, sharded, or a pipeline folder
with a ``transformer/`` subfolder). ComfyUI's Qwen-Image module names are diffusers' own, so no
key mapping is needed: the names and shapes are checked against the model built on the meta
device before any weight is read.

The config comes from the header shapes (no hub). What shapes cannot tell is the split of the
head width between the rotary axes: (16, 56, 56) for the 128-wide heads of every release (ComfyUI
pins the same), scaled in the same proportion for narrower test models; a folder's config.json
overrides it.

Refused by name: Qwen-Image ControlNets and the layered variant (an extra timestep embedding).
The edit models share the text-to-image architecture; their reference-image conditioning is
refused where it arrives (ReferenceLatent), so an edit file loads but only samples as text-to-image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .checkpoint_files import TransformerCheckpoint, as_load_dtype, refuse_key_mismatch, refuse_quantized, refuse_shape_mismatch
from .safetensors_files import CheckpointError, assign_weights, find_layouts
from .sd3 import _count_blocks

QWEN_IMAGE_LAYOUT = "qwen_image"  # ComfyUI's and diffusers' (the same names)
QWEN_IMAGE_LATENT_CHANNELS = 16
RELEASE_HEAD_DIM = 128
RELEASE_AXES_DIMS = (16, 56, 56)

QWEN_IMAGE_SIGNATURES = {
    QWEN_IMAGE_LAYOUT: (
        "txt_norm.weight",
        "img_in.weight",
        "txt_in.weight",
        "time_text_embed.timestep_embedder.linear_1.weight",
        "transformer_blocks.0.img_mod.1.weight",
        "transformer_blocks.0.attn.norm_added_q.weight",
        "proj_out.weight",
    ),
}

# key present -> what the file is, for the refusal
_UNSUPPORTED_VARIANTS = (
    ("controlnet_blocks.0.weight", "a Qwen-Image ControlNet, not the Qwen-Image model (ControlNets are not supported for Qwen-Image yet)"),
    ("time_text_embed.addition_t_embedding.weight", "Qwen-Image-Layered, which is not supported; use a Qwen-Image text-to-image model"),
)

# Passed through from a folder's config.json: shapes cannot tell them.
_FOLDER_ONLY = ("axes_dims_rope", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds")


def rotary_axes(head_dim: int) -> tuple[int, int, int]:
    """The rotary axes (frame, row, column) of a head width: the releases' 16 / 56 / 56 of 128, in proportion."""
    axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise CheckpointError(f"heads {head_dim} wide cannot be split into rotary axes in Qwen-Image's proportion "
                              f"(1/8, 7/16, 7/16 of {RELEASE_HEAD_DIM}); a diffusers folder's config.json can set axes_dims_rope")
    return axes


def _detect_prefix(keys) -> str:
    found = find_layouts(keys, QWEN_IMAGE_SIGNATURES)
    if len(found) == 1:
        return found[0][1]
    if found:
        raise CheckpointError(f"several Qwen-Image transformers in one file (prefixes {sorted(p for _, p in found)})")
    raise CheckpointError("not a Qwen-Image transformer checkpoint: expected " + " + ".join(QWEN_IMAGE_SIGNATURES[QWEN_IMAGE_LAYOUT][:4]))


def _infer_config(shape, keys: list[str]) -> dict:
    """The diffusers config, from shapes in the headers only."""
    for name, what in _UNSUPPORTED_VARIANTS:
        if name in keys:
            raise CheckpointError(f"this is {what}")
    width, in_channels = shape("img_in.weight")
    patch = math.isqrt(in_channels // QWEN_IMAGE_LATENT_CHANNELS)
    if patch * patch * QWEN_IMAGE_LATENT_CHANNELS != in_channels:
        raise CheckpointError(f"img_in takes {in_channels} channels, not {QWEN_IMAGE_LATENT_CHANNELS} latent channels x a square patch")
    out_channels = shape("proj_out.weight")[0] // (patch * patch)
    if out_channels != QWEN_IMAGE_LATENT_CHANNELS:
        raise CheckpointError(f"the model makes {out_channels} latent channels; Qwen-Image makes {QWEN_IMAGE_LATENT_CHANNELS}")
    head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0]
    return {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": _count_blocks(keys, r"transformer_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": shape("txt_in.weight")[1],
        "axes_dims_rope": RELEASE_AXES_DIMS if head_dim == RELEASE_HEAD_DIM else rotary_axes(head_dim),
    }


def _merge_folder_config(config: dict, config_path: Path) -> dict:
    """Check a diffusers folder's config.json against the shapes; keep what shapes cannot tell."""
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    class_name = stored.get("_class_name")
    if class_name not in (None, "QwenImageTransformer2DModel"):
        raise CheckpointError(f"{config_path}: the folder holds a {class_name}, not a QwenImageTransformer2DModel")
    for name in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
        if stored.get(name):
            raise CheckpointError(f"{config_path}: {name} is set: a Qwen-Image edit or layered variant, which is not "
                                  "supported; use a Qwen-Image text-to-image model")
    merged = dict(config)
    for name, inferred in config.items():
        if name in stored and name != "axes_dims_rope":
            value = tuple(stored[name]) if isinstance(stored[name], list) else stored[name]
            if value != inferred:
                raise CheckpointError(f"{config_path}: {name} is {stored[name]!r} but the weights say {inferred!r}")
    if stored.get("axes_dims_rope") is not None:
        merged["axes_dims_rope"] = tuple(stored["axes_dims_rope"])
        if sum(merged["axes_dims_rope"]) != config["attention_head_dim"]:
            raise CheckpointError(f"{config_path}: axes_dims_rope {stored['axes_dims_rope']} do not add up to the "
                                  f"heads' width {config['attention_head_dim']}")
    return merged


def _meta_model(config: dict):
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return QwenImageTransformer2DModel(**config)


class QwenImageCheckpoint(TransformerCheckpoint):
    """An opened Qwen-Image checkpoint: prefix, config and key names checked, no weight read yet."""

    def _open(self, config_path: Path | None) -> None:
        self.prefix = _detect_prefix(self.source.keys())
        self.weight_keys = self.weight_names()
        config = _infer_config(self.shape, self.weight_keys)
        if config_path is not None:
            config = _merge_folder_config(config, config_path)
        self.config = config
        self._validate()

    def _validate(self) -> None:
        refuse_quantized(self.source, [self.prefix + k for k in self.weight_keys])
        expected = {k: tuple(v.shape) for k, v in _meta_model(self.config).state_dict().items()}
        refuse_key_mismatch(expected, self.weight_keys, f"a Qwen-Image transformer (prefix {self.prefix!r})")
        refuse_shape_mismatch({k: self.shape(k) for k in self.weight_keys}, expected, naming="")

    def state_dict(self, dtype=torch.bfloat16, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        dtype = as_load_dtype(dtype)
        return {k: self._read(k).to(device, dtype).contiguous() for k in self.weight_keys}


def read_qwen_image_config(path: str | Path) -> dict:
    """The inferred ``QwenImageTransformer2DModel`` config, from headers only (for early validation)."""
    with QwenImageCheckpoint(path) as checkpoint:
        return dict(checkpoint.config)


def load_qwen_image_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    """Load a Qwen-Image transformer from a single file or a diffusers folder, fully offline."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    with QwenImageCheckpoint(path) as checkpoint:
        config = checkpoint.config
        model = _meta_model(config)
        # The rotary tables are computed, not weights (the adapter replaces them with ComfyUI's anyway).
        model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(config["axes_dims_rope"]), scale_rope=True)
        return assign_weights(model, checkpoint.state_dict(dtype=dtype, device=device), f"QwenImageTransformer2DModel({config})")
