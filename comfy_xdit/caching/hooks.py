"""diffusers block hooks for First-Block-Cache and TeaCache, deciding on a group-reduced metric.

The skeleton is diffusers' First Block Cache (``diffusers.hooks.first_block_cache``): a head hook
on the first transformer block decides whether the remaining blocks run; every other block gets
diffusers' ``FBCBlockHook``, which passes its input through when the step is skipped, and the last
one records the residual (last block output minus head output) that a skipped step adds back
(``TailBlockHook``: diffusers' tail hook, also for SD3's last block, which returns no text).
The blocks' output order (Flux, SD3 and Qwen-Image joint blocks: text, image; PixArt's and Wan's
blocks: image only) comes from diffusers' ``TransformerBlockRegistry``. The hooks read a block's
inputs by binding its call to its forward's signature, since models call their blocks
positionally (Wan, PixArt's hidden states) or by keyword (Flux, Qwen-Image).
What is ours is the decision: made on ``ReducedRelativeL1`` (the same value on every rank of the
images' group) and recorded per call, with TeaCache's metric and schedule rules (the family's
recipe: which tensor, which polynomial, which steps always run; caching/families.py).

State lives in diffusers' ``StateManager`` keyed by the cache context name, so each cfg branch
(the conditioning a call was made with) has its own cache; ``job.CacheJob`` sets the context on
the manager ``install`` returns (not through ``model.cache_context``: SD3's model class has no
diffusers ``CacheMixin``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.first_block_cache import FBCBlockHook, FBCHeadBlockHook, FBCSharedBlockState
from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager
from diffusers.utils.torch_utils import unwrap_module

from .decision import ReducedRelativeL1
from .settings import FBCACHE, CacheSettings

HEAD_HOOK = "comfy_xdit_cache_head"
BLOCK_HOOK = "comfy_xdit_cache_block"


@dataclass
class CacheDecision:
    """One model call: which branch and step, whether the blocks ran, on what metric."""

    branch: str
    step: int
    computed: bool
    change: float = float("nan")  # the relative L1 change reduced over the group (nan: not measured)
    local_change: float = float("nan")  # the same ratio from this rank's tokens alone, never decided on
    accumulated: float = float("nan")  # TeaCache: the rescaled changes summed since the last computed call


class CacheState(FBCSharedBlockState):
    """diffusers' shared block state plus TeaCache's running values."""

    def __init__(self) -> None:
        super().__init__()
        self.previous_modulated: torch.Tensor | None = None
        self.accumulated = 0.0

    def reset(self):
        super().reset()
        self.head_block_output = self.head_block_residual = self.previous_modulated = None
        self.accumulated = 0.0


@functools.cache
def _signature(block_class: type) -> inspect.Signature:
    return inspect.signature(block_class.forward)


def bound_arguments(block: torch.nn.Module, args, kwargs) -> dict:
    """A block call's arguments by name, however the model passed them (positionally or by keyword)."""
    return _signature(type(unwrap_module(block))).bind(block, *args, **kwargs).arguments


def _forced(settings: CacheSettings, step: int) -> bool | None:
    """The forced decision for this step (True: compute), or None when the metric decides."""
    if settings.computed_steps is None:
        return None
    return step in settings.computed_steps


class ReducedFirstBlockHook(FBCHeadBlockHook):
    """diffusers' First Block Cache head hook, deciding on the residual change reduced over the group."""

    def __init__(self, state_manager: StateManager, settings: CacheSettings, threshold: float, metric: ReducedRelativeL1,
                 record: list, layout_of: Callable[[dict], object]):
        super().__init__(state_manager, threshold)
        self.settings, self.metric, self.record, self.layout_of = settings, metric, record, layout_of
        self._call_layout = None

    def new_forward(self, module, *args, **kwargs):
        self._call_layout = self.layout_of(bound_arguments(module, args, kwargs))
        return super().new_forward(module, *args, **kwargs)

    @torch.compiler.disable
    def _should_compute_remaining_blocks(self, hidden_states_residual: torch.Tensor) -> bool:
        state = self.state_manager.get_state()
        context = self.state_manager.context
        if state.head_block_residual is None:  # this branch's first call: nothing cached yet
            self.record.append(CacheDecision(context.name, context.step_index, True))
            return True
        change = self.metric(hidden_states_residual, state.head_block_residual, self._call_layout)
        forced = _forced(self.settings, context.step_index)
        compute = change > self.threshold if forced is None else forced
        self.record.append(CacheDecision(context.name, context.step_index, compute, change, self.metric.last_local))
        return compute


class TeaCacheHeadHook(ModelHook):
    """TeaCache as a head hook: decide before the first block runs.

    The metric is the relative L1 change of the recipe's tensor (Flux: the first block's
    modulated image input; Wan: the blocks' timestep modulation) since the previous call of this
    branch, rescaled by the published polynomial and accumulated; the blocks run when the sum
    reaches the threshold (which resets it), and always on the recipe's retained first steps and,
    where the recipe says so, the last step. A skipped call adds the residual of the last computed
    one (output of the last block minus input of the first) to its input.
    """

    _is_stateful = True

    def __init__(self, state_manager: StateManager, settings: CacheSettings, threshold: float, metric: ReducedRelativeL1,
                 record: list, layout_of: Callable[[dict], object], recipe):
        super().__init__()
        self.state_manager = state_manager
        self.settings, self.threshold, self.metric, self.record = settings, threshold, metric, record
        self.layout_of, self.recipe = layout_of, recipe
        self.rescale = np.poly1d(recipe.coefficients)
        self._metadata = None

    def initialize_hook(self, module):
        self._metadata = TransformerBlockRegistry.get(unwrap_module(module).__class__)
        return module

    def new_forward(self, module, *args, **kwargs):
        arguments = bound_arguments(module, args, kwargs)
        hidden = arguments["hidden_states"]
        has_text = self._metadata.return_encoder_hidden_states_index is not None
        encoder = arguments["encoder_hidden_states"] if has_text else None
        modulated = self.recipe.modulated_input(module, arguments)
        compute = self._decide(modulated, self.layout_of(arguments) if self.recipe.per_token else None)
        state = self.state_manager.get_state()
        state.previous_modulated = modulated
        state.should_compute = compute
        if compute:
            # The residual is taken from the first block's input, in the tail hook's format.
            state.head_block_output = (hidden, encoder) if has_text else hidden
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden_residual, encoder_residual = state.tail_block_residuals
        if not has_text:
            return hidden + hidden_residual
        output = [None, None]
        output[self._metadata.return_hidden_states_index] = hidden + hidden_residual
        output[self._metadata.return_encoder_hidden_states_index] = encoder + encoder_residual
        return tuple(output)

    @torch.compiler.disable
    def _decide(self, modulated: torch.Tensor, layout) -> bool:
        state = self.state_manager.get_state()
        context = self.state_manager.context
        step, last = context.step_index, context.num_inference_steps - 1
        always = step < self.recipe.retained_steps or (self.recipe.last_step_runs and step == last)
        if state.previous_modulated is None or state.tail_block_residuals is None or always:
            state.accumulated = 0.0
            self.record.append(CacheDecision(context.name, step, True))
            return True
        change = self.metric(modulated, state.previous_modulated, layout)
        state.accumulated += float(self.rescale(change))
        forced = _forced(self.settings, step)
        # Threshold 0 never skips, as for First-Block-Cache, even where a polynomial maps a change
        # outside its fitted range to a negative estimate (the sum would then never reach 0).
        compute = (self.threshold <= 0 or state.accumulated >= self.threshold) if forced is None else forced
        self.record.append(CacheDecision(context.name, step, compute, change, self.metric.last_local, state.accumulated))
        if compute:
            state.accumulated = 0.0
        return compute


class TailBlockHook(FBCBlockHook):
    """diffusers' tail block hook, also for a last block whose text output is None.

    SD3's last joint block is "context pre-only": it returns (None, image), and diffusers'
    FBCBlockHook would subtract from that None. The model discards the text stream after its last
    block, so the text residual of such a block is irrelevant: it is recorded as zero, and a
    skipped step hands on the first block's text output unchanged (read by nobody).
    """

    def __init__(self, state_manager: StateManager):
        super().__init__(state_manager, is_tail=True)

    def new_forward(self, module, *args, **kwargs):
        state = self.state_manager.get_state()
        if not state.should_compute:  # skipped: diffusers' pass-through of the block's inputs
            return super().new_forward(module, *args, **kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not isinstance(output, tuple):  # an image-only block output
            state.tail_block_residuals = (output - state.head_block_output, None)
            return output
        head_hidden, head_encoder = state.head_block_output
        hidden = output[self._metadata.return_hidden_states_index]
        encoder = output[self._metadata.return_encoder_hidden_states_index]
        encoder_residual = head_encoder.new_zeros(()) if encoder is None else encoder - head_encoder
        state.tail_block_residuals = (hidden - head_hidden, encoder_residual)
        return output


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks in execution order (Flux: double blocks, then single blocks)."""
    blocks = []
    for name, child in model.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList):
            blocks.extend(child)
    if len(blocks) < 2:
        raise ValueError("the step cache needs a model with at least two transformer blocks")
    return blocks


def install(model: torch.nn.Module, settings: CacheSettings, threshold: float, metric: ReducedRelativeL1, record: list,
            layout_of: Callable[[dict], object], teacache=None) -> StateManager:
    """Hook the cache into the model's blocks (undone by ``remove``); returns the hooks' state manager.

    layout_of: a block's bound arguments -> the SequenceLayout of the call (None: one shard).
    teacache: the family's TeaCacheRecipe (caching/families.py), for settings.kind "teacache".
    """
    state_manager = StateManager(CacheState)
    head, *rest = transformer_blocks(model)
    if settings.kind == FBCACHE:
        head_hook = ReducedFirstBlockHook(state_manager, settings, threshold, metric, record, layout_of)
    else:
        head_hook = TeaCacheHeadHook(state_manager, settings, threshold, metric, record, layout_of, teacache)
    HookRegistry.check_if_exists_or_initialize(head).register_hook(head_hook, HEAD_HOOK)
    *middle, tail = rest
    for block in middle:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(FBCBlockHook(state_manager), BLOCK_HOOK)
    HookRegistry.check_if_exists_or_initialize(tail).register_hook(TailBlockHook(state_manager), BLOCK_HOOK)
    # New hooks on child blocks stale the list of child registries that diffusers walks.
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    return state_manager


def remove(model: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.remove_hook(HEAD_HOOK, recurse=True)
    registry.remove_hook(BLOCK_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()
