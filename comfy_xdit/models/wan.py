"""Wan 2.1 / 2.2 text-to-video adapter: ComfyUI's 5-D video latent in, diffusers' WanTransformer3DModel in the middle.

The model code is diffusers', unchanged. Wan patch-embeds the latent [B, C, T, H, W] into
T x H/2 x W/2 video tokens inside its forward, so the plan splits those tokens where the first
block receives them, splits the rotary tables (``rope``'s cos and sin, one row per token) the same
way so every rank rotates its own tokens by their own positions, and gathers after ``proj_out``,
before the model's unpatchify.

Self-attention (video tokens only) goes through SequenceParallelAttention with no text tokens.
Cross-attention needs no communication: each rank's video queries attend to the whole text,
which every rank holds, so diffusers' own processor runs on the shard unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from ..attention.usp import SequenceParallelAttention
from .module_sharding import ModuleSequencePlan, ModuleShardedForward

WAN_SEQUENCE_PLAN = ModuleSequencePlan(
    split_output_of=None,
    split_first_input_of="blocks.0",  # the flattened patch embedding [B, tokens, D]
    also_split_outputs_of=("rope",),  # (cos, sin), each [1, tokens, 1, head_dim]
    gather_output_of="proj_out",
    # Wan's forward passes no kwargs to its attention processors: they ask for the layout.
    attention_kwargs_name=None,
)


class ParallelWanSelfAttnProcessor:
    """diffusers' Wan self-attention (q/k RMSNorm across heads, rotary) with the attention call routed through USP."""

    def __init__(self, attention: SequenceParallelAttention, forward: ModuleShardedForward):
        self.attention = attention
        self.forward = forward

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        heads_view = (attn.heads, -1)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, heads_view)
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, heads_view)
        value = attn.to_v(hidden_states).unflatten(2, heads_view)
        if rotary_emb is not None:
            # rope gives [1, tokens, 1, head_dim] tables, interleaved pairs: diffusers' real-valued rotary.
            cos, sin = (table[0, :, 0] for table in rotary_emb)
            query = apply_rotary_emb(query, (cos, sin), sequence_dim=1)
            key = apply_rotary_emb(key, (cos, sin), sequence_dim=1)
        out = self.attention(query, key, value, self.forward.current_layout()).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def install_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel) -> ModuleShardedForward:
    """Route the model's self-attention through USP and return the sharded forward to call it with."""
    forward = ModuleShardedForward(model, WAN_SEQUENCE_PLAN, mesh)
    if mesh.size("ulysses") * mesh.size("ring") > 1:
        if model.config.added_kv_proj_dim is not None or model.config.image_dim is not None:
            raise ValueError("sequence parallelism supports Wan text-to-video models only (this one takes image inputs)")
        attention = SequenceParallelAttention(mesh.group("ulysses"), mesh.group("ring"), lse_kernel)
        processor = ParallelWanSelfAttnProcessor(attention, forward)
        for block in model.blocks:
            block.attn1.set_processor(processor)
    return forward


class WanDenoiser:
    """v-prediction of Wan for ComfyUI-layout video latents in model space: x [B, 16, T, H, W] -> v."""

    def __init__(self, forward: ModuleShardedForward, dtype: torch.dtype, patch_size: tuple[int, int, int],
                 timestep_multiplier: float):
        self.forward = forward
        self.dtype = dtype
        self.patch_size = tuple(patch_size)
        self.timestep_multiplier = timestep_multiplier

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = x.shape
        # ComfyUI's Wan pads frames, rows and columns to the patch size (circular) and crops back.
        pad = []
        for size, patch in zip((w, h, t), self.patch_size[::-1]):
            pad += [0, -size % patch]
        if any(pad):
            x = F.pad(x, pad, mode="circular")
        device = x.device
        # ComfyUI's model sampling hands the model sigma * multiplier, in float32.
        timestep = (sigma.to(device, torch.float32) * self.timestep_multiplier).expand(b)
        out = self.forward(
            hidden_states=x.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=context.to(device, self.dtype).expand(b, -1, -1),
        )
        return out.float()[:, :, :t, :h, :w]
