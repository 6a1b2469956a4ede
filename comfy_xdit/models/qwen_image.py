"""Qwen-Image adapter: ComfyUI's (one-frame) latent in, diffusers' QwenImageTransformer2DModel in the middle.

The model code is diffusers', unchanged, with two things of ours:

- The rotary tables. diffusers builds them from ``img_shapes`` inside its forward; ComfyUI puts
  the image and text tokens at other positions for odd token grids and computes the angles in
  double precision. ``ComfyRotaryTables`` replaces the model's parameter-free ``pos_embed`` and
  returns diffusers' table format (complex, one row per token) at ComfyUI's positions, so the
  unchanged processor rotates exactly as ComfyUI does.
- Sequence parallelism (QWEN_IMAGE_SEQUENCE_PLAN): the image tokens are split where ``img_in``
  makes them, the image rows of the rotary table the same way (its ``image`` submodule, so each
  rank rotates its own tokens by their own positions; the text rows stay whole), and gathered
  after ``proj_out``. The joint text+image attention goes through SequenceParallelAttention.

ComfyUI's Qwen-Image never hands the text encoder's attention mask to its model (its extra_conds
do not pass it), so neither do we: every text token it is given is attended.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from ..attention.usp import SequenceLayout, SequenceParallelAttention
from .flux import pack, unpack
from .module_sharding import ModuleSequencePlan, ModuleShardedForward

PATCH = 2

QWEN_IMAGE_SEQUENCE_PLAN = ModuleSequencePlan(
    split_output_of="img_in",  # the image tokens [B, tokens, D]
    also_split_outputs_of=("pos_embed.image",),  # their rotary rows [1, tokens, head_dim / 2]
    gather_output_of="proj_out",
    attention_kwargs_name="attention_kwargs",
)


def _angles(positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """[N, axes] integer positions -> [N, head_dim / 2] rotation angles, in float64 as ComfyUI's rope()."""
    parts = []
    for axis, dim in enumerate(axes_dims):
        omega = 1.0 / theta ** torch.linspace(0, (dim - 2) / dim, dim // 2, dtype=torch.float64)
        parts.append(positions[:, axis, None].double() * omega[None, :].to(positions.device))
    return torch.cat(parts, dim=-1)


def _table(angles: torch.Tensor) -> torch.Tensor:
    # ComfyUI takes cos and sin in double precision and keeps them in float32.
    return torch.complex(torch.cos(angles).float(), torch.sin(angles).float())


class _ImageRows(torch.nn.Module):
    """The image tokens' rotary rows: (frame 0, row, column), centred on the grid as ComfyUI does."""

    def __init__(self, axes_dims: tuple[int, ...], theta: float):
        super().__init__()
        self.axes_dims, self.theta = axes_dims, theta

    def forward(self, height: int, width: int, device) -> torch.Tensor:
        rows = torch.arange(height, device=device) - height // 2
        cols = torch.arange(width, device=device) - width // 2
        grid = torch.stack([torch.zeros(height, width, dtype=torch.long, device=device),
                            rows[:, None].expand(height, width), cols[None, :].expand(height, width)], dim=-1)
        return _table(_angles(grid.reshape(-1, 3), self.axes_dims, self.theta))[None]


class ComfyRotaryTables(torch.nn.Module):
    """Stands in for diffusers' QwenEmbedRope: same call, same (image, text) output format, ComfyUI's positions.

    ComfyUI places text token k at (s + k, s + k, s + k) with s = max(rows // 2, columns // 2) of the
    token grid, and image token (r, c) at (0, r - rows // 2, c - columns // 2); diffusers agrees for
    even grids only.
    """

    def __init__(self, axes_dims: tuple[int, ...], theta: float = 10000.0):
        super().__init__()
        self.axes_dims, self.theta = tuple(axes_dims), theta
        self.image = _ImageRows(self.axes_dims, theta)

    def forward(self, video_fhw, max_txt_seq_len, device=None):
        frames, height, width = video_fhw[0] if isinstance(video_fhw, list) else video_fhw
        if frames != 1:
            raise ValueError(f"Qwen-Image makes single images; got {frames} frames")
        start = max(height // 2, width // 2)
        text = (start + torch.arange(int(max_txt_seq_len), device=device))[:, None].expand(-1, 3)
        return self.image(height, width, device)[0], _table(_angles(text, self.axes_dims, self.theta))


class ParallelQwenImageAttnProcessor:
    """diffusers' Qwen-Image joint attention ([text, image], q/k RMSNorm, rotary) with the attention call routed through USP."""

    def __init__(self, attention: SequenceParallelAttention):
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, layout: SequenceLayout | None = None):
        if layout is None:
            raise RuntimeError("sequence-parallel Qwen-Image attention was called without a SequenceLayout")
        if encoder_hidden_states_mask is not None or attention_mask is not None:
            raise ValueError("sequence-parallel Qwen-Image attention takes no attention mask (ComfyUI passes none)")
        head_dim = attn.inner_dim // attn.heads

        def project(linear, norm, x):
            x = linear(x).unflatten(-1, (-1, head_dim))
            return norm(x) if norm is not None else x

        image_freqs, text_freqs = image_rotary_emb
        query = torch.cat([apply_rotary_emb_qwen(project(attn.add_q_proj, attn.norm_added_q, encoder_hidden_states), text_freqs, use_real=False),
                           apply_rotary_emb_qwen(project(attn.to_q, attn.norm_q, hidden_states), image_freqs, use_real=False)], dim=1)
        key = torch.cat([apply_rotary_emb_qwen(project(attn.add_k_proj, attn.norm_added_k, encoder_hidden_states), text_freqs, use_real=False),
                         apply_rotary_emb_qwen(project(attn.to_k, attn.norm_k, hidden_states), image_freqs, use_real=False)], dim=1)
        value = torch.cat([project(attn.add_v_proj, None, encoder_hidden_states), project(attn.to_v, None, hidden_states)], dim=1)

        text_tokens = encoder_hidden_states.shape[1]
        out = self.attention(query, key, value, dataclasses.replace(layout, text_tokens=text_tokens)).flatten(2, 3).to(query.dtype)
        text_out, image_out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(text_out.contiguous())


def install_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel) -> ModuleShardedForward:
    """ComfyUI's rotary tables, the joint attention through USP; returns the sharded forward to call the model with."""
    config = model.config
    if config.zero_cond_t or config.use_additional_t_cond or config.use_layer3d_rope:
        raise ValueError("only Qwen-Image text-to-image models are supported (this one is an edit or layered variant)")
    # Parameter-free (the tables are computed per call), so replacing it moves no weight.
    model.pos_embed = ComfyRotaryTables(config.axes_dims_rope)
    if mesh.size("ulysses") * mesh.size("ring") > 1:
        attention = SequenceParallelAttention(mesh.group("ulysses"), mesh.group("ring"), lse_kernel)
        model.set_attn_processor(ParallelQwenImageAttnProcessor(attention))
    return ModuleShardedForward(model, QWEN_IMAGE_SEQUENCE_PLAN, mesh)


class QwenImageDenoiser:
    """Flow velocity of Qwen-Image for ComfyUI-layout latents in model space: x [B, 16, 1, H, W] -> v.

    ComfyUI's Qwen-Image uses the Wan 2.1 latent format (a one-frame video latent) and feeds its
    model 2x2 patches packed as Flux's, padded circularly to even sizes and cropped back; the
    timestep is sigma (ModelSamplingFlux), which the model's embedder scales by 1000.
    """

    def __init__(self, forward: ModuleShardedForward, dtype: torch.dtype):
        self.forward = forward
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[2] != 1:
            raise ValueError(f"Qwen-Image makes single images: it takes a one-frame latent, got shape {list(x.shape)}")
        b, c, _, h, w = x.shape
        image = x[:, :, 0]
        pad_h, pad_w = -h % PATCH, -w % PATCH
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="circular")
        hp, wp = image.shape[-2:]
        device = x.device
        out = self.forward(
            hidden_states=pack(image).to(self.dtype),
            encoder_hidden_states=context.to(device, self.dtype).expand(b, -1, -1),
            timestep=sigma.to(device, torch.float32).expand(b),
            img_shapes=[(1, hp // PATCH, wp // PATCH)] * b,
        )
        return unpack(out.float(), c, hp, wp)[:, :, :h, :w].unsqueeze(2)
