"""ConsisID transformers from their diffusers folder, loaded offline into ``ConsisIDTransformer3DModel``.

The format is the diffusers folder (BestWishYsh/ConsisID-preview layout: ``transformer/`` +
``scheduler/`` + ``vae/``): core ComfyUI has no ConsisID. The folder's config.json is checked
against the weights' shapes before any weight is read. Models with keypoint conditioning
(``is_kps``) are refused by name: the face keypoints need the face detector this pack does not run.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from .checkpoint_files import TransformerCheckpoint, as_load_dtype, refuse_key_mismatch, refuse_quantized, refuse_shape_mismatch
from .diffusers_folders import folder_of_weights_file
from .safetensors_files import CheckpointError, assign_weights

CONSISID_CLASS = "ConsisIDTransformer3DModel"
CONSISID_SIGNATURES = {
    "diffusers": (
        "patch_embed.proj.weight",
        "transformer_blocks.0.attn1.norm_q.weight",
        "local_facial_extractor.latents",
        "perceiver_cross_attention.0.to_q.weight",
        "norm_final.weight",
    ),
}


def _init_names() -> set[str]:
    from diffusers import ConsisIDTransformer3DModel

    return set(inspect.signature(ConsisIDTransformer3DModel.__init__).parameters) - {"self"}


def _folder_config(config_path: Path | None) -> dict:
    if config_path is None:
        raise CheckpointError("ConsisID loads from its diffusers folder (transformer/config.json beside the weights); "
                              "point the loader at the folder, not a single file")
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    if stored.get("_class_name") != CONSISID_CLASS:
        raise CheckpointError(f"{config_path}: the folder holds a {stored.get('_class_name')}, not a {CONSISID_CLASS}")
    config = {k: v for k, v in stored.items() if k in _init_names()}
    if config.get("is_kps"):
        raise CheckpointError(f"{config_path}: ConsisID with face keypoint conditioning (is_kps) is not supported; "
                              "use ConsisID-preview (is_kps false)")
    return config


def _meta_model(config: dict):
    from diffusers import ConsisIDTransformer3DModel

    with torch.device("meta"):
        return ConsisIDTransformer3DModel(**config)


class ConsisIDCheckpoint(TransformerCheckpoint):
    def _open(self, config_path: Path | None) -> None:
        self.config = _folder_config(config_path)
        self.weight_keys = sorted(self.source.keys())
        refuse_quantized(self.source, self.weight_keys, use="use a bf16, fp16 or fp32 folder")
        expected = {k: tuple(v.shape) for k, v in _meta_model(self.config).state_dict().items()}
        refuse_key_mismatch(expected, self.weight_keys, f"a {CONSISID_CLASS} with its config.json")
        refuse_shape_mismatch({k: self.shape(k) for k in self.weight_keys}, expected, naming="")


def read_consisid_config(path: str | Path) -> dict:
    with ConsisIDCheckpoint(folder_of_weights_file(path)) as checkpoint:
        return dict(checkpoint.config)


def load_consisid_transformer(path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu"):
    dtype = as_load_dtype(dtype)
    with ConsisIDCheckpoint(folder_of_weights_file(path)) as checkpoint:
        model = _meta_model(checkpoint.config)
        embed = model.patch_embed
        if embed.use_positional_embeddings and not embed.use_learned_positional_embeddings:
            # a sin-cos table is a non-persistent buffer: computed, not read (ConsisID-preview uses rotary)
            table = embed._get_positional_embeddings(embed.sample_height, embed.sample_width, embed.sample_frames, device=device)
            embed.register_buffer("pos_embedding", table, persistent=False)
        weights = {k: checkpoint._read(k).to(device=device, dtype=dtype) for k in checkpoint.weight_keys}
        return assign_weights(model, weights, f"{CONSISID_CLASS}({checkpoint.config})")
