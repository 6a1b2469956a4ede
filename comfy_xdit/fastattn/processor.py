"""DiTFastAttn's attention processors: carry out one layer's entry of the plan, or calibrate it.

``FastAttnProcessor`` holds the methods; a family's subclass says how a layer's queries, keys and
values are projected and how the attention result becomes the layer's output. Flux uses the
projections of our sequence-parallel Flux processor (``models.flux``), PixArt those of diffusers'
``AttnProcessor2_0`` on its self-attention (``attn1``); only the attention between them changes.
Per branch (the conditioning a call was made with) and layer
it keeps the last output (for share_step) and the window residual (for window_residual).

A call "carries both branches" when its batch holds the conditional rows then the unconditional
rows (the engine's batched CFG); only such a call can share across CFG. Elsewhere (cfg 1, cfg
parallel, branches too different to batch) a share_cfg entry runs as full attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.flux import flux_attention_output, flux_query_key_value
from .attention import full_attention, window_attention
from .calibration import GreedyCalibration
from .plan import COMPUTES_FULL, FULL, SHARE_CFG, SHARE_STEP, WINDOW_RESIDUAL, FastAttnPlan


@dataclass
class LayerState:
    output: object = None  # the processor's last return value (a tensor, or (image, text) for joint blocks)
    residual: torch.Tensor | None = None  # full minus window attention [B, S, H*D] at the last full step


@dataclass
class FastAttnRun:
    """The job's state that every layer's processor reads: plan, step and branch of the current call."""

    layers: int
    steps: int
    window: int
    plan: FastAttnPlan | None  # None while calibrating
    calibration: GreedyCalibration | None
    share_cfg_allowed: bool
    rows: int  # rows of one branch on this rank
    step: int = 0
    branch: str = ""
    chosen: list[list[str | None]] = field(default_factory=list)  # calibration's plan so far
    _states: dict[tuple[str, int], LayerState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.chosen = [[None] * self.steps for _ in range(self.layers)]

    def state(self, layer: int) -> LayerState:
        return self._states.setdefault((self.branch, layer), LayerState())

    def carries_both_branches(self, batch: int) -> bool:
        return self.share_cfg_allowed and batch == 2 * self.rows

    def method(self, layer: int) -> str | None:
        """The plan's method here, or None where calibration has yet to choose."""
        if self.plan is not None:
            return self.plan.method(layer, self.step)
        return self.chosen[layer][self.step]

    def keeps_residual(self, layer: int) -> bool:
        # While calibrating the later steps are unknown, so every full step keeps it.
        return self.plan is None or self.plan.needs_residual(layer, self.step)

    def finished_plan(self) -> FastAttnPlan:
        return FastAttnPlan(tuple(tuple(m or FULL for m in steps) for steps in self.chosen))


def _duplicate(output):
    """The conditional half's output handed to the unconditional half too (rows [cond, uncond])."""
    if isinstance(output, tuple):
        return tuple(torch.cat([x, x]) for x in output)
    return torch.cat([output, output])


def _first_half(output, rows: int):
    if isinstance(output, tuple):
        return tuple(x[:rows] for x in output)
    return output[:rows]


class FastAttnProcessor:
    def __init__(self, run: FastAttnRun, layer: int):
        self.run, self.layer = run, layer

    def query_key_value(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """[B, S, H, D] queries, keys and values of the sequence window attention runs over."""
        raise NotImplementedError

    def output(self, attn, raw: torch.Tensor, encoder_hidden_states):
        """The layer's output from the attention result [B, S, H*D]."""
        raise NotImplementedError

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        if attention_mask is not None:
            raise ValueError("DiTFastAttn does not support attention masks; set the cache to none")
        run, state = self.run, self.run.state(self.layer)
        both = run.carries_both_branches(hidden_states.shape[0])
        method = run.method(self.layer)

        def project(rows: int | None = None):
            hidden = hidden_states if rows is None else hidden_states[:rows]
            encoder = encoder_hidden_states if rows is None or encoder_hidden_states is None else encoder_hidden_states[:rows]
            return self.query_key_value(attn, hidden, encoder, image_rotary_emb)

        def finish(raw: torch.Tensor):
            return self.output(attn, raw, encoder_hidden_states)

        if method is None:
            output = self._calibrate(state, project, finish, both)
        elif method == SHARE_STEP:
            if state.output is None:
                raise RuntimeError(f"DiTFastAttn: layer {self.layer} shares step {run.step - 1}'s output, "
                                   "which this branch never computed")
            output = state.output
        elif method == SHARE_CFG and both:
            q, k, v = project(run.rows)  # the conditional rows only
            raw = full_attention(q, k, v).flatten(2, 3).to(q.dtype)
            if run.keeps_residual(self.layer):
                state.residual = torch.cat([raw - self._window(q, k, v)] * 2)
            output = _duplicate(finish(raw))
        elif method == WINDOW_RESIDUAL:
            if state.residual is None:
                raise RuntimeError(f"DiTFastAttn: layer {self.layer} uses window attention at step {run.step} "
                                   "before any full step kept its residual")
            q, k, v = project()
            output = finish(self._window(q, k, v) + state.residual)
        else:  # full (and share_cfg on a call with one branch)
            q, k, v = project()
            raw = full_attention(q, k, v).flatten(2, 3).to(q.dtype)
            if run.keeps_residual(self.layer):
                state.residual = raw - self._window(q, k, v)
            output = finish(raw)
        state.output = output
        return output

    def _window(self, q, k, v) -> torch.Tensor:
        return window_attention(q, k, v, self.run.window).flatten(2, 3).to(q.dtype)

    def _calibrate(self, state: LayerState, project, finish, both: bool):
        """Compute the full output and every applicable candidate, choose, return the chosen output."""
        run = self.run
        q, k, v = project()
        raw = full_attention(q, k, v).flatten(2, 3).to(q.dtype)
        window = self._window(q, k, v)
        reference = finish(raw)
        candidates = {}
        if state.output is not None:
            candidates[SHARE_STEP] = state.output
        if state.residual is not None:
            candidates[WINDOW_RESIDUAL] = finish(window + state.residual)
        if both:
            candidates[SHARE_CFG] = _duplicate(_first_half(reference, run.rows))
        method = run.calibration.choose(self.layer, run.step, reference, candidates)
        run.chosen[self.layer][run.step] = method
        if method in COMPUTES_FULL:
            residual = raw - window
            state.residual = torch.cat([residual[:run.rows]] * 2) if method == SHARE_CFG else residual
        return candidates.get(method, reference)


class FastAttnFluxProcessor(FastAttnProcessor):
    """Flux's double blocks (joint text + image attention) and single blocks (text already joined)."""

    def query_key_value(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        return flux_query_key_value(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

    def output(self, attn, raw, encoder_hidden_states):
        joint = encoder_hidden_states is not None
        return flux_attention_output(attn, raw, joint, encoder_hidden_states.shape[1] if joint else 0)


class FastAttnPixArtProcessor(FastAttnProcessor):
    """PixArt's self-attention (image tokens only), as diffusers' AttnProcessor2_0 computes it."""

    def query_key_value(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        heads_view = (attn.heads, -1)
        return tuple(proj(hidden_states).unflatten(-1, heads_view) for proj in (attn.to_q, attn.to_k, attn.to_v))

    def output(self, attn, raw, encoder_hidden_states):
        out = attn.to_out[1](attn.to_out[0](raw))
        if attn.residual_connection:
            raise ValueError("DiTFastAttn: this PixArt attention adds a residual connection, which it does not support")
        return out / attn.rescale_output_factor
