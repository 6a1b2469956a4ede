"""Wan 2.1 / 2.2 text-to-video transformer checkpoints, loaded offline into diffusers' ``WanTransformer3DModel``.

Accepted: a single .safetensors file in the original Wan layout (``patch_embedding``,
``blocks.N.self_attn.q``, ``head.head``, ...) as ComfyUI users keep it in models/diffusion_models
(e.g. wan2.1_t2v_1.3B_fp16.safetensors, one expert of Wan 2.2 14B T2V), with or without
ComfyUI's ``model.diffusion_model.`` prefix; a single file in diffusers' key layout; and a
diffusers folder (plain, sharded, or a pipeline folder with a ``transformer/`` subfolder).

The key mapping is diffusers' own Wan converter (``convert_wan_transformer_to_diffusers``), first
run on meta tensors with the header shapes, so a file that does not fit is refused before any
weight is read. The config is inferred from shapes (no hub); the head width is 128 in every Wan
release, which ComfyUI assumes too (the q/k norms span all heads, so shapes cannot tell it).

Refused by name: image-to-video and first-last-frame files (an image embedder), VACE and the
other conditioned variants, and Wan 2.2 TI2V 5B (48-channel latent of another VAE).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .checkpoint_files import DIFFUSERS_LAYOUT, ConvertedCheckpoint, detect_layout
from .safetensors_files import CheckpointError, assign_weights
from .sd3 import _count_blocks

WAN_LAYOUT = "wan"
WAN_HEAD_DIM = 128
WAN_LATENT_CHANNELS = 16

WAN_SIGNATURES = {
    WAN_LAYOUT: (
        "head.modulation",
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.0.weight",
        "time_projection.1.weight",
        "blocks.0.self_attn.q.weight",
        "head.head.weight",
    ),
    DIFFUSERS_LAYOUT: (
        "condition_embedder.time_proj.weight",
        "patch_embedding.weight",
        "condition_embedder.text_embedder.linear_1.weight",
        "condition_embedder.time_embedder.linear_1.weight",
        "blocks.0.attn1.to_q.weight",
        "proj_out.weight",
        "scale_shift_table",
    ),
}

# (key present in the Wan layout, in the diffusers layout) -> what the file is, for the refusal.
_UNSUPPORTED_VARIANTS = (
    (("img_emb.proj.0.weight", "condition_embedder.image_embedder.norm1.weight"),
     "a Wan image-to-video (or first-last-frame) model; only text-to-video Wan models are supported"),
    (("vace_patch_embedding.weight", "vace_patch_embedding.weight"), "a Wan VACE model; only text-to-video Wan models are supported"),
    (("control_adapter.conv.weight", "control_adapter.conv.weight"), "a Wan camera-control model; only text-to-video Wan models are supported"),
    (("face_adapter.fuser_blocks.0.k_norm.weight", "face_adapter.fuser_blocks.0.norm_k.weight"),
     "a Wan Animate model; only text-to-video Wan models are supported"),
)


def _detect_layout(keys) -> tuple[str, str]:
    return detect_layout(keys, WAN_SIGNATURES, "Wan 2.1 / 2.2", {WAN_LAYOUT: "Wan / ComfyUI", DIFFUSERS_LAYOUT: "diffusers"})



def _infer_config(shape, keys: list[str], layout: str) -> dict:
    """The diffusers config, from shapes in the headers only."""
    wan = layout == WAN_LAYOUT
    for names, what in _UNSUPPORTED_VARIANTS:
        if names[0 if wan else 1] in keys:
            raise CheckpointError(f"this is {what}")
    dim, in_channels, *patch_size = shape("patch_embedding.weight")
    if len(patch_size) != 3:
        raise CheckpointError(f"patch_embedding.weight has shape {shape('patch_embedding.weight')}, not a 3D patch embedding")
    out_channels = shape("head.head.weight" if wan else "proj_out.weight")[0] // math.prod(patch_size)
    if (in_channels, out_channels) != (WAN_LATENT_CHANNELS, WAN_LATENT_CHANNELS):
        if 48 in (in_channels, out_channels):
            raise CheckpointError("this is Wan 2.2 TI2V 5B (48-channel latent of the Wan 2.2 VAE), which is not supported "
                                  "yet; use a Wan 2.1 model or a Wan 2.2 14B T2V expert")
        raise CheckpointError(f"the model takes {in_channels} latent channels and makes {out_channels}; text-to-video Wan "
                              f"models take {WAN_LATENT_CHANNELS}")
    prefix = "blocks.0."
    return {
        "patch_size": tuple(patch_size),
        # Wan's head width; a diffusers folder's config may say otherwise (checked in _check_heads).
        "num_attention_heads": dim // WAN_HEAD_DIM,
        "attention_head_dim": WAN_HEAD_DIM,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "text_dim": shape("text_embedding.0.weight" if wan else "condition_embedder.text_embedder.linear_1.weight")[1],
        "freq_dim": shape("time_embedding.0.weight" if wan else "condition_embedder.time_embedder.linear_1.weight")[1],
        "ffn_dim": shape(prefix + ("ffn.0.weight" if wan else "ffn.net.0.proj.weight"))[0],
        "num_layers": _count_blocks(keys, r"blocks\.(\d+)\."),
        # The original Wan's norm3 is the cross-attention norm (diffusers calls it norm2).
        "cross_attn_norm": prefix + ("norm3.weight" if wan else "norm2.weight") in keys,
    }


def _merge_folder_config(config: dict, config_path: Path) -> dict:
    """Check a diffusers folder's config.json against the shapes; keep what shapes cannot tell (the heads)."""
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    class_name = stored.get("_class_name")
    if class_name not in (None, "WanTransformer3DModel"):
        raise CheckpointError(f"{config_path}: the folder holds a {class_name}, not a WanTransformer3DModel")
    for name in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if stored.get(name) is not None:
            raise CheckpointError(f"{config_path}: {name} is set: an image-conditioned Wan model; only text-to-video "
                                  "Wan models are supported")
    merged = dict(config)
    for name, inferred in config.items():
        if name not in stored:
            continue
        value = tuple(stored[name]) if isinstance(stored[name], list) else stored[name]
        if name in ("attention_head_dim", "num_attention_heads"):
            merged[name] = value  # the shapes only tell their product
        elif value != inferred:
            raise CheckpointError(f"{config_path}: {name} is {stored[name]!r} but the weights say {inferred!r}")
    for name in ("eps", "rope_max_seq_len", "qk_norm"):
        if name in stored:
            merged[name] = stored[name]
    return merged


def _check_heads(config: dict, width: int) -> None:
    if config["attention_head_dim"] * config["num_attention_heads"] != width:
        raise CheckpointError(f"model width {width} is not {config['num_attention_heads']} heads x {config['attention_head_dim']} "
                              f"(Wan's heads are {WAN_HEAD_DIM} wide; a diffusers folder's config.json may say otherwise)")


def _meta_model(config: dict):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(**config)


def _convert(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' Wan converter (it renames every key it is given; unknown ones surface as unexpected)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(state_dict))


def _keeps_float32(name: str) -> bool:
    """diffusers keeps these Wan modules in float32 whatever the load dtype (its forward expects it)."""
    from diffusers import WanTransformer3DModel

    parts = name.split(".")
    return any(module in parts for module in WanTransformer3DModel._keep_in_fp32_modules)


class WanCheckpoint(ConvertedCheckpoint):
    """An opened Wan checkpoint: layout, config and key mapping checked, no weight read yet."""

    describes = "a Wan text-to-video transformer"
    names_note = "; diffusers names"

    def _open(self, config_path: Path | None) -> None:
        self.layout, self.prefix = _detect_layout(self.source.keys())
        self.weight_keys = self.weight_names()
        config = _infer_config(self.shape, self.weight_keys, self.layout)
        if config_path is not None:
            config = _merge_folder_config(config, config_path)
        _check_heads(config, self.shape("patch_embedding.weight")[0])
        self.config = config
        self._validate()

    def convert_original(self, state_dict):
        return _convert(state_dict), []

    def meta_model(self):
        return _meta_model(self.config)

    def load_dtype(self, name, dtype):
        return torch.float32 if _keeps_float32(name) else dtype


def read_wan_config(path: str | Path) -> dict:
    """The inferred ``WanTransformer3DModel`` config, from headers only (for early validation)."""
    with WanCheckpoint(path) as checkpoint:
        return dict(checkpoint.config)


def wan_transformer_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], device: str | torch.device = "cpu"):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    model = _meta_model(config)
    # The rotary tables are computed buffers, not weights: build them for real.
    model.rope = WanRotaryPosEmbed(model.config.attention_head_dim, model.config.patch_size,
                                   model.config.rope_max_seq_len).to(device)
    return assign_weights(model, state_dict, f"WanTransformer3DModel({config})")


def load_wan_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    """Load a Wan 2.1 / 2.2 text-to-video transformer from a single file or a diffusers folder, fully offline."""
    with WanCheckpoint(path) as checkpoint:
        return wan_transformer_from_state_dict(checkpoint.config, checkpoint.state_dict(dtype=dtype, device=device), device)
