"""Mochi 1 (Genmo mochi-1-preview) text-to-video adapter: ComfyUI's 5-D video latent in, diffusers' MochiTransformer3DModel in the middle.

The model code is diffusers', unchanged, with these things of ours:

- Sequence parallelism (MOCHI_SEQUENCE_PLAN): diffusers patch-embeds frame by frame and flattens
  the tokens inside its forward, so the plan splits the video tokens where the first block
  receives them (a keyword input) and gathers after ``proj_out``. The rotary tables (cos, sin,
  [tokens, heads, head_dim / 2], tokens first) come from ``rope.rows`` as one [1, tokens, 2, ...]
  tensor the plan splits with the tokens; ``rope`` itself returns diffusers' format.
- Asymmetric joint attention: video (3072 wide) and text (1536 wide) have their own projections
  to the same heads; every block attends over [video, text] jointly. The processor hands
  SequenceParallelAttention [text, video shard] (text whole on every rank; the order of keys does
  not change attention) and splits the result back; text outputs go through ``to_add_out`` except
  in the last block, which has none (its text output is unused, as in diffusers).
- The timestep embedding's sinusoid (``time_embed.time_proj``) at ComfyUI's order of operations;
  diffusers divides by half the width where ComfyUI multiplies by the reciprocal, which differs in
  the last bit and, at timesteps near 1000, by up to about 1e-4 in the angles.

The text attention mask: ComfyUI's Mochi text encoder pads T5 to 256 tokens and passes a mask;
stock Mochi attends to the first ``sum(mask)`` text tokens only (and pools those), so the padded
tokens never reach the video. The bridge therefore crops the padding away (refusing a mask that is
not a prefix, which stock would read differently) and the model always gets an all-ones mask: no
mask has to follow the text into the sequence-parallel attention.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..attention.usp import SequenceParallelAttention
from .module_sharding import ModuleSequencePlan, ModuleShardedForward

MOCHI_SEQUENCE_PLAN = ModuleSequencePlan(
    split_output_of=None,
    split_first_input_of="transformer_blocks.0",  # hidden_states= [B, video tokens, D]
    first_input_keyword="hidden_states",
    also_split_outputs_of=("rope.rows",),  # [1, video tokens, 2 (cos, sin), heads, head_dim / 2]
    gather_output_of="proj_out",
    # diffusers' Mochi passes no kwargs to its attention processors: they ask for the layout.
    attention_kwargs_name=None,
)


class _RotaryRows(torch.nn.Module):
    """diffusers' MochiRoPE tables stacked as [1, tokens, 2, heads, head_dim / 2] (tokens on dim 1, splittable)."""

    def __init__(self, rope: torch.nn.Module):
        super().__init__()
        self.rope = rope

    def forward(self, pos_frequencies, num_frames, height, width, device=None, dtype=None) -> torch.Tensor:
        cos, sin = self.rope(pos_frequencies, num_frames, height, width, device=device, dtype=dtype)
        return torch.stack([cos, sin], dim=1)[None]


class SplittableMochiRope(torch.nn.Module):
    """Stands in for diffusers' MochiRoPE: same call and output (cos, sin), computed through ``rows``."""

    def __init__(self, rope: torch.nn.Module):
        super().__init__()
        self.rows = _RotaryRows(rope)

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.rows(*args, **kwargs)[0]
        return table[:, 0], table[:, 1]


class ComfyTimestepSinusoid(torch.nn.Module):
    """diffusers' Timesteps(256, flip_sin_to_cos=True) at ComfyUI's Mochi precision: [cos, sin] of t x freqs."""

    def __init__(self, channels: int, max_period: float = 10000.0):
        super().__init__()
        self.channels, self.max_period = channels, max_period

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=timesteps.device)
        freqs = (freqs * (-math.log(self.max_period) / half)).exp()
        args = timesteps[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Mochi's real-valued rotary on interleaved pairs, in float32 as diffusers' processor does.
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([(even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)], dim=-1).flatten(-2)


class ParallelMochiAttnProcessor:
    """diffusers' Mochi asymmetric joint attention with the attention call routed through USP (all-ones text mask)."""

    def __init__(self, attention: SequenceParallelAttention, forward: ModuleShardedForward):
        self.attention = attention
        self.forward = forward

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        # attention_mask: all ones by construction (see the module docstring); the text is whole on every rank.
        heads_view = (attn.heads, -1)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(2, heads_view))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(2, heads_view))
        value = attn.to_v(hidden_states).unflatten(2, heads_view)
        text_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(2, heads_view))
        text_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(2, heads_view))
        text_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, heads_view)
        if image_rotary_emb is not None:
            query, key = (_rotate(x, *image_rotary_emb) for x in (query, key))

        text_tokens = text_query.shape[1]
        layout = dataclasses.replace(self.forward.current_layout(), text_tokens=text_tokens)
        out = self.attention(torch.cat([text_query, query], dim=1), torch.cat([text_key, key], dim=1),
                             torch.cat([text_value, value], dim=1), layout).flatten(2, 3).to(query.dtype)
        text_out, video_out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        video_out = attn.to_out[1](attn.to_out[0](video_out.contiguous()))
        if hasattr(attn, "to_add_out"):
            text_out = attn.to_add_out(text_out.contiguous())
        return video_out, text_out


def install_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel) -> ModuleShardedForward:
    """ComfyUI's timestep sinusoid, splittable rotary tables, joint attention through USP; returns the sharded forward."""
    # Both parameter-free, so replacing them moves no weight.
    model.time_embed.time_proj = ComfyTimestepSinusoid(model.time_embed.time_proj.num_channels)
    model.rope = SplittableMochiRope(model.rope)
    forward = ModuleShardedForward(model, MOCHI_SEQUENCE_PLAN, mesh)
    if mesh.size("ulysses") * mesh.size("ring") > 1:
        processor = ParallelMochiAttnProcessor(
            SequenceParallelAttention(mesh.group("ulysses"), mesh.group("ring"), lse_kernel), forward)
        for block in model.transformer_blocks:
            block.attn1.processor = processor
    return forward


class MochiDenoiser:
    """Flow velocity of Mochi for ComfyUI-layout video latents in model space: x [B, 12, T, H, W] -> v.

    ComfyUI's Mochi (model sampling multiplier 1) gets sigma and embeds (1 - sigma) x 1000; its
    model returns the negated network output, as Genmo's does; diffusers' model returns the network
    output itself (its pipeline inverts the sigmas instead).
    """

    def __init__(self, forward: ModuleShardedForward, dtype: torch.dtype, patch_size: int):
        self.forward = forward
        self.dtype = dtype
        self.patch_size = patch_size

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = x.shape
        # Rows and columns padded to the patch (circular, as ComfyUI's patch embedding) and cropped back.
        pad = (0, -w % self.patch_size, 0, -h % self.patch_size)
        if any(pad):
            x = F.pad(x, (*pad, 0, 0), mode="circular")
        device = x.device
        # float32 as ComfyUI: (1 - sigma), then x 1000 (its timestep_scale).
        timestep = ((1 - sigma.to(device, torch.float32)) * 1000.0).expand(b)
        context = context.to(device, self.dtype).expand(b, -1, -1)
        out = self.forward(
            hidden_states=x.to(self.dtype),
            encoder_hidden_states=context,
            timestep=timestep,
            encoder_attention_mask=torch.ones(context.shape[:2], dtype=torch.bool, device=device),
        )
        return -out.float()[:, :, :, :h, :w]
