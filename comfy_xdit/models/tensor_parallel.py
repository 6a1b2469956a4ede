"""Tensor parallelism (Megatron style) over an unchanged diffusers transformer.

Each block's attention heads and MLP columns are split over the ranks of the tensor group:
the input projections (q, k, v, the MLP's first linear) are column-parallel, each rank computing
its own heads / MLP columns from the whole (replicated) hidden states; the output projections
(attention out, MLP down) are row-parallel, each rank multiplying its part of the input by its
columns of the weight, and one all-reduce sums the parts. Everything else (adaLN modulation,
embedders, the qk RMSNorms, which normalise one head at a time) stays replicated, so the
hidden states between blocks are whole and identical on every rank.

A plan is data: which Linear modules are column- or row-parallel, and which attention modules
get their head count divided. ``shard_model`` applies it to a model with whole weights (scripts,
tests, benchmarks) or to a model on the meta device, whose local shapes the loader then fills
with slices read straight from the file (``param_shards`` says which slice each rank reads).

Why not torch's DTensor ``parallelize_module`` (what diffusers' own ``_tp_plan`` uses): diffusers
refuses it on CPU devices, so it could not be checked with gloo, and every op on a DTensor pays a
dispatch on the host; plain local tensors and one ``all_reduce`` per row-parallel output are what
Megatron does and what the attention kernels see unchanged.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError


@dataclass(frozen=True)
class ShardSpec:
    """How one parameter is split: along ``dim`` into ``parts`` (sizes) that are each split evenly.

    One part is the plain case. Several parts describe a fused dimension whose pieces are each
    split on their own (Flux's single-block proj_out reads cat(attention, MLP)): rank r then
    holds the r-th slice of every part, in part order, matching its column-parallel inputs.
    """

    dim: int
    parts: tuple[int, ...]

    def pieces(self, rank: int, degree: int) -> list[tuple[int, int]]:
        """(start, stop) ranges along ``dim`` that rank ``rank`` of ``degree`` holds, in order."""
        out, offset = [], 0
        for size in self.parts:
            chunk = size // degree
            out.append((offset + rank * chunk, offset + (rank + 1) * chunk))
            offset += size
        return out


@dataclass(frozen=True)
class TensorParallelPlan:
    # module-name globs (fnmatch, full names) of nn.Linear layers
    colwise: tuple[str, ...]  # split by output features: heads, MLP columns
    rowwise: tuple[str, ...]  # split by input features; outputs summed by one all-reduce, bias added once
    # rowwise layers whose input is a concatenation of column-split parts: glob -> (model config -> part sizes)
    packed_rowwise: dict[str, Callable[[dict], tuple[int, ...]]] = field(default_factory=dict)
    # attention modules whose ``heads`` becomes the local head count (processors that reshape by it)
    attention: tuple[str, ...] = ()


def _matches(name: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _planned_linears(model: nn.Module, plan: TensorParallelPlan):
    """(name, module, kind, parts or None) for every Linear the plan splits."""
    config = dict(model.config) if hasattr(model, "config") else {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, RowParallelLinear)):
            continue
        if _matches(name, plan.colwise):
            yield name, module, "colwise", None
        elif _matches(name, plan.rowwise):
            yield name, module, "rowwise", None
        else:
            for glob, parts in plan.packed_rowwise.items():
                if fnmatch.fnmatchcase(name, glob):
                    yield name, module, "rowwise", tuple(parts(config))
                    break


def param_shards(model: nn.Module, plan: TensorParallelPlan, degree: int) -> dict[str, ShardSpec]:
    """The split parameters of a (whole, possibly meta) model by state-dict name; refuses what does not divide."""
    specs = {}
    for name, module, kind, parts in _planned_linears(model, plan):
        out_features, in_features = module.weight.shape
        if kind == "colwise":
            spec = ShardSpec(0, (out_features,))
        else:
            spec = ShardSpec(1, parts or (in_features,))
            if sum(spec.parts) != in_features:
                raise ValueError(f"internal: {name} takes {in_features} inputs, the plan's parts sum to {sum(spec.parts)}")
        bad = [size for size in spec.parts if size % degree]
        if bad:
            raise ConfigError(f"tensor_parallel_degree={degree} does not divide the {bad[0]} "
                              f"{'outputs' if kind == 'colwise' else 'inputs'} of {name}; use a degree that divides it")
        specs[f"{name}.weight"] = spec
        if kind == "colwise" and module.bias is not None:
            specs[f"{name}.bias"] = ShardSpec(0, (out_features,))
        # a row-parallel bias stays whole: it is added once, after the all-reduce
    return specs


def take_pieces(tensor: torch.Tensor, spec: ShardSpec, rank: int, degree: int) -> torch.Tensor:
    """This rank's slice of a whole tensor (a copy with its own storage; meta stays meta)."""
    parts = [tensor.narrow(spec.dim, start, stop - start) for start, stop in spec.pieces(rank, degree)]
    return torch.cat(parts, dim=spec.dim) if len(parts) > 1 else parts[0].clone()


class RowParallelLinear(nn.Module):
    """A Linear holding some input columns of the weight: partial product, one all-reduce, then the bias.

    Same parameter names as nn.Linear (``weight``, ``bias``), so state dicts and LoRA keys keep
    the whole model's names.
    """

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.group = group
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


def shard_model(model: nn.Module, plan: TensorParallelPlan, group: dist.ProcessGroup | None) -> nn.Module:
    """Split ``model`` in place over ``group`` (None or size 1: unchanged); returns the model.

    Works on whole weights (each rank keeps its slice) and on the meta device (local shapes only,
    for the loader to fill). A model already split over the same group is returned as it is.
    """
    if group is None or dist.get_world_size(group) == 1:
        return model
    degree, rank = dist.get_world_size(group), dist.get_rank(group)
    existing = getattr(model, "tensor_parallel", None)
    if existing is not None:
        if existing != (rank, degree):
            raise ValueError(f"this model is already split as tensor-parallel rank {existing[0]} of {existing[1]}")
        return model
    specs = param_shards(model, plan, degree)  # validates before anything changes
    for name, module, kind, _ in list(_planned_linears(model, plan)):
        with torch.no_grad():
            for param_name in ("weight", "bias"):
                spec = specs.get(f"{name}.{param_name}")
                if spec is not None:
                    param = getattr(module, param_name)
                    setattr(module, param_name, nn.Parameter(take_pieces(param.data, spec, rank, degree), requires_grad=False))
        if kind == "colwise":
            module.out_features = module.weight.shape[0]
        else:
            module.in_features = module.weight.shape[1]
            parent_name, _, child = name.rpartition(".")
            model.get_submodule(parent_name).register_module(child, RowParallelLinear(module, group))
    for name, module in model.named_modules():
        if _matches(name, plan.attention):
            if module.heads % degree:
                raise ConfigError(f"tensor_parallel_degree={degree} does not divide the {module.heads} heads of {name}")
            module.heads //= degree
    model.tensor_parallel = (rank, degree)
    return model


class ShardedView:
    """The whole model's shapes beside a split one, for what is computed at whole shapes (LoRA deltas)."""

    def __init__(self, model: nn.Module, plan: TensorParallelPlan):
        rank, degree = model.tensor_parallel
        with torch.device("meta"):  # shapes only, no memory
            self.whole = type(model).from_config(model.config)
        self.specs = param_shards(self.whole, plan, degree)
        self.rank, self.degree = rank, degree
        self._shapes = {n: tuple(p.shape) for n, p in self.whole.named_parameters()}

    def is_split(self, name: str) -> bool:
        return name in self.specs

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def local(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a whole-shape tensor of parameter ``name``."""
        return take_pieces(tensor, self.specs[name], self.rank, self.degree)


# --- plans -------------------------------------------------------------------------------------------

# Flux.1: the double blocks' image and text streams each split like a transformer layer; the single
# blocks compute attention and MLP side by side from one input, and proj_out reads cat(attention
# heads, MLP columns), so its input columns are split as those two parts.
FLUX_PLAN = TensorParallelPlan(
    colwise=tuple(f"transformer_blocks.*.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
        "ff.net.0.proj", "ff_context.net.0.proj")) + tuple(f"single_transformer_blocks.*.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    rowwise=tuple(f"transformer_blocks.*.{m}" for m in ("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2")),
    packed_rowwise={"single_transformer_blocks.*.proj_out": lambda c: (
        c["num_attention_heads"] * c["attention_head_dim"], 4 * c["num_attention_heads"] * c["attention_head_dim"])},
    attention=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
)

# SD3 / SD3.5: joint blocks (image and context projections of the joint attention, SD3.5's image-only
# attn2, both MLPs). The last block is context-pre-only (no to_add_out, no ff_context): its globs
# simply match nothing there.
SD3_PLAN = TensorParallelPlan(
    colwise=tuple(f"transformer_blocks.*.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "ff.net.0.proj", "ff_context.net.0.proj")),
    rowwise=tuple(f"transformer_blocks.*.{m}" for m in (
        "attn.to_out.0", "attn.to_add_out", "attn2.to_out.0", "ff.net.2", "ff_context.net.2")),
    attention=("transformer_blocks.*.attn", "transformer_blocks.*.attn2"),
)

PLANS = {"flux": FLUX_PLAN, "sd3": SD3_PLAN}


def plan_for(family: str) -> TensorParallelPlan:
    if family not in PLANS:
        raise ConfigError(f"tensor parallelism is not supported for the {family} family yet; set tensor_parallel_degree to 1")
    return PLANS[family]
