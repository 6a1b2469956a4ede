"""Apply a model's sequence-parallel plan: split the image tokens, run the unchanged model, gather.

A plan is data (which inputs carry the image sequence and along which dimension, where the output
is gathered), so adding a model means writing its plan, not a new forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..attention.usp import SequenceLayout


@dataclass(frozen=True)
class SequencePlan:
    # input name -> dimension along which it carries the image tokens (split across ranks)
    split_inputs: dict[str, int]
    # input that carries the text tokens (replicated on every rank); its dim 1 is the text length
    text_input: str
    # dimension of the model output along which the image tokens are gathered back
    output_dim: int
    # the forward keyword that reaches the attention processors
    attention_kwargs_name: str
    # inputs that carry the text tokens (name -> dimension), split across the ranks like the image
    # when the text length divides by the degree (else replicated); empty: always replicated
    split_text_inputs: dict[str, int] = field(default_factory=dict)


def pad_to_multiple(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad dimension ``dim`` at its end up to a multiple (padded keys are never attended)."""
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def gather_along(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def token_split(mesh, split_over: str | None):
    """(inner group, outer group, degree, this rank's shard) of the image-token split.

    Sequence parallelism splits over Ulysses x Ring (None); DistriFusion names its own mesh
    dimension, whose group then plays the inner group's part and there is no outer one.
    """
    if split_over is None:
        return (mesh.group("ulysses"), mesh.group("ring"), mesh.size("ulysses") * mesh.size("ring"),
                mesh.sequence_parallel_rank)
    return mesh.group(split_over), None, mesh.size(split_over), mesh.local_rank(split_over)


class SequenceShardedForward:
    """Calls ``model`` on this rank's shard of the image tokens and returns the whole output."""

    def __init__(self, model: torch.nn.Module, plan: SequencePlan, mesh, split_over: str | None = None):
        self.model = model
        self.plan = plan
        self.ulysses_group, self.ring_group, self.degree, self.shard_index = token_split(mesh, split_over)
        # Text is split over sequence parallelism only (USP handles sharded text; DistriFusion does not).
        self.shard_text = split_over is None

    def __call__(self, **inputs):
        inputs["return_dict"] = False
        if self.degree == 1:
            return self.model(**inputs)[0]
        first_split = next(iter(self.plan.split_inputs))
        image_tokens = inputs[first_split].shape[self.plan.split_inputs[first_split]]
        for name, dim in self.plan.split_inputs.items():
            value = inputs.get(name)
            if isinstance(value, (list, tuple)):  # several tensors of the same sequence (ControlNet tokens)
                inputs[name] = [self._shard(v, dim) for v in value]
            elif value is not None:
                inputs[name] = self._shard(value, dim)
        padded_tokens = image_tokens + (-image_tokens % self.degree)
        text_tokens = inputs[self.plan.text_input].shape[1]
        text_sharded = self.shard_text and bool(self.plan.split_text_inputs) and text_tokens % self.degree == 0
        if text_sharded:
            for name, dim in self.plan.split_text_inputs.items():
                inputs[name] = inputs[name].chunk(self.degree, dim=dim)[self.shard_index]
            text_tokens //= self.degree
        layout = SequenceLayout(text_tokens, image_tokens, padded_tokens, text_sharded)
        inputs[self.plan.attention_kwargs_name] = {**(inputs.get(self.plan.attention_kwargs_name) or {}), "layout": layout}
        out = self.model(**inputs)[0]
        # Ulysses shards are neighbours inside one ring chunk: gather them first, then the ring chunks.
        out = gather_along(out, self.plan.output_dim, self.ulysses_group)
        out = gather_along(out, self.plan.output_dim, self.ring_group)
        return out.narrow(self.plan.output_dim, 0, image_tokens)

    def _shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return pad_to_multiple(x, dim, self.degree).chunk(self.degree, dim=dim)[self.shard_index]
