"""Latte adapter: diffusers' LatteTransformer3DModel, sampled with LattePipeline's loop.

The model code is diffusers', unchanged. Latte patch-embeds every frame on its own (the video is
[B x F] images of N = h x w tokens each) and alternates two kinds of blocks:

- spatial blocks: self-attention among the N tokens of one frame, cross-attention to the text;
- temporal blocks: self-attention among the F frames at one spatial position (the model moves
  the tokens from [B x F, N, D] to [B x N, F, D] and back around each of them).

The plan (LATTE_SEQUENCE_PLAN) splits the N spatial tokens of every frame across the
sequence-parallel ranks, the same positions on every frame, after ``pos_embed`` (positional
embedding added), and gathers them after ``proj_out`` (the last per-token layer, before the
model's own unpatchify). With that layout:

- a spatial block's self-attention needs every token of its frame: it goes through
  SequenceParallelAttention (USP over the per-frame sequence, padded to the degree);
  its cross-attention takes this rank's queries against the whole text, which every rank holds;
- a temporal block attends across frames at a fixed position, and each rank holds every frame of
  its positions, so it runs locally with no communication. The model's own reshapes infer the
  token count (``-1``), so they work on the shard; the one thing built for the whole frame is
  ``timestep_temp`` (one row per video x position), which a pre-hook cuts to the rows of this
  rank's positions (every position of a video has the same row, so this is exact);
- the feed-forward, norms and final modulation are per token.

Padding positions (when N does not divide) are never attended as keys in the spatial attention,
attend only among themselves in the temporal one, and are cut off at the gather.

The frame split (each rank some frames) would be the other choice; it needs an all-to-all around
every temporal block, where this one needs none.
"""

from __future__ import annotations

import torch

from ..attention.usp import SequenceParallelAttention
from .module_sharding import ModuleSequencePlan, ModuleShardedForward
from .pixart import ParallelSelfAttnProcessor

LATTE_SEQUENCE_PLAN = ModuleSequencePlan(
    split_output_of="pos_embed",  # [B x F, N, D]: the spatial tokens of every frame
    gather_output_of="proj_out",  # [B x F, N, p x p x C]
    # Latte passes no cross_attention_kwargs to its blocks: the processors ask the forward for the layout.
    attention_kwargs_name=None,
)
TIMESTEP_ARG = 4  # BasicTransformerBlock.forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep, ...)


class ParallelLatteSpatialAttnProcessor:
    """A spatial block's self-attention through USP, with the layout of the call in progress."""

    def __init__(self, attention: SequenceParallelAttention, forward: ModuleShardedForward):
        self.inner = ParallelSelfAttnProcessor(attention)
        self.forward = forward

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.inner(attn, hidden_states, layout=self.forward.current_layout())


def install_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel) -> ModuleShardedForward:
    """Spatial self-attention through USP, temporal timesteps cut to this rank's positions; returns the sharded forward."""
    forward = ModuleShardedForward(model, LATTE_SEQUENCE_PLAN, mesh)
    if forward.degree == 1:
        return forward
    processor = ParallelLatteSpatialAttnProcessor(
        SequenceParallelAttention(mesh.group("ulysses"), mesh.group("ring"), lse_kernel), forward)
    for block in model.transformer_blocks:
        block.attn1.set_processor(processor)

    def this_ranks_timestep_rows(module, args):
        layout = forward._layout
        if layout is None:  # a call that did not come through the sharded forward
            return None
        hidden_states, timestep = args[0], args[TIMESTEP_ARG]
        videos = timestep.shape[0] // layout.image_tokens  # timestep_temp: one row per video x position
        positions = hidden_states.shape[0] // videos  # this rank's positions (padded)
        rows = timestep.view(videos, layout.image_tokens, -1)[:, :1].expand(videos, positions, -1)
        return (*args[:TIMESTEP_ARG], rows.reshape(videos * positions, -1), *args[TIMESTEP_ARG + 1:])

    for block in model.temporal_transformer_blocks:
        block.register_forward_pre_hook(this_ranks_timestep_rows)
    return forward


class LatteDenoiser:
    """Latte's output for latents x [b, C, F, H, W] (the pipeline's layout, ComfyUI's too), a scheduler
    timestep and T5 tokens -> [b, 2C, F, H, W] (noise prediction, then the learned variance)."""

    def __init__(self, forward: ModuleShardedForward, dtype: torch.dtype, config, enable_temporal_attentions: bool = True):
        self.forward = forward
        self.dtype = dtype
        self.config = config
        # LattePipeline's default; False runs the spatial blocks only (an image model on each frame).
        self.enable_temporal_attentions = enable_temporal_attentions

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, frames, h, w = x.shape
        p, length = self.config.patch_size, self.config.video_length
        if h % p or w % p:
            raise ValueError(f"Latte takes latents whose sides are multiples of {p} (videos in steps of {8 * p} px); "
                             f"got a {h}x{w} latent")
        if self.enable_temporal_attentions and frames not in (1, length):
            # The model adds its temporal positions [video_length, D] to the frames.
            raise ValueError(f"this Latte takes {length} latent frames (its video_length; one frame per video frame), "
                             f"got {frames}: make the empty latent {length} frames long (EmptyHunyuanLatentVideo: "
                             f"length {(length - 1) * 4 + 1})")
        device = x.device
        out = self.forward(
            hidden_states=x.to(self.dtype),
            encoder_hidden_states=context.to(device, self.dtype).expand(b, -1, -1),
            # As LattePipeline: the scheduler's timestep, one per video.
            timestep=torch.as_tensor(timestep, device=device).reshape(1).expand(b),
            enable_temporal_attentions=self.enable_temporal_attentions,
        )
        return out.float()
