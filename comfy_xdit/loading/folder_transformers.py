"""One loader for the families whose only format is their diffusers folder (CogVideoX, ConsisID, Latte).

Core ComfyUI has none of these families, so the folder (``transformer/config.json`` beside its
safetensors shards) is the file users have. Loading is the same for all of them: the config is
read and checked (the class it names, then what the family refuses), a meta model is built from
it, the weights' keys and shapes are checked against that model before any weight is read, the
sin-cos tables diffusers keeps as non-persistent buffers are computed, not read, and the weights
are assigned. A family says only its class, its refusals and its buffers.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_files import TransformerCheckpoint, as_load_dtype, refuse_key_mismatch, refuse_quantized, refuse_shape_mismatch
from .diffusers_folders import folder_of_weights_file
from .safetensors_files import CheckpointError, assign_weights


def _accept(config_path: Path, config: dict) -> None:
    return None


def _no_buffers(model: torch.nn.Module, device) -> None:
    return None


@dataclass(frozen=True)
class FolderTransformer:
    name: str  # the family in messages, e.g. "CogVideoX"
    class_name: str  # the diffusers model class the folder's config.json must name
    # (config.json path, the config's init arguments) -> None; raises CheckpointError for what the family refuses
    check_config: Callable[[Path, dict], None] = _accept
    # (the meta model, the load device) -> None; rebuilds the non-persistent buffers on that device
    materialize_buffers: Callable[[torch.nn.Module, object], None] = _no_buffers

    def model_class(self):
        import diffusers

        return getattr(diffusers, self.class_name)

    def folder_config(self, config_path: Path | None) -> dict:
        if config_path is None:
            raise CheckpointError(f"{self.name} loads from its diffusers folder (transformer/config.json beside the "
                                  "weights); point the loader at the folder, not a single file")
        try:
            stored = json.loads(config_path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
        if stored.get("_class_name") != self.class_name:
            raise CheckpointError(f"{config_path}: the folder holds a {stored.get('_class_name')}, not a {self.class_name}")
        names = set(inspect.signature(self.model_class().__init__).parameters) - {"self"}
        config = {k: v for k, v in stored.items() if k in names}
        self.check_config(config_path, config)
        return config

    def meta_model(self, config: dict) -> torch.nn.Module:
        with torch.device("meta"):
            return self.model_class()(**config)

    def open(self, path: str | Path) -> "FolderCheckpoint":
        return FolderCheckpoint(folder_of_weights_file(path), self)

    def read_config(self, path: str | Path) -> dict:
        """The model's config, from the folder's config.json, checked against the weights' headers."""
        with self.open(path) as checkpoint:
            return dict(checkpoint.config)

    def load(self, path: str | Path, dtype=torch.bfloat16, device: str | torch.device = "cpu") -> torch.nn.Module:
        dtype = as_load_dtype(dtype)
        with self.open(path) as checkpoint:
            model = self.meta_model(checkpoint.config)
            self.materialize_buffers(model, device)
            weights = {k: checkpoint._read(k).to(device=device, dtype=dtype) for k in checkpoint.weight_keys}
            return assign_weights(model, weights, f"{self.class_name}({checkpoint.config})")


class FolderCheckpoint(TransformerCheckpoint):
    """An opened diffusers folder of a FolderTransformer family: config, keys and shapes checked, no weight read."""

    def __init__(self, path: str | Path, family: FolderTransformer):
        self.family = family
        super().__init__(path)

    def _open(self, config_path: Path | None) -> None:
        self.config = self.family.folder_config(config_path)
        self.weight_keys = sorted(self.source.keys())
        refuse_quantized(self.source, self.weight_keys, use="use a bf16, fp16 or fp32 folder")
        expected = {k: tuple(v.shape) for k, v in self.family.meta_model(self.config).state_dict().items()}
        refuse_key_mismatch(expected, self.weight_keys, f"a {self.family.class_name} with its config.json")
        refuse_shape_mismatch({k: self.shape(k) for k in self.weight_keys}, expected, naming="")


def sincos_patch_table(model: torch.nn.Module, device) -> None:
    """CogVideoX-2b's (and any sin-cos, non-learned) patch-embedding table: a non-persistent buffer, computed.
    Rotary models (CogVideoX-5b, 1.5, ConsisID-preview) have none."""
    embed = model.patch_embed
    if embed.use_positional_embeddings and not embed.use_learned_positional_embeddings:
        table = embed._get_positional_embeddings(embed.sample_height, embed.sample_width, embed.sample_frames, device=device)
        embed.register_buffer("pos_embedding", table, persistent=False)
