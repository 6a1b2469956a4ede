"""Flux.1 adapter: ComfyUI's latent layout in, diffusers' FluxTransformer2DModel in the middle.

The model code is diffusers', unchanged. Parallelism enters through the attention processor
(which hands joint attention to SequenceParallelAttention) and the sequence plan below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from ..attention.usp import SequenceParallelAttention
from .sharding import SequencePlan, SequenceShardedForward

# Image tokens are split across the sequence-parallel ranks, and so are the text tokens where their
# count divides by the degree (else replicated); the pooled vector, timestep and guidance are
# replicated because every token needs them.
FLUX_SEQUENCE_PLAN = SequencePlan(
    split_inputs={"hidden_states": 1, "img_ids": 0},
    text_input="encoder_hidden_states",
    output_dim=1,
    attention_kwargs_name="joint_attention_kwargs",
    split_text_inputs={"encoder_hidden_states": 1, "txt_ids": 0},
)

PATCH = 2
LATENT_CHANNELS = 16
# ComfyUI's Flux latent format: model space = (latent - shift) * scale.
LATENT_SCALE = 0.3611
LATENT_SHIFT = 0.1159


def latent_to_model_space(latent: torch.Tensor) -> torch.Tensor:
    return (latent - LATENT_SHIFT) * LATENT_SCALE


def latent_from_model_space(x: torch.Tensor) -> torch.Tensor:
    return x / LATENT_SCALE + LATENT_SHIFT


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (H, W even) -> [B, (H/2)(W/2), C*4] in ComfyUI's (c ph pw) order."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    x = tokens.view(b, h // PATCH, w // PATCH, channels, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h, w)


def image_ids(h_tokens: int, w_tokens: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    ids = torch.zeros(h_tokens, w_tokens, 3, dtype=dtype, device=device)
    ids[..., 1] = torch.arange(h_tokens, dtype=dtype, device=device)[:, None]
    ids[..., 2] = torch.arange(w_tokens, dtype=dtype, device=device)[None, :]
    return ids.reshape(h_tokens * w_tokens, 3)


def flux_query_key_value(attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
    """diffusers' Flux attention inputs: [B, text + image, H, D] queries, keys, values (text first), rotary applied."""
    heads_view = (-1, attn.head_dim)
    query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, heads_view))
    key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, heads_view))
    value = attn.to_v(hidden_states).unflatten(-1, heads_view)
    if encoder_hidden_states is not None:
        text_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, heads_view))
        text_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, heads_view))
        text_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, heads_view)
        query = torch.cat([text_query, query], dim=1)
        key = torch.cat([text_key, key], dim=1)
        value = torch.cat([text_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


def flux_attention_output(attn, out: torch.Tensor, joint: bool, text_tokens: int):
    """diffusers' Flux output projections of the attention result [B, S, H*D]: (image, text) for a
    joint (double) block, the bare result for a single block."""
    if not joint:
        return out
    text_out, image_out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
    image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
    return image_out, attn.to_add_out(text_out.contiguous())


class ParallelFluxAttnProcessor:
    """diffusers' Flux joint attention with the attention call routed through sequence parallelism."""

    def __init__(self, attention: SequenceParallelAttention):
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, layout=None):
        if layout is None:
            raise RuntimeError("sequence-parallel Flux attention was called without a SequenceLayout")
        query, key, value = flux_query_key_value(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = self.attention(query, key, value, layout).flatten(2, 3).to(query.dtype)
        return flux_attention_output(attn, out, encoder_hidden_states is not None, layout.text_tokens)


def sequence_parallel_attention(mesh, lse_kernel) -> SequenceParallelAttention | None:
    """The USP attention of this mesh, or None without sequence parallelism."""
    if mesh.size("ulysses") * mesh.size("ring") > 1:
        return SequenceParallelAttention(mesh.group("ulysses"), mesh.group("ring"), lse_kernel,
                                         head_chunks=mesh.config.ulysses_head_chunks)
    return None


def install_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel) -> SequenceShardedForward:
    """Route the model's attention through USP and return the sharded forward to call it with."""
    attention = sequence_parallel_attention(mesh, lse_kernel)
    if attention is not None:
        model.set_attn_processor(ParallelFluxAttnProcessor(attention))
        if mesh.config.overlaps_mlp:  # implies Ulysses without Ring (ParallelConfig refuses the rest)
            from .flux_overlap import overlap_single_blocks

            overlap_single_blocks(model)
    return SequenceShardedForward(model, FLUX_SEQUENCE_PLAN, mesh)


def controlled_forward(model: torch.nn.Module, mesh) -> SequenceShardedForward:
    """The sharded forward of the model with ControlNet residuals (install_sequence_parallel first)."""
    from .flux_controlnet import CONTROLLED_FLUX_PLAN, ControlledFlux

    return SequenceShardedForward(ControlledFlux(model), CONTROLLED_FLUX_PLAN, mesh)


class FluxDenoiser:
    """v-prediction of Flux for ComfyUI-layout latents in model space: x [B, 16, H, W] -> v."""

    def __init__(self, forward: SequenceShardedForward, dtype: torch.dtype, has_guidance: bool,
                 controlled: SequenceShardedForward | None = None):
        self.forward = forward
        self.dtype = dtype
        self.has_guidance = has_guidance
        self.controlled = controlled  # the same model with ControlNet residuals

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, guidance: float | None,
                 controls=()) -> torch.Tensor:
        """controls: (ActiveControl, control tokens of these rows) pairs active at this sigma."""
        b, c, h, w = x.shape
        # ComfyUI pads odd sizes to the patch size with circular padding and crops back.
        pad_h, pad_w = -h % PATCH, -w % PATCH
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
        hp, wp = x.shape[-2:]
        device = x.device
        tokens = pack(x).to(self.dtype)
        context = context.to(device, self.dtype).expand(b, -1, -1)
        pooled = pooled.to(device, self.dtype).expand(b, -1)
        guidance_vec = None
        if self.has_guidance:
            guidance_vec = torch.full((b,), 3.5 if guidance is None else float(guidance), device=device, dtype=torch.float32)
        forward, extra = self.forward, {}
        if controls:
            forward = self.controlled
            extra = dict(controls=[c for c, _ in controls], controlnet_conds=[t for _, t in controls])
            if not self.has_guidance:  # the ControlNet may have a guidance embedder of its own
                extra["controlnet_guidance"] = torch.full((b,), 3.5 if guidance is None else float(guidance), device=device)
        out = forward(
            **extra,
            hidden_states=tokens,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=sigma.expand(b).to(device, torch.float32),
            img_ids=image_ids(hp // PATCH, wp // PATCH, torch.float32, device),
            txt_ids=torch.zeros(context.shape[1], 3, dtype=torch.float32, device=device),
            guidance=guidance_vec,
        )
        return unpack(out.float(), c, hp, wp)[:, :, :h, :w]
