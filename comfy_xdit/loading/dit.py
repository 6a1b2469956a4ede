"""DiT (facebook/DiT-XL-2-256 layout) checkpoints, loaded offline into diffusers' ``DiTTransformer2DModel``.

Accepted: a diffusers folder (a pipeline folder with ``transformer/`` and ``scheduler/``, as
facebook/DiT-XL-2-256 ships it; its transformer config may still name the older
``Transformer2DModel`` with adaLN-zero, which diffusers maps to DiTTransformer2DModel), and a single
.safetensors file of the transformer in diffusers' key layout. The original DiT release is a
pickle (.pt) and is not read.

A single file carries no config; it is inferred from the shapes in the headers:
- width, input channels and patch size from the patch embedding, output channels (8: learned
  sigma) from the output projection, depth from the block indices, the class count from the
  label table (1,000 ImageNet classes plus the null class);
- heads: 16 at width 1152 (DiT-XL), else width / 64 (DiT-S/B/L: head width 64), as in the DiT paper;
- sample size 32 (the 256 px model). The 512 px model needs its folder, whose config.json says 64:
  the positional embedding's base size depends on it.
The sampling schedule comes from the folder's scheduler (sampling/diffusers_schedulers.py); a
single file gets DIT_DEFAULT_SCHEDULER.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import torch

from .checkpoint_files import (
    DIFFUSERS_LAYOUT, TransformerCheckpoint, as_load_dtype, refuse_key_mismatch, refuse_quantized, refuse_shape_mismatch,
)
from .diffusers_folders import folder_of_weights_file
from .safetensors_files import CheckpointError, assign_weights, find_layouts

DIT_SIGNATURES = {
    DIFFUSERS_LAYOUT: (
        "pos_embed.proj.weight",
        "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
        "proj_out_1.weight",
        "proj_out_2.weight",
    ),
}
DIT_XL_WIDTH, DIT_XL_HEADS, DIT_HEAD_WIDTH = 1152, 16, 64
DEFAULT_SAMPLE_SIZE = 32  # DiT-XL-2-256: 256 px / 8
# DiT's training schedule (linear betas 1e-4 to 0.02 over 1,000 steps, eps prediction) with
# diffusers' DDIM, for a single file that comes without a scheduler folder.
DIT_DEFAULT_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
}
FOLDER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def _dit_init_names() -> set[str]:
    from diffusers import DiTTransformer2DModel

    return set(inspect.signature(DiTTransformer2DModel.__init__).parameters) - {"self"}


def _count_blocks(keys) -> int:
    indices = sorted({int(m.group(1)) for k in keys if (m := _BLOCK.match(k))})
    if indices != list(range(len(indices))):
        raise CheckpointError(f"block indices are not contiguous: transformer_blocks has {indices}")
    return len(indices)


def _infer_config(shape, keys: list[str]) -> dict:
    width, in_channels, patch, _ = shape("pos_embed.proj.weight")
    if width == DIT_XL_WIDTH:
        heads = DIT_XL_HEADS
    elif width % DIT_HEAD_WIDTH == 0:
        heads = width // DIT_HEAD_WIDTH
    else:
        raise CheckpointError(f"model width {width} is neither DiT-XL's {DIT_XL_WIDTH} nor a multiple of {DIT_HEAD_WIDTH}: "
                              "the head count cannot be inferred from a single file; use the diffusers folder "
                              "(its transformer/config.json says it)")
    return {
        "num_attention_heads": heads,
        "attention_head_dim": width // heads,
        "in_channels": in_channels,
        "out_channels": shape("proj_out_2.weight")[0] // (patch * patch),
        "num_layers": _count_blocks(keys),
        "patch_size": patch,
        "sample_size": DEFAULT_SAMPLE_SIZE,
        # the label table holds the classes and the null class (DiT trains with label dropout)
        "num_embeds_ada_norm": shape("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight")[0] - 1,
        "attention_bias": "transformer_blocks.0.attn1.to_q.bias" in keys,
    }


def _folder_config(config_path: Path) -> dict:
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
    class_name = stored.get("_class_name")
    if class_name not in FOLDER_CLASSES or stored.get("norm_type", "ada_norm_zero") != "ada_norm_zero" \
            or stored.get("patch_size") is None:
        raise CheckpointError(f"{config_path}: the folder holds a {class_name} (norm_type {stored.get('norm_type')!r}), "
                              "not a DiT transformer (DiTTransformer2DModel, or Transformer2DModel with adaLN-zero and patches)")
    names = _dit_init_names()
    return {k: v for k, v in stored.items() if k in names}


def _meta_model(config: dict):
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        return DiTTransformer2DModel(**config)


class DiTCheckpoint(TransformerCheckpoint):
    """An opened DiT checkpoint: config and keys checked against the model, no weight read yet."""

    def _open(self, config_path: Path | None) -> None:
        found = find_layouts(self.source.keys(), DIT_SIGNATURES)
        if len(found) != 1:
            raise CheckpointError("not a DiT transformer checkpoint in diffusers' layout: expected "
                                  f"{' + '.join(DIT_SIGNATURES[DIFFUSERS_LAYOUT][:2])}"
                                  + ("" if not found else f" once, found {sorted(found)}"))
        _, self.prefix = found[0]
        keys = self.unprefixed_keys()
        self.weight_keys = sorted(keys)
        self.config = _folder_config(config_path) if config_path is not None else _infer_config(self.shape, keys)
        refuse_quantized(self.source, [self.prefix + k for k in self.weight_keys], use="use a bf16, fp16 or fp32 file")
        expected = {k: tuple(v.shape) for k, v in _meta_model(self.config).state_dict().items()}
        refuse_key_mismatch(expected, self.weight_keys, f"a DiT transformer with config {self.config}")
        refuse_shape_mismatch({k: self.shape(k) for k in self.weight_keys}, expected, naming="")

    def state_dict(self, dtype=torch.float32, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        dtype = as_load_dtype(dtype)
        return {k: self._read(k).to(device=device, dtype=dtype) for k in self.weight_keys}


def read_dit_config(path: str | Path) -> dict:
    """The ``DiTTransformer2DModel`` config, from headers (and the folder's config.json) only."""
    with DiTCheckpoint(folder_of_weights_file(path)) as checkpoint:
        return dict(checkpoint.config)


def load_dit_transformer(path: str | Path, dtype=torch.float32, device: str | torch.device = "cpu"):
    """Load a DiT transformer from a diffusers folder or a single diffusers-layout file, fully offline."""
    from .pixart import _materialize_pos_embed

    with DiTCheckpoint(folder_of_weights_file(path)) as checkpoint:
        config = checkpoint.config
        model = _meta_model(config)
        _materialize_pos_embed(model, device)  # a non-persistent buffer: not in the file
        return assign_weights(model, checkpoint.state_dict(dtype=dtype, device=device), f"DiTTransformer2DModel({config})")
