"""One PipeFusion stage of a Flux transformer: diffusers' model with only this stage's layers.

The stage is diffusers' ``FluxTransformer2DModel`` itself, built on the meta device, with the
blocks of other stages replaced by parameter-free placeholders and the input (output) layers
removed from all but the first (last) stage. Keeping the model object and its block numbering
keeps every weight name as in the full model, so LoRAs apply to a stage unchanged (a layer on
another stage is simply not there) and the loader reads exactly this stage's tensors.

The stage's forward is split in the pieces the pipeline needs (embed, blocks, output); each is
the corresponding part of diffusers' ``FluxTransformer2DModel.forward``, calling its modules.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .partition import DOUBLE, INPUT_LAYERS, OUTPUT_LAYERS, SINGLE, StagePlan


class BlockOnAnotherStage(nn.Module):
    """Stands in for a block another pipeline stage holds (keeps the numbering of the rest)."""

    def __init__(self, stage: int):
        super().__init__()
        self.stage = stage

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"internal: this block lives on another PipeFusion stage than {self.stage}")


def cut_to_stage(model: nn.Module, plan: StagePlan) -> nn.Module:
    """Drop (in place) every layer of ``model`` that ``plan`` does not hold; returns the model."""
    existing = getattr(model, "pipefusion_stage", None)
    if existing is not None:
        if existing != plan:
            raise ValueError(f"this model is already cut to {existing}, not {plan}")
        return model
    for kind in (DOUBLE, SINGLE):
        blocks = getattr(model, kind)
        for number in range(len(blocks)):
            if not plan.holds_block(kind, number):
                blocks[number] = BlockOnAnotherStage(plan.index)
    for name in (() if plan.is_first else INPUT_LAYERS) + (() if plan.is_last else OUTPUT_LAYERS):
        setattr(model, name, None)
    model.pipefusion_stage = plan
    return model


def stage_blocks(model: nn.Module, run: int = 0) -> list[nn.Module]:
    """One run of the stage's blocks in execution order (double blocks first, as in the full model)."""
    doubles, singles = model.pipefusion_stage.run_blocks(run)
    return [*(model.transformer_blocks[n] for n in doubles), *(model.single_transformer_blocks[n] for n in singles)]


def load_flux_stage(path: str | Path, plan: StagePlan, dtype=torch.bfloat16, device: str | torch.device = "cpu") -> nn.Module:
    """Load only this stage's tensors from a Flux checkpoint (the rest of the file is never read)."""
    from ..loading.flux import flux_transformer_from_state_dict, open_flux_checkpoint

    with open_flux_checkpoint(path) as checkpoint:
        state_dict = checkpoint.state_dict(dtype=dtype, device=device, include=plan.owns)
        return flux_transformer_from_state_dict(checkpoint.config, state_dict, prepare=lambda m: cut_to_stage(m, plan))


# --- the pieces of diffusers' FluxTransformer2DModel.forward a stage runs -------------------


def time_embedding(model: nn.Module, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``temb`` as the full model computes it (every stage holds time_text_embed)."""
    timestep = timestep.to(dtype) * 1000
    if guidance is None:
        return model.time_text_embed(timestep, pooled)
    return model.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled)


def run_blocks(model: nn.Module, image: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, rotary, attention_kwargs: dict,
               run: int = 0):
    for block in stage_blocks(model, run):
        text, image = block(
            hidden_states=image,
            encoder_hidden_states=text,
            temb=temb,
            image_rotary_emb=rotary,
            joint_attention_kwargs=attention_kwargs,
        )
    return text, image


def project_output(model: nn.Module, image: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    return model.proj_out(model.norm_out(image, temb))
