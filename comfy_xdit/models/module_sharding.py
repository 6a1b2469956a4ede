"""Sequence parallelism for models that make their image tokens inside their own forward.

SD3's transformer patch-embeds the spatial latent itself (with a cropped positional embedding) and
unpatchifies at the end, so its input cannot be split. Its plan instead names two submodules: the
one whose output first carries the image tokens (split there, across the sequence-parallel ranks)
and the one whose output is the last per-token result (gathered there, before the model's own
unpatchify). Forward hooks on those two modules do the work; the model's forward is unchanged.

Wan flattens its patch embedding into tokens inside its forward, so no module outputs its tokens:
its plan splits the first input of its first block instead, and the rotary tables its ``rope``
module returns, so each rank's positions travel with its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.usp import SequenceLayout
from .sharding import gather_along, pad_to_multiple, token_split


@dataclass(frozen=True)
class ModuleSequencePlan:
    # submodule whose output [B, image tokens, D] (or a tuple of such tensors) is split across the
    # sequence-parallel ranks; None when split_first_input_of does it
    split_output_of: str | None
    # submodule whose per-token output is gathered back before the model reassembles the image
    gather_output_of: str
    # the forward keyword that reaches the attention processors (None: the processors ask the
    # ModuleShardedForward for its current_layout(), for models that pass no kwargs down)
    attention_kwargs_name: str | None
    # the token dimension of every split and gathered tensor
    token_dim: int = 1
    # submodule whose first positional input (the image tokens) is split before it runs
    split_first_input_of: str | None = None
    # submodules whose outputs (a tensor or a tuple of tensors) are split the same way
    also_split_outputs_of: tuple[str, ...] = ()
    # the keyword of that first input, for models that call the module with keywords (Mochi)
    first_input_keyword: str = "hidden_states"


class ModuleShardedForward:
    """Calls ``model`` with its image tokens split between the plan's two modules; returns the whole output.

    The attention processors receive a ``SequenceLayout`` through the attention kwargs; the split
    hook fills in the image token counts when it sees them (before any attention runs), and each
    processor sets the text length of its own call.
    """

    def __init__(self, model: torch.nn.Module, plan: ModuleSequencePlan, mesh, split_over: str | None = None):
        self.model = model
        self.plan = plan
        self.ulysses_group, self.ring_group, self.degree, self.shard_index = token_split(mesh, split_over)
        self._layout: SequenceLayout | None = None  # set only while __call__ runs
        if self.degree > 1:
            for name in (plan.split_output_of, *plan.also_split_outputs_of):
                if name is not None:
                    model.get_submodule(name).register_forward_hook(self._split)
            if plan.split_first_input_of is not None:
                first = model.get_submodule(plan.split_first_input_of)
                first.register_forward_pre_hook(self._split_first_input, with_kwargs=True)
            model.get_submodule(plan.gather_output_of).register_forward_hook(self._gather)

    def current_layout(self) -> SequenceLayout:
        """The layout of the call in progress (for processors that get no attention kwargs)."""
        if self._layout is None:
            raise RuntimeError("sequence-parallel attention ran outside a sharded forward call")
        return self._layout

    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.plan.token_dim
        tokens = x.shape[dim]
        self._layout.image_tokens = tokens
        self._layout.padded_image_tokens = tokens + (-tokens % self.degree)
        return pad_to_multiple(x, dim, self.degree).chunk(self.degree, dim=dim)[self.shard_index]

    def _split(self, module, args, output):
        if self._layout is None:  # a call that did not come through __call__ runs unsplit
            return None
        if isinstance(output, tuple):
            return tuple(self._shard(x) for x in output)
        return self._shard(output)

    def _split_first_input(self, module, args, kwargs):
        if self._layout is None:
            return None
        if args:
            return (self._shard(args[0]), *args[1:]), kwargs
        name = self.plan.first_input_keyword
        return args, {**kwargs, name: self._shard(kwargs[name])}

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
        if name is not None:
            inputs[name] = {**(inputs.get(name) or {}), "layout": layout}
        self._layout = layout
        try:
            return self.model(**inputs)[0]
        finally:
            self._layout = None
