"""CogVideoX transformers from their diffusers folder, loaded offline into ``CogVideoXTransformer3DModel``.

Only the diffusers folder (THUDM/CogVideoX-2b / -5b layout: ``transformer/`` + ``scheduler/``) is a
format here: core ComfyUI has no CogVideoX, so there is no other file layout users have. The
folder's config.json is checked against the weights' shapes before any weight is read. CogVideoX
1.0 (2b, 5b) and 1.5 (THUDM/CogVideoX1.5-5B: ``patch_size_t`` 2) text-to-video load; image-to-video
(32 input channels, 1.5-I2V's ofs embedding) is refused by name.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from .checkpoint_files import TransformerCheckpoint, as_load_dtype, refuse_key_mismatch, refuse_quantized, refuse_shape_mismatch
from .diffusers_folders import folder_of_weights_file
from .safetensors_files import CheckpointError, assign_weights

COGVIDEOX_CLASS = "CogVideoXTransformer3DModel"
COGVIDEOX_SIGNATURES = {
    "diffusers": (
        "patch_embed.text_proj.weight",
        "patch_embed.proj.weight",
        "transformer_blocks.0.norm1.linear.weight",
        "transformer_blocks.0.attn1.norm_q.weight",
        "norm_final.weight",
    ),
}


def _init_names() -> set[str]:
    from diffusers import CogVideoXTransformer3DModel

    return set(inspect.signature(CogVideoXTransformer3DModel.__init__).parameters) - {"self"}


def _folder_config(config_path: Path | None) -> dict:
    if config_path is None:
        raise CheckpointError("CogVideoX loads from its diffusers folder (transformer/config.json beside the weights); "
                              "point the loader at the folder, not a single file")
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    if stored.get("_class_name") != COGVIDEOX_CLASS:
        raise CheckpointError(f"{config_path}: the folder holds a {stored.get('_class_name')}, not a {COGVIDEOX_CLASS}")
    config = {k: v for k, v in stored.items() if k in _init_names()}
    if config.get("ofs_embed_dim") is not None or config.get("in_channels", 16) != config.get("out_channels", 16):
        version = "1.5" if config.get("patch_size_t") is not None else "1.0"
        raise CheckpointError(f"{config_path}: CogVideoX {version} image-to-video ({config.get('in_channels')} input "
                              "channels: the noise and the image's latent) is not supported yet; use a text-to-video "
                              "model (CogVideoX-2b, -5b or CogVideoX1.5-5B)")
    return config


def _meta_model(config: dict):
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        return CogVideoXTransformer3DModel(**config)


class CogVideoXCheckpoint(TransformerCheckpoint):
    def _open(self, config_path: Path | None) -> None:
        self.config = _folder_config(config_path)
        self.weight_keys = sorted(self.source.keys())
        refuse_quantized(self.source, self.weight_keys, use="use a bf16, fp16 or fp32 folder")
        expected = {k: tuple(v.shape) for k, v in _meta_model(self.config).state_dict().items()}
        refuse_key_mismatch(expected, self.weight_keys, f"a {COGVIDEOX_CLASS} with its config.json")
        refuse_shape_mismatch({k: self.shape(k) for k in self.weight_keys}, expected, naming="")


def read_cogvideox_config(path: str | Path) -> dict:
    with CogVideoXCheckpoint(folder_of_weights_file(path)) as checkpoint:
        return dict(checkpoint.config)


def load_cogvideox_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    dtype = as_load_dtype(dtype)
    with CogVideoXCheckpoint(folder_of_weights_file(path)) as checkpoint:
        model = _meta_model(checkpoint.config)
        embed = model.patch_embed
        if embed.use_positional_embeddings and not embed.use_learned_positional_embeddings:
            # CogVideoX-2b's sin-cos table is a non-persistent buffer: computed, not read.
            table = embed._get_positional_embeddings(embed.sample_height, embed.sample_width, embed.sample_frames, device=device)
            embed.register_buffer("pos_embedding", table, persistent=False)
        weights = {k: checkpoint._read(k).to(device=device, dtype=dtype) for k in checkpoint.weight_keys}
        return assign_weights(model, weights, f"{COGVIDEOX_CLASS}({checkpoint.config})")
