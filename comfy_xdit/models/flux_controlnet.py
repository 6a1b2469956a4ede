"""Flux ControlNets inside the sequence-parallel forward, with ComfyUI's arithmetic.

The ControlNet is diffusers' ``FluxControlNetModel``, unchanged. Under sequence parallelism it
runs on the same shard of image tokens as the main transformer: its control tokens are split
exactly like ``hidden_states`` (the plan below), its attention goes through the same
``ParallelFluxAttnProcessor``, so each block residual it returns is this rank's shard and is
added locally, with no extra communication.

What follows ComfyUI 0.3.75 (``comfy/ldm/flux/controlnet.py``, ``comfy/controlnet.py``) rather than
diffusers' pipeline, because users compare with the stock ControlNetApplyAdvanced:

- Which residual goes to which main block: ComfyUI sizes the output for Flux.1 (19 double, 38
  single blocks). InstantX residuals are repeated in runs (``i // ceil(19 / n)``), XLabs residuals
  cycle (``i % n``), and main blocks past 19 / 38 get none. diffusers' interval rule
  (``ceil(len(main blocks) / n)``) agrees only for a main model of Flux.1's depth.
- Strength multiplies each residual once (diffusers' ``conditioning_scale`` does the same
  product); several ControlNets add up in the order they were applied.
- A union ControlNet gets a mode token only when a mode is set (ComfyUI's "auto" sends none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attention.usp import SequenceLayout
from ..loading.flux_controlnet import INSTANTX, MAIN_DOUBLE_BLOCKS, MAIN_SINGLE_BLOCKS, LoadedControlNet
from .sharding import SequencePlan

# The main plan plus the control tokens, split along the image sequence like hidden_states.
CONTROLLED_FLUX_PLAN = SequencePlan(
    split_inputs={"hidden_states": 1, "img_ids": 0, "controlnet_conds": 1},
    text_input="encoder_hidden_states",
    output_dim=1,
    attention_kwargs_name="joint_attention_kwargs",
)


def block_sources(kind: str, residuals: int, main_blocks: int, comfy_blocks: int) -> list[int | None]:
    """For each main block, the index of the ControlNet residual ComfyUI adds there (or None)."""
    if residuals == 0:
        return [None] * main_blocks
    repeat = math.ceil(comfy_blocks / residuals)
    if kind == INSTANTX:  # latent_input: each residual repeated `repeat` times in a run
        table = [i // repeat for i in range(comfy_blocks)]
    else:  # XLabs: the residuals cycle
        table = [i % residuals for i in range(comfy_blocks)]
    return [table[i] if i < comfy_blocks else None for i in range(main_blocks)]


class _LayoutBoundProcessor:
    """The parallel attention processor with the layout given by the runner.

    diffusers' FluxControlNetModel does not pass attention kwargs to its blocks, so the layout
    (text length with the union mode token, padded image tokens) is set here before each call.
    """

    def __init__(self, processor):
        self.processor = processor
        self.layout: SequenceLayout | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, layout=self.layout)


@dataclass
class ActiveControl:
    """One ControlNet applied in this model call: its runner, this rank's rows of control tokens."""

    runner: "FluxControlNetRunner"
    strength: float
    mode: int | None


class FluxControlNetRunner:
    """A loaded ControlNet, ready to run on this rank's shard."""

    def __init__(self, loaded: LoadedControlNet, attention=None):
        from .flux import ParallelFluxAttnProcessor

        self.model = loaded.model
        self.kind = loaded.kind
        self.hint_encoder = loaded.hint_encoder
        self.config = loaded.config
        self.dtype = next(self.model.parameters()).dtype
        self._bound = None
        if attention is not None:
            self._bound = _LayoutBoundProcessor(ParallelFluxAttnProcessor(attention))
            self.model.set_attn_processor(self._bound)

    def control_tokens(self, hint: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The packed control tokens [B, tokens, C*4] for a hint made by the bridge.

        InstantX: the hint is the processed control latent [B, 16 (+1), h, w], padded to the
        patch size as the latent is. XLabs: pixels [B, 3, 8h, 8w] in [0, 1], encoded here once per
        job (the encoder does not depend on the step).
        """
        from .flux import PATCH, pack

        hint = hint.to(self.dtype)
        if self.kind == INSTANTX:
            pad_h, pad_w = -hint.shape[-2] % PATCH, -hint.shape[-1] % PATCH
            if pad_h or pad_w:
                hint = torch.nn.functional.pad(hint, (0, pad_w, 0, pad_h), mode="circular")
        else:
            with torch.no_grad():
                hint = self.hint_encoder(hint * 2.0 - 1.0)
            if hint.shape[-2] % PATCH or hint.shape[-1] % PATCH:
                raise ValueError(f"an XLabs ControlNet needs an even latent size; got {latent_hw[0]}x{latent_hw[1]}")
        return pack(hint)

    def residuals(self, *, hidden_states, control_tokens, strength, mode, encoder_hidden_states, pooled_projections,
                  timestep, img_ids, txt_ids, guidance, layout: SequenceLayout | None):
        """(double, single) residuals of this rank's image tokens, scaled by strength."""
        controlnet_mode = None
        text_tokens = encoder_hidden_states.shape[1]
        if self.config.get("num_mode") and mode is not None:
            controlnet_mode = torch.full((hidden_states.shape[0], 1), mode, dtype=torch.long, device=hidden_states.device)
            text_tokens += 1
        if self._bound is not None:
            self._bound.layout = SequenceLayout(text_tokens, layout.image_tokens, layout.padded_image_tokens)
        # ComfyUI runs a union ControlNet without a mode token under "auto"; diffusers refuses a
        # union model without a mode, so its union flag is lowered for such a call.
        union = getattr(self.model, "union", False)
        self.model.union = union and controlnet_mode is not None
        try:
            double, single = self._forward(hidden_states, control_tokens, controlnet_mode, strength, encoder_hidden_states,
                                           pooled_projections, timestep, img_ids, txt_ids, guidance)
        finally:
            self.model.union = union
        return list(double or ()), list(single or ())

    def _forward(self, hidden_states, control_tokens, controlnet_mode, strength, encoder_hidden_states, pooled_projections,
                 timestep, img_ids, txt_ids, guidance):
        return self.model(
            hidden_states=hidden_states.to(self.dtype),
            controlnet_cond=control_tokens,
            controlnet_mode=controlnet_mode,
            conditioning_scale=strength,
            encoder_hidden_states=encoder_hidden_states.to(self.dtype),
            pooled_projections=pooled_projections.to(self.dtype),
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance if self.config["guidance_embeds"] else None,
            return_dict=False,
        )


class ControlledFlux:
    """The main transformer with ControlNet residuals added ComfyUI's way; called like the model.

    ``controls`` (replicated) and ``controlnet_conds`` (split like hidden_states) pair up by index.
    """

    def __init__(self, transformer):
        self.transformer = transformer
        self.main_double = len(transformer.transformer_blocks)
        self.main_single = len(transformer.single_transformer_blocks)

    def __call__(self, *, controls, controlnet_conds, controlnet_guidance=None, joint_attention_kwargs=None, **inputs):
        layout = (joint_attention_kwargs or {}).get("layout")
        double: list[torch.Tensor | None] = [None] * self.main_double
        single: list[torch.Tensor | None] = [None] * self.main_single
        shared = {k: inputs[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                           "img_ids", "txt_ids", "guidance")}
        if shared["guidance"] is None:  # a main model without guidance embedder (schnell)
            shared["guidance"] = controlnet_guidance
        for control, tokens in zip(controls, controlnet_conds):
            runner = control.runner
            d, s = runner.residuals(control_tokens=tokens, strength=control.strength, mode=control.mode, layout=layout, **shared)
            for target, found, blocks, comfy in ((double, d, self.main_double, MAIN_DOUBLE_BLOCKS),
                                                 (single, s, self.main_single, MAIN_SINGLE_BLOCKS)):
                for i, source in enumerate(block_sources(runner.kind, len(found), blocks, comfy)):
                    if source is not None:
                        # Earlier ControlNets first, as ComfyUI's control_merge adds prev + current.
                        add = found[source]
                        target[i] = add if target[i] is None else target[i] + add
        return self.transformer(
            **inputs,
            joint_attention_kwargs=joint_attention_kwargs,
            controlnet_block_samples=_complete(double, inputs["hidden_states"]),
            controlnet_single_block_samples=_complete(single, inputs["hidden_states"]),
        )


def _complete(samples: list[torch.Tensor | None], like: torch.Tensor) -> list[torch.Tensor] | None:
    """One residual per main block (diffusers then indexes them one to one); zeros where ComfyUI adds none."""
    present = [s for s in samples if s is not None]
    if not present:
        return None
    zero = torch.zeros_like(present[0])
    return [s if s is not None else zero for s in samples]
