"""diffusers block hooks for First-Block-Cache and TeaCache, deciding on a group-reduced metric.

The skeleton is diffusers' First Block Cache (``diffusers.hooks.first_block_cache``): a head hook
on the first transformer block decides whether the remaining blocks run; every other block gets
diffusers' ``FBCBlockHook``, which passes its input through when the step is skipped, and the last
one records the residual (last block output minus head output) that a skipped step adds back
(``TailBlockHook``: diffusers' tail hook, also for SD3's last block, which returns no text).
The blocks' output order (Flux and SD3 joint blocks: text, image) comes from diffusers'
``TransformerBlockRegistry``.
What is ours is the decision: made on ``ReducedRelativeL1`` (the same value on every rank of the
images' group) and recorded per call, with TeaCache's metric and schedule rules.

State lives in diffusers' ``StateManager`` keyed by the cache context name, so each cfg branch
(the conditioning a call was made with) has its own cache; ``job.CacheJob`` sets the context on
the manager ``install`` returns (not through ``model.cache_context``: SD3's model class has no
diffusers ``CacheMixin``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks.first_block_cache import FBCBlockHook, FBCHeadBlockHook, FBCSharedBlockState
from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager

from .decision import ReducedRelativeL1
from .settings import FBCACHE, TEACACHE_FLUX_COEFFICIENTS, CacheSettings

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


def _layout(kwargs) -> object:
    return (kwargs.get("joint_attention_kwargs") or {}).get("layout")


def _forced(settings: CacheSettings, step: int) -> bool | None:
    """The forced decision for this step (True: compute), or None when the metric decides."""
    if settings.computed_steps is None:
        return None
    return step in settings.computed_steps


class ReducedFirstBlockHook(FBCHeadBlockHook):
    """diffusers' First Block Cache head hook, deciding on the residual change reduced over the group."""

    def __init__(self, state_manager: StateManager, settings: CacheSettings, metric: ReducedRelativeL1, record: list):
        super().__init__(state_manager, settings.effective_threshold)
        self.settings, self.metric, self.record = settings, metric, record
        self._call_layout = None

    def new_forward(self, module, *args, **kwargs):
        self._call_layout = _layout(kwargs)
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
    """TeaCache (TeaCache4FLUX's rules) as a head hook: decide before the first block runs.

    The metric is the relative L1 change of the first block's modulated input (its norm1 output
    for the image tokens) since the previous call of this branch, rescaled by the published
    polynomial and accumulated; the blocks run when the sum reaches the threshold (which resets
    it), and always on the first and the last step. A skipped call adds the residual of the last
    computed one (output of the last block minus input of the first) to its input.
    """

    _is_stateful = True

    def __init__(self, state_manager: StateManager, settings: CacheSettings, metric: ReducedRelativeL1, record: list,
                 modulated_input, coefficients=TEACACHE_FLUX_COEFFICIENTS):
        super().__init__()
        self.state_manager = state_manager
        self.settings, self.metric, self.record = settings, metric, record
        self.modulated_input = modulated_input  # (block, hidden_states, temb) -> the block's modulated image input
        self.rescale = np.poly1d(coefficients)

    def new_forward(self, module, *args, **kwargs):
        hidden, encoder, temb = kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["temb"]
        modulated = self.modulated_input(module, hidden, temb)
        compute = self._decide(modulated, _layout(kwargs))
        state = self.state_manager.get_state()
        state.previous_modulated = modulated
        state.should_compute = compute
        if compute:
            state.head_block_output = (hidden, encoder)  # the residual is taken from the first block's input
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden_residual, encoder_residual = state.tail_block_residuals
        return encoder + encoder_residual, hidden + hidden_residual  # Flux blocks return (text, image)

    @torch.compiler.disable
    def _decide(self, modulated: torch.Tensor, layout) -> bool:
        state = self.state_manager.get_state()
        context = self.state_manager.context
        step, last = context.step_index, context.num_inference_steps - 1
        if state.previous_modulated is None or state.tail_block_residuals is None or step in (0, last):
            state.accumulated = 0.0
            self.record.append(CacheDecision(context.name, step, True))
            return True
        change = self.metric(modulated, state.previous_modulated, layout)
        state.accumulated += float(self.rescale(change))
        forced = _forced(self.settings, step)
        compute = state.accumulated >= self.settings.effective_threshold if forced is None else forced
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


def flux_modulated_input(block, hidden_states, temb):
    return block.norm1(hidden_states, emb=temb)[0]


def install(model: torch.nn.Module, settings: CacheSettings, metric: ReducedRelativeL1, record: list,
            modulated_input=flux_modulated_input) -> StateManager:
    """Hook the cache into the model's blocks (undone by ``remove``); returns the hooks' state manager."""
    state_manager = StateManager(CacheState)
    head, *rest = transformer_blocks(model)
    if settings.kind == FBCACHE:
        head_hook = ReducedFirstBlockHook(state_manager, settings, metric, record)
    else:
        head_hook = TeaCacheHeadHook(state_manager, settings, metric, record, modulated_input)
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
