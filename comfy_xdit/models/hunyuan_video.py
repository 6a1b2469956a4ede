"""HunyuanVideo 1.0 text-to-video adapter: ComfyUI's 5-D video latent in, diffusers' HunyuanVideoTransformer3DModel in the middle.

The model code is diffusers', unchanged, with two things of ours:

- The rotary tables. diffusers computes them in float32; ComfyUI's HunyuanVideo (Flux's EmbedND)
  takes the angles in double precision. ``ComfyRotaryTables`` replaces the parameter-free ``rope``
  and returns diffusers' format (cos, sin, one row per video token) at ComfyUI's precision. Its
  rows come from a submodule (``rope.rows``) so the sequence plan can split them with the tokens.
  Text tokens get no rotation on either side (ComfyUI rotates them by position 0: the identity).
- Sequence parallelism (HUNYUAN_VIDEO_SEQUENCE_PLAN): the video tokens are split where
  ``x_embedder`` makes them and gathered after ``proj_out``; text tokens stay whole on every rank.
  diffusers orders the joint sequence [video, text] (as ComfyUI does); the processor hands it to
  SequenceParallelAttention as [text, video shard] (the order it takes; attention does not depend
  on the order of keys) and splits the result back.

The text attention mask: diffusers' forward requires one; the denoiser passes all ones, because
stock ComfyUI's HunyuanVideo text encoder drops its mask when no token is padded (always, for one
prompt) and a mask with padded tokens is refused before sampling (ComfyUI averages the padded
tokens into the token refiner's pooled vector, diffusers does not; see the README). The parallel
processor therefore attends to every text token; the text is never split, so no mask is needed
for padding of the video shards either (padded video keys are trimmed by SequenceParallelAttention).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from ..attention.usp import SequenceParallelAttention
from .module_sharding import ModuleSequencePlan, ModuleShardedForward

HUNYUAN_VIDEO_SEQUENCE_PLAN = ModuleSequencePlan(
    split_output_of="x_embedder",  # the video tokens [B, tokens, D]
    also_split_outputs_of=("rope.rows",),  # their rotary rows [1, tokens, 2, head_dim]
    gather_output_of="proj_out",
    # diffusers' HunyuanVideo passes no kwargs to its attention processors: they ask for the layout.
    attention_kwargs_name=None,
)


class _RotaryRows(torch.nn.Module):
    """[1, tokens, 2 (cos, sin), head_dim] for a (frames, rows, columns) token grid, angles in float64 as ComfyUI's rope()."""

    def __init__(self, axes_dims: tuple[int, ...], theta: float):
        super().__init__()
        self.axes_dims, self.theta = tuple(axes_dims), float(theta)

    def forward(self, grid: tuple[int, int, int], device) -> torch.Tensor:
        axes = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float64) for n in grid), indexing="ij")
        angles = []
        for position, dim in zip(axes, self.axes_dims):
            omega = 1.0 / self.theta ** torch.linspace(0, (dim - 2) / dim, dim // 2, dtype=torch.float64, device=device)
            angles.append(position.reshape(-1, 1) * omega)
        # Interleaved pairs (diffusers' repeat_interleave layout = ComfyUI's 2x2 rotation per pair).
        angles = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)
        return torch.stack([torch.cos(angles).float(), torch.sin(angles).float()], dim=1)[None]


class ComfyRotaryTables(torch.nn.Module):
    """Stands in for diffusers' HunyuanVideoRotaryPosEmbed: same call and output format, ComfyUI's precision."""

    def __init__(self, patch_size: int, patch_size_t: int, axes_dims: tuple[int, ...], theta: float):
        super().__init__()
        self.patch_size, self.patch_size_t = patch_size, patch_size_t
        self.rows = _RotaryRows(axes_dims, theta)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, frames, height, width = hidden_states.shape
        grid = (frames // self.patch_size_t, height // self.patch_size, width // self.patch_size)
        table = self.rows(grid, hidden_states.device)[0]
        return table[:, 0], table[:, 1]


class ParallelHunyuanVideoAttnProcessor:
    """diffusers' HunyuanVideo joint attention (dual- and single-stream blocks) with the attention call routed through USP."""

    def __init__(self, attention: SequenceParallelAttention, forward: ModuleShardedForward):
        self.attention = attention
        self.forward = forward

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        # attention_mask: all True by construction (see the module docstring); the text is whole on every rank.
        heads_view = (attn.heads, -1)
        video_tokens = hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        if single_stream:  # one projection for video and text, as diffusers' processor does
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(2, heads_view))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(2, heads_view))
        value = attn.to_v(hidden_states).unflatten(2, heads_view)
        if single_stream:
            (query, text_query), (key, text_key), (value, text_value) = (
                x.split_with_sizes([video_tokens, x.shape[1] - video_tokens], dim=1) for x in (query, key, value))
        else:
            text_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(2, heads_view))
            text_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(2, heads_view))
            text_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, heads_view)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text_tokens = text_query.shape[1]
        layout = dataclasses.replace(self.forward.current_layout(), text_tokens=text_tokens)
        out = self.attention(torch.cat([text_query, query], dim=1), torch.cat([text_key, key], dim=1),
                             torch.cat([text_value, value], dim=1), layout).flatten(2, 3).to(query.dtype)
        text_out, video_out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out.contiguous()))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out.contiguous())
        return video_out, text_out


def install_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel) -> ModuleShardedForward:
    """ComfyUI's rotary tables, the joint attention through USP; returns the sharded forward to call the model with."""
    config = model.config
    if config.image_condition_type is not None:
        raise ValueError(f"only HunyuanVideo text-to-video models are supported (this one is an image-to-video "
                         f"model: image_condition_type={config.image_condition_type!r})")
    # Parameter-free (the tables are computed per call), so replacing it moves no weight.
    model.rope = ComfyRotaryTables(config.patch_size, config.patch_size_t, tuple(config.rope_axes_dim), config.rope_theta)
    forward = ModuleShardedForward(model, HUNYUAN_VIDEO_SEQUENCE_PLAN, mesh)
    if mesh.size("ulysses") * mesh.size("ring") > 1:
        processor = ParallelHunyuanVideoAttnProcessor(
            SequenceParallelAttention(mesh.group("ulysses"), mesh.group("ring"), lse_kernel), forward)
        # Only the joint blocks: the text token refiner attends over the (replicated) text alone.
        for block in (*model.transformer_blocks, *model.single_transformer_blocks):
            block.attn.set_processor(processor)
    return forward


class HunyuanVideoDenoiser:
    """Flow velocity of HunyuanVideo for ComfyUI-layout video latents in model space: x [B, 16, T, H, W] -> v.

    ComfyUI hands the model sigma x 1000 as its timestep (token refiner included) and embeds the
    distilled guidance as guidance x 1000 (Flux's timestep embedding); diffusers' model takes both
    already scaled, as its pipeline passes them.
    """

    def __init__(self, forward: ModuleShardedForward, dtype: torch.dtype, patch_size: tuple[int, int, int],
                 has_guidance: bool, timestep_multiplier: float):
        self.forward = forward
        self.dtype = dtype
        self.patch_size = tuple(patch_size)
        self.has_guidance = has_guidance
        self.timestep_multiplier = timestep_multiplier

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 guidance: float | None) -> torch.Tensor:
        b, _, t, h, w = x.shape
        # Pad frames, rows and columns to the patch (circular, as ComfyUI's patch embedding) and crop back.
        pad = []
        for size, patch in zip((w, h, t), self.patch_size[::-1]):
            pad += [0, -size % patch]
        if any(pad):
            x = F.pad(x, pad, mode="circular")
        device = x.device
        timestep = (sigma.to(device, torch.float32) * self.timestep_multiplier).expand(b)
        guidance_vec = None
        if self.has_guidance:
            if guidance is None:
                raise ValueError("this HunyuanVideo model is guidance-distilled and needs a guidance value "
                                 "(FluxGuidance node; ComfyUI's default is 6.0)")
            # float32 first, as ComfyUI's FloatTensor([guidance]), then x 1000 as its embedding does.
            guidance_vec = (torch.tensor([guidance], dtype=torch.float32) * 1000.0).to(device).expand(b)
        context = context.to(device, self.dtype).expand(b, -1, -1)
        out = self.forward(
            hidden_states=x.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=context,
            encoder_attention_mask=torch.ones(context.shape[:2], dtype=torch.bool, device=device),
            pooled_projections=pooled.to(device, self.dtype).expand(b, -1),
            guidance=guidance_vec,
        )
        return out.float()[:, :, :t, :h, :w]
