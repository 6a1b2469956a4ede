"""Load one tensor-parallel rank's model: its slices of the split weights, read straight from the file.

The model is built on the meta device and split there (local shapes, no memory); each split
weight is then read as the rank's rows or columns of the file's tensor (``get_part`` reads only
those bytes), and every other tensor whole. A rank never holds a whole split weight, not even
for a moment, so the peak memory of a load is the rank's share.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..models.tensor_parallel import ShardSpec, param_shards, plan_for, shard_model
from .checkpoint_files import as_load_dtype


def read_shard(checkpoint, target: str, spec: ShardSpec, rank: int, degree: int) -> torch.Tensor:
    """This rank's slice of one diffusers tensor, read from the rows of the file tensor it comes from."""
    source, first_row, rows = checkpoint.locate(target)
    parts = []
    for start, stop in spec.pieces(rank, degree):
        if spec.dim == 0:
            parts.append(checkpoint.read_part(source, (first_row + start, first_row + stop)))
        else:
            parts.append(checkpoint.read_part(source, (first_row, first_row + rows), (start, stop)))
    return torch.cat(parts, dim=spec.dim) if len(parts) > 1 else parts[0]


def _family_loading(family: str):
    """(open checkpoint, meta model from config, build from state dict) of a family."""
    if family == "flux":
        from .flux import FluxCheckpoint, _meta_model, flux_transformer_from_state_dict

        return FluxCheckpoint, _meta_model, flux_transformer_from_state_dict
    if family == "sd3":
        from .sd3 import SD3Checkpoint, _meta_model, sd3_transformer_from_state_dict

        return SD3Checkpoint, _meta_model, sd3_transformer_from_state_dict
    raise ValueError(f"tensor-parallel loading is not supported for the {family} family")


def load_tensor_parallel(family: str, path: str | Path, group: dist.ProcessGroup, dtype=torch.bfloat16,
                         device: str | torch.device = "cpu") -> torch.nn.Module:
    """This rank's split model of a checkpoint (a file or a diffusers folder), fully offline."""
    plan = plan_for(family)
    open_checkpoint, meta_model, from_state_dict = _family_loading(family)
    degree, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype = as_load_dtype(dtype)
    with open_checkpoint(path) as checkpoint:
        specs = param_shards(meta_model(checkpoint.config), plan, degree)
        state_dict = checkpoint.state_dict(dtype=dtype, device=device, include=lambda name: name not in specs)
        for name, spec in specs.items():
            state_dict[name] = read_shard(checkpoint, name, spec, rank, degree).to(dtype).to(device).contiguous()
        return from_state_dict(checkpoint.config, state_dict, prepare=lambda model: shard_model(model, plan, group))
