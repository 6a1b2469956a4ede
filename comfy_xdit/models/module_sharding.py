"""Sequence parallelism for models that make their image tokens inside their own forward.

SD3's transformer patch-embeds the spatial latent itself (with a cropped positional embedding) and
unpatchifies at the end, so its input cannot be split. Its plan instead names two submodules: the
one whose output first carries the image tokens (split there, across the sequence-parallel ranks)
and the one whose output is the last per-token result (gathered there, before the model's own
unpatchify). Forward hooks on those two modules do the work; the model's forward is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.usp import SequenceLayout
from .sharding import gather_along, pad_to_multiple


@dataclass(frozen=True)
class ModuleSequencePlan:
    # submodule whose output [B, image tokens, D] is split across the sequence-parallel ranks
    split_output_of: str
    # submodule whose per-token output is gathered back before the model reassembles the image
    gather_output_of: str
    # the forward keyword that reaches the attention processors
    attention_kwargs_name: str
    # the token dimension of both outputs
    token_dim: int = 1


class ModuleShardedForward:
    """Calls ``model`` with its image tokens split between the plan's two modules; returns the whole output.

    The attention processors receive a ``SequenceLayout`` through the attention kwargs; the split
    hook fills in the image token counts when it sees them (before any attention runs), and each
    processor sets the text length of its own call.
    """

    def __init__(self, model: torch.nn.Module, plan: ModuleSequencePlan, mesh):
        self.model = model
        self.plan = plan
        self.ulysses_group = mesh.group("ulysses")
        self.ring_group = mesh.group("ring")
        self.degree = mesh.size("ulysses") * mesh.size("ring")
        self.shard_index = mesh.sequence_parallel_rank
        self._layout: SequenceLayout | None = None  # set only while __call__ runs
        if self.degree > 1:
            model.get_submodule(plan.split_output_of).register_forward_hook(self._split)
            model.get_submodule(plan.gather_output_of).register_forward_hook(self._gather)

    def _split(self, module, args, output: torch.Tensor):
        layout = self._layout
        if layout is None:  # a call that did not come through __call__ runs unsplit
            return None
        dim = self.plan.token_dim
        tokens = output.shape[dim]
        layout.image_tokens = tokens
        layout.padded_image_tokens = tokens + (-tokens % self.degree)
        return pad_to_multiple(output, dim, self.degree).chunk(self.degree, dim=dim)[self.shard_index]

    def _gather(self, module, args, output: torch.Tensor):
        layout = self._layout
        if layout is None:
            return None
        dim = self.plan.token_dim
        # Ulysses shards are neighbours inside one ring chunk: gather them first, then the ring chunks.
        output = gather_along(output, dim, self.ulysses_group)
        output = gather_along(output, dim, self.ring_group)
        return output.narrow(dim, 0, layout.image_tokens)

    def __call__(self, **inputs):
        inputs["return_dict"] = False
        if self.degree == 1:
            return self.model(**inputs)[0]
        name = self.plan.attention_kwargs_name
        layout = SequenceLayout(text_tokens=0, image_tokens=0, padded_image_tokens=0)
        inputs[name] = {**(inputs.get(name) or {}), "layout": layout}
        self._layout = layout
        try:
            return self.model(**inputs)[0]
        finally:
            self._layout = None
