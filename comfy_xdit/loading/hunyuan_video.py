"""HunyuanVideo 1.0 text-to-video transformer checkpoints, loaded offline into diffusers' ``HunyuanVideoTransformer3DModel``.

Accepted: a single .safetensors file in the original HunyuanVideo layout (``img_in.proj``,
``double_blocks.N.img_attn_qkv``, ``single_blocks.N.linear1``, ``txt_in.individual_token_refiner``,
...) as ComfyUI users keep it in models/diffusion_models (e.g. hunyuan_video_t2v_720p_bf16.safetensors),
with or without ComfyUI's ``model.diffusion_model.`` prefix; a single file in diffusers' key layout;
and a diffusers folder (plain, sharded, or a pipeline folder with a ``transformer/`` subfolder).

The key mapping is diffusers' own HunyuanVideo converter
(``convert_hunyuan_video_transformer_to_diffusers``), first run on meta tensors with the header
shapes, so a file that does not fit is refused before any weight is read. That converter splits
the single-stream blocks' fused ``linear1`` at a hard-coded width of 3072 (the released model's);
those tensors are split here at the file's own width and handed over already in diffusers' names,
so narrower files (and the tests' tiny ones) convert too. The config is inferred from shapes (no
hub); the head width is 128 and the rotary axes (16, 56, 56), which ComfyUI pins too.

Refused by name: image-to-video files (33 or 32 latent input channels: HunyuanVideo I2V,
SkyReels I2V), HunyuanVideo 1.5 (ByT5 / vision inputs, mean-flow), HunyuanImage 2.1 (2-D patches).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .checkpoint_files import DIFFUSERS_LAYOUT, ConvertedCheckpoint, detect_layout
from .safetensors_files import CheckpointError, assign_weights
from .sd3 import _count_blocks

HUNYUAN_LAYOUT = "hunyuan"
HEAD_DIM = 128
ROPE_AXES = (16, 56, 56)
LATENT_CHANNELS = 16

HUNYUAN_VIDEO_SIGNATURES = {
    HUNYUAN_LAYOUT: (
        "img_in.proj.weight",
        "txt_in.input_embedder.weight",
        "txt_in.individual_token_refiner.blocks.0.norm1.weight",
        "time_in.mlp.0.weight",
        "double_blocks.0.img_attn_qkv.weight",
        "final_layer.linear.weight",
    ),
    DIFFUSERS_LAYOUT: (
        "x_embedder.proj.weight",
        "context_embedder.proj_in.weight",
        "context_embedder.token_refiner.refiner_blocks.0.norm1.weight",
        "time_text_embed.timestep_embedder.linear_1.weight",
        "transformer_blocks.0.attn.to_q.weight",
        "proj_out.weight",
    ),
}

# (key in the original layout, in the diffusers layout) -> what the file is, for the refusal.
_UNSUPPORTED_VARIANTS = (
    (("byt5_in.fc1.weight", "context_embedder_2.linear_1.weight"), "HunyuanVideo 1.5 (ByT5 text input)"),
    (("cond_type_embedding.weight", "cond_type_embed.weight"), "HunyuanVideo 1.5"),
    (("vision_in.proj.0.weight", "image_embedder.linear_1.weight"), "HunyuanVideo 1.5 image-to-video"),
    (("time_r_in.mlp.0.weight", "time_r_in.mlp.0.weight"), "a HunyuanVideo 1.5 mean-flow (distilled) model"),
)
_ONLY_T2V = "; only HunyuanVideo 1.0 text-to-video models are supported"


def _detect_layout(keys) -> tuple[str, str]:
    return detect_layout(keys, HUNYUAN_VIDEO_SIGNATURES, "HunyuanVideo", {HUNYUAN_LAYOUT: "original / ComfyUI", DIFFUSERS_LAYOUT: "diffusers"})



def _infer_config(shape, keys: list[str], layout: str) -> dict:
    """The diffusers config, from shapes in the headers only."""
    original = layout == HUNYUAN_LAYOUT
    for names, what in _UNSUPPORTED_VARIANTS:
        if names[0 if original else 1] in keys:
            raise CheckpointError(f"this is {what}{_ONLY_T2V}")
    patch_key = "img_in.proj.weight" if original else "x_embedder.proj.weight"
    dim, in_channels, *patch = shape(patch_key)
    if len(patch) != 3:
        raise CheckpointError(f"{patch_key} has shape {shape(patch_key)}: 2-D patches (HunyuanImage 2.1?){_ONLY_T2V}")
    if patch[1] != patch[2]:
        raise CheckpointError(f"{patch_key} has non-square spatial patches {patch[1:]}")
    out_channels = shape("final_layer.linear.weight" if original else "proj_out.weight")[0] // math.prod(patch)
    if in_channels != LATENT_CHANNELS:
        kind = {33: "HunyuanVideo image-to-video", 32: "SkyReels image-to-video"}.get(in_channels)
        what = f"a {kind} model" if kind else f"a model taking {in_channels} latent channels"
        raise CheckpointError(f"this is {what} (text-to-video takes {LATENT_CHANNELS}){_ONLY_T2V}")
    if original:
        text_dim = shape("txt_in.input_embedder.weight")[1]
        pooled_dim = shape("vector_in.in_layer.weight")[1] if "vector_in.in_layer.weight" in keys else None
        ffn = shape("double_blocks.0.img_mlp.fc1.weight")[0] if "double_blocks.0.img_mlp.fc1.weight" in keys else None
        guidance = "guidance_in.mlp.0.weight" in keys
        counts = (r"double_blocks\.(\d+)\.", r"single_blocks\.(\d+)\.", r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.")
    else:
        text_dim = shape("context_embedder.proj_in.weight")[1]
        pooled_key = "time_text_embed.text_embedder.linear_1.weight"
        pooled_dim = shape(pooled_key)[1] if pooled_key in keys else None
        ffn_key = "transformer_blocks.0.ff.net.0.proj.weight"
        ffn = shape(ffn_key)[0] if ffn_key in keys else None
        guidance = "time_text_embed.guidance_embedder.linear_1.weight" in keys
        counts = (r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\.",
                  r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.")
    if pooled_dim is None:
        raise CheckpointError("the file has no pooled-text (CLIP-L) input (vector_in): not a HunyuanVideo 1.0 model")
    num_layers, num_single_layers, num_refiner_layers = (_count_blocks(keys, pattern) for pattern in counts)
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        # HunyuanVideo's head width; a diffusers folder's config may say otherwise (checked in _check_heads).
        "num_attention_heads": dim // HEAD_DIM,
        "attention_head_dim": HEAD_DIM,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "num_refiner_layers": num_refiner_layers,
        "mlp_ratio": ffn / dim if ffn is not None else 4.0,
        "patch_size": patch[1],
        "patch_size_t": patch[0],
        "guidance_embeds": guidance,
        "text_embed_dim": text_dim,
        "pooled_projection_dim": pooled_dim,
        "rope_axes_dim": ROPE_AXES,
    }


def _merge_folder_config(config: dict, config_path: Path) -> dict:
    """Check a diffusers folder's config.json against the shapes; keep what shapes cannot tell (heads, rotary axes)."""
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    class_name = stored.get("_class_name")
    if class_name not in (None, "HunyuanVideoTransformer3DModel"):
        raise CheckpointError(f"{config_path}: the folder holds a {class_name}, not a HunyuanVideoTransformer3DModel")
    if stored.get("image_condition_type") is not None:
        raise CheckpointError(f"{config_path}: image_condition_type is {stored['image_condition_type']!r}: an "
                              f"image-to-video model{_ONLY_T2V}")
    merged = dict(config)
    for name, inferred in config.items():
        if name not in stored:
            continue
        value = tuple(stored[name]) if isinstance(stored[name], list) else stored[name]
        if name in ("attention_head_dim", "num_attention_heads", "rope_axes_dim"):
            merged[name] = value  # the shapes only tell the heads' product; the axes not at all
        elif value != inferred:
            raise CheckpointError(f"{config_path}: {name} is {stored[name]!r} but the weights say {inferred!r}")
    for name in ("qk_norm", "rope_theta"):
        if name in stored:
            merged[name] = stored[name]
    return merged


def _check_heads(config: dict, width: int) -> None:
    if config["attention_head_dim"] * config["num_attention_heads"] != width:
        raise CheckpointError(f"model width {width} is not {config['num_attention_heads']} heads x {config['attention_head_dim']} "
                              f"(HunyuanVideo's heads are {HEAD_DIM} wide; a diffusers folder's config.json may say otherwise)")
    if sum(config["rope_axes_dim"]) != config["attention_head_dim"]:
        raise CheckpointError(f"rotary axes {tuple(config['rope_axes_dim'])} do not add up to the head width "
                              f"{config['attention_head_dim']}")


def _meta_model(config: dict):
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        return HunyuanVideoTransformer3DModel(**config)


def _split_single_stream_linear1(state_dict: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """single_blocks.N.linear1 (q, k, v, mlp fused) -> diffusers' names, split at this model's width."""
    out = {}
    for key, tensor in state_dict.items():
        if not (key.startswith("single_blocks.") and ".linear1." in key):
            out[key] = tensor
            continue
        block, kind = key.split(".linear1.")
        target = block.replace("single_blocks", "single_transformer_blocks")
        sizes = (width, width, width, tensor.shape[0] - 3 * width)
        for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), torch.split(tensor, sizes, dim=0)):
            out[f"{target}.{name}.{kind}"] = part
    return out


def _convert(state_dict: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """diffusers' HunyuanVideo converter (it renames every key it is given; unknown ones surface as unexpected)."""
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    return convert_hunyuan_video_transformer_to_diffusers(_split_single_stream_linear1(state_dict, width))


class HunyuanVideoCheckpoint(ConvertedCheckpoint):
    """An opened HunyuanVideo checkpoint: layout, config and key mapping checked, no weight read yet."""

    describes = "a HunyuanVideo text-to-video transformer"
    names_note = "; diffusers names"

    def _open(self, config_path: Path | None) -> None:
        self.layout, self.prefix = _detect_layout(self.source.keys())
        self.weight_keys = self.weight_names()
        config = _infer_config(self.shape, self.weight_keys, self.layout)
        if config_path is not None:
            config = _merge_folder_config(config, config_path)
        self.width = self.shape(("img_in" if self.layout == HUNYUAN_LAYOUT else "x_embedder") + ".proj.weight")[0]
        _check_heads(config, self.width)
        self.config = config
        self._validate()

    def convert_original(self, state_dict):
        return _convert(state_dict, self.width), []

    def meta_model(self):
        return _meta_model(self.config)


def read_hunyuan_video_config(path: str | Path) -> dict:
    """The inferred ``HunyuanVideoTransformer3DModel`` config, from headers only (for early validation)."""
    with HunyuanVideoCheckpoint(path) as checkpoint:
        return dict(checkpoint.config)


def hunyuan_video_transformer_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor]):
    # The model has no computed buffers (its rotary tables are made per call), so meta + assign is complete.
    return assign_weights(_meta_model(config), state_dict, f"HunyuanVideoTransformer3DModel({config})")


def load_hunyuan_video_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    """Load a HunyuanVideo 1.0 text-to-video transformer from a single file or a diffusers folder, fully offline."""
    with HunyuanVideoCheckpoint(path) as checkpoint:
        return hunyuan_video_transformer_from_state_dict(checkpoint.config, checkpoint.state_dict(dtype=dtype, device=device))
