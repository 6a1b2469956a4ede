"""Offline checkpoint loading: safetensors only, configs inferred from tensor shapes, no hub."""

from .flux import (
    FluxCheckpoint,
    TensorRule,
    bfl_to_diffusers_rules,
    flux_axes_dims_rope,
    flux_transformer_from_state_dict,
    load_flux_transformer,
    open_flux_checkpoint,
    read_flux_config,
)
from .safetensors_files import CheckpointError, SafetensorsSource, find_weight_files

__all__ = [
    "CheckpointError",
    "FluxCheckpoint",
    "SafetensorsSource",
    "TensorRule",
    "bfl_to_diffusers_rules",
    "find_weight_files",
    "flux_axes_dims_rope",
    "flux_transformer_from_state_dict",
    "load_flux_transformer",
    "open_flux_checkpoint",
    "read_flux_config",
]
