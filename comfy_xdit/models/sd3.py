"""Stable Diffusion 3 / 3.5 (MMDiT) adapter: ComfyUI's latent layout in, diffusers' SD3Transformer2DModel in the middle.

The model code is diffusers', unchanged. SD3 patch-embeds the latent inside its forward, so the
image tokens are split after ``pos_embed`` and gathered after ``proj_out`` (SD3_SEQUENCE_PLAN),
and every attention (the joint text+image one, and SD3.5's image-only ``attn2``) goes through
SequenceParallelAttention.

Token order: diffusers' JointAttnProcessor2_0 concatenates [image, text]; SequenceParallelAttention
wants text first. Attention does not depend on the order of its keys, so the processor below puts
text first (as ComfyUI's own MMDiT does) and splits the output back by the text length.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..attention.usp import SequenceLayout, SequenceParallelAttention
from .module_sharding import ModuleSequencePlan, ModuleShardedForward

# The image tokens exist from the patch embedding (positional embedding added) to the output
# projection; the text tokens, timestep and pooled vector are replicated on every rank because
# every image token needs all of them.
SD3_SEQUENCE_PLAN = ModuleSequencePlan(
    split_output_of="pos_embed",
    gather_output_of="proj_out",
    attention_kwargs_name="joint_attention_kwargs",
)


class ParallelSD3AttnProcessor:
    """diffusers' SD3 joint attention (and image-only attn2) with the attention call routed through USP."""

    def __init__(self, attention: SequenceParallelAttention):
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, layout: SequenceLayout | None = None):
        if layout is None:
            raise RuntimeError("sequence-parallel SD3 attention was called without a SequenceLayout")
        heads_view = (attn.heads, -1)

        def project(linear, norm, x):
            x = linear(x).unflatten(-1, heads_view)
            return norm(x) if norm is not None else x

        query = project(attn.to_q, attn.norm_q, hidden_states)
        key = project(attn.to_k, attn.norm_k, hidden_states)
        value = attn.to_v(hidden_states).unflatten(-1, heads_view)
        text_tokens = 0
        if encoder_hidden_states is not None:
            text_tokens = encoder_hidden_states.shape[1]
            query = torch.cat([project(attn.add_q_proj, attn.norm_added_q, encoder_hidden_states), query], dim=1)
            key = torch.cat([project(attn.add_k_proj, attn.norm_added_k, encoder_hidden_states), key], dim=1)
            value = torch.cat([attn.add_v_proj(encoder_hidden_states).unflatten(-1, heads_view), value], dim=1)

        call_layout = dataclasses.replace(layout, text_tokens=text_tokens)
        out = self.attention(query, key, value, call_layout).flatten(2, 3).to(query.dtype)
        text_out, image_out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        if encoder_hidden_states is None:
            return image_out
        # The last block is "context pre-only": its text output is never used, and it has no to_add_out.
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out


def install_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel) -> ModuleShardedForward:
    """Route the model's attention through USP and return the sharded forward to call it with."""
    if mesh.size("ulysses") * mesh.size("ring") > 1:
        attention = SequenceParallelAttention(mesh.group("ulysses"), mesh.group("ring"), lse_kernel)
        model.set_attn_processor(ParallelSD3AttnProcessor(attention))
    return ModuleShardedForward(model, SD3_SEQUENCE_PLAN, mesh)


class SD3Denoiser:
    """v-prediction of SD3 for ComfyUI-layout latents in model space: x [B, 16, H, W] -> v."""

    def __init__(self, forward: ModuleShardedForward, dtype: torch.dtype, patch_size: int, timestep_multiplier: float):
        self.forward = forward
        self.dtype = dtype
        self.patch_size = patch_size
        self.timestep_multiplier = timestep_multiplier

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # ComfyUI's MMDiT pads odd sizes to the patch size with circular padding and crops back.
        pad_h, pad_w = -h % self.patch_size, -w % self.patch_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
        device = x.device
        # ComfyUI's model sampling hands the model sigma * multiplier, in float32.
        timestep = (sigma.to(device, torch.float32) * self.timestep_multiplier).expand(b)
        out = self.forward(
            hidden_states=x.to(self.dtype),
            encoder_hidden_states=context.to(device, self.dtype).expand(b, -1, -1),
            pooled_projections=pooled.to(device, self.dtype).expand(b, -1),
            timestep=timestep,
        )
        return out.float()[:, :, :h, :w]
