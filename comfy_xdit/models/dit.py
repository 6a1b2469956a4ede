"""DiT-XL-2 adapter: diffusers' DiTTransformer2DModel, class-conditional, sampled with DiTPipeline's loop.

The model code is diffusers', unchanged. DiT patch-embeds inside its forward (positional
embedding included), so, as for PixArt, the image tokens are split after ``pos_embed`` and
gathered after ``proj_out_2`` (the last per-token layer, before the model's own unpatchify).
The blocks are diffusers' BasicTransformerBlock with adaLN-zero and self-attention only, so every
attention goes through SequenceParallelAttention (PixArt's processor); the timestep and class
embedding is per image and needs no communication.

There is no ComfyUI model to match: the timestep is the diffusers scheduler's (an integer of the
1,000 training steps) and the guidance is DiTPipeline's (models/families.py, DIT_PIPELINE).
"""

from __future__ import annotations

import torch

from ..attention.usp import SequenceParallelAttention
from .module_sharding import ModuleSequencePlan, ModuleShardedForward
from .pixart import ParallelSelfAttnProcessor

DIT_SEQUENCE_PLAN = ModuleSequencePlan(
    split_output_of="pos_embed",
    gather_output_of="proj_out_2",
    attention_kwargs_name="cross_attention_kwargs",
)
NULL_CLASS = 1000  # DiT's unconditional class (the extra row of its label table), as DiTPipeline uses it


def install_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel) -> ModuleShardedForward:
    """Route every (self-)attention through USP; returns the sharded forward to call."""
    if mesh.size("ulysses") * mesh.size("ring") > 1:
        attention = SequenceParallelAttention(mesh.group("ulysses"), mesh.group("ring"), lse_kernel)
        from diffusers.models.attention_processor import Attention

        # DiTTransformer2DModel has no set_attn_processor: each attention module gets the processor.
        for module in model.modules():
            if isinstance(module, Attention):
                module.set_processor(ParallelSelfAttnProcessor(attention))
    return ModuleShardedForward(model, DIT_SEQUENCE_PLAN, mesh)


class DiTDenoiser:
    """DiT's output for latents in model space: x [b, 4, H, W], a scheduler timestep, class ids -> [b, 8, H, W]."""

    def __init__(self, forward: ModuleShardedForward, dtype: torch.dtype, config):
        self.forward = forward
        self.dtype = dtype
        self.patch_size = config.patch_size

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if h != w or h % self.patch_size:
            # diffusers' DiT unpatchifies a square grid only.
            raise ValueError(f"DiT takes square latents whose side is a multiple of {self.patch_size} "
                             f"(images in steps of {8 * self.patch_size} px, width = height); got a {h}x{w} latent")
        device = x.device
        # As DiTPipeline: the scheduler's timestep, one per image.
        t = torch.as_tensor(timestep, device=device).reshape(1).expand(b)
        out = self.forward(
            hidden_states=x.to(self.dtype),
            timestep=t,
            class_labels=class_labels.to(device=device, dtype=torch.long).expand(b),
        )
        return out.float()


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """DiTPipeline's guidance: on the noise prediction (the first ``channels``); the learned variance
    (the rest) is dropped, since the pipeline passes only the noise prediction to the scheduler."""
    eps_cond, eps_uncond = cond[:, :channels], uncond[:, :channels]
    return eps_uncond + scale * (eps_cond - eps_uncond)
