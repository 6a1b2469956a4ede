"""CogVideoX adapter: diffusers' CogVideoXTransformer3DModel, sampled with CogVideoXPipeline's loop.

The model code is diffusers', unchanged. CogVideoX embeds text and video patches together and
then cuts the sequence into the text part and the video part inside its forward, so no module
outputs the video tokens alone: the video tokens are split where the first block receives them
(a pre-hook on ``transformer_blocks.0``) and gathered after ``proj_out`` (the last per-token
layer, before the model's own unpatchify). The 3-D rotary tables (the pipeline's, for the
latent's frames and size) are split the same way, so each rank's positions travel with its
tokens. Every block attends jointly over [text, video]; the text tokens stay whole on every rank
and SequenceParallelAttention handles them beside the split video tokens.

CogVideoX 1.5 patches time too (``patch_size_t`` latent frames per token, a linear patch
embedding): its video tokens are ordered (frame patch, row, column), as are the rows of its
rotary table (the pipeline's "slice" grid over the frame patches), so the same split applies. Its
pipeline pads the latent frames to a multiple of ``patch_size_t`` (extra noise frames in front,
dropped at the end: ``frame_padding``, applied by the sampling loop).

Supported: CogVideoX 1.0 text-to-video (2b: sin-cos positions, 5b: 3-D rotary) and CogVideoX 1.5
text-to-video. Refused by name (loading/cogvideox.py): image-to-video (32 input channels, 1.5's
ofs embedding).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..attention.usp import SequenceLayout, SequenceParallelAttention
from .module_sharding import ModuleSequencePlan, ModuleShardedForward
from .sharding import pad_to_multiple

COGVIDEOX_SEQUENCE_PLAN = ModuleSequencePlan(
    split_output_of=None,  # the first block's hidden_states keyword: see install_sequence_parallel
    gather_output_of="proj_out",
    attention_kwargs_name="attention_kwargs",
)
VAE_SPATIAL = 8  # the CogVideoX VAE's spatial compression (the pipeline's vae_scale_factor_spatial)


class ParallelCogVideoXAttnProcessor:
    """diffusers' CogVideoX joint attention (per-head LayerNorm of q and k, rotary on the video part)
    with the attention call routed through USP; the video tokens are this rank's shard."""

    def __init__(self, attention: SequenceParallelAttention):
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 layout: SequenceLayout | None = None):
        from diffusers.models.embeddings import apply_rotary_emb

        if layout is None:
            raise RuntimeError("sequence-parallel CogVideoX attention was called without a SequenceLayout")
        text = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        heads_view = (attn.heads, -1)
        # [B, H, S, D] as diffusers normalises and rotates them
        query, key, value = (proj(joint).unflatten(-1, heads_view).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :, :text], apply_rotary_emb(query[:, :, text:], image_rotary_emb)], dim=2)
            key = torch.cat([key[:, :, :text], apply_rotary_emb(key[:, :, text:], image_rotary_emb)], dim=2)
        out = self.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                             SequenceLayout(text, layout.image_tokens, layout.padded_image_tokens))
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))
        return out[:, text:], out[:, :text]


def install_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel, plan: ModuleSequencePlan = COGVIDEOX_SEQUENCE_PLAN,
                              make_processor=None) -> ModuleShardedForward:
    """Route every attention through USP and split the video tokens at the first block; returns the sharded forward.

    ``plan`` and ``make_processor(attention, forward)`` let a CogVideoX derivative (ConsisID) reuse this plan."""
    forward = ModuleShardedForward(model, plan, mesh)
    if forward.degree > 1:
        from diffusers.models.attention_processor import Attention

        attention = SequenceParallelAttention(mesh.group("ulysses"), mesh.group("ring"), lse_kernel)
        for module in model.modules():
            if isinstance(module, Attention):
                module.set_processor(make_processor(attention, forward) if make_processor is not None
                                     else ParallelCogVideoXAttnProcessor(attention))

        def split_video_tokens(module, args, kwargs):
            if forward._layout is None:  # a call that did not come through the sharded forward
                return None
            return args, {**kwargs, "hidden_states": forward._shard(kwargs["hidden_states"])}

        model.transformer_blocks[0].register_forward_pre_hook(split_video_tokens, with_kwargs=True)
    return forward


def frame_padding(config, frames: int) -> int:
    """Latent frames CogVideoXPipeline adds in front of ``frames`` so that they fill whole temporal patches."""
    patch_t = getattr(config, "patch_size_t", None)
    return 0 if not patch_t else -frames % patch_t


def rotary_tables(model, frames: int, height: int, width: int, device):
    """The pipeline's 3-D rotary tables (cos, sin) [frames x h x w tokens, head width] for a latent of
    ``frames`` x ``height`` x ``width``, from CogVideoXPipeline's own method (None without rotary)."""
    if not model.config.use_rotary_positional_embeddings:
        return None
    from diffusers import CogVideoXPipeline

    pipeline_view = SimpleNamespace(vae_scale_factor_spatial=VAE_SPATIAL, transformer=model)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        pipeline_view, height * VAE_SPATIAL, width * VAE_SPATIAL, frames, device)


class CogVideoXDenoiser:
    """CogVideoX's noise (v) prediction for pipeline-layout latents x [b, T, C, H, W], a scheduler timestep and T5 tokens."""

    def __init__(self, forward: ModuleShardedForward, dtype: torch.dtype, config):
        self.forward = forward
        self.dtype = dtype
        self.config = config
        self._rotary_key = self._rotary = None

    def _rotary_for(self, frames: int, height: int, width: int, device):
        key = (frames, height, width, str(device))
        if key != self._rotary_key:
            tables = self._rotary_tables(frames, height, width, device)
            if tables is not None and self.forward.degree > 1:
                # this rank's rows, padded as the video tokens are (padding rows never meet a real token)
                f = self.forward
                tables = tuple(pad_to_multiple(t, 0, f.degree).chunk(f.degree, dim=0)[f.shard_index] for t in tables)
            self._rotary_key, self._rotary = key, tables
        return self._rotary

    def _rotary_tables(self, frames: int, height: int, width: int, device):
        return rotary_tables(self.forward.model, frames, height, width, device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.forward(**self.model_inputs(x, timestep, context)).float()

    def model_inputs(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> dict:
        """The transformer's keyword inputs for x [b, T, C, H, W], checked for what the model takes."""
        b, frames, _, h, w = x.shape
        p, patch_t = self.config.patch_size, getattr(self.config, "patch_size_t", None)  # None: 1.0, ConsisID
        if h % p or w % p:
            raise ValueError(f"CogVideoX takes latents whose sides are multiples of {p} "
                             f"(videos in steps of {VAE_SPATIAL * p} px); got a {h}x{w} latent")
        if patch_t and frames % patch_t:  # the sampling loop pads them (frame_padding): a direct call did not
            raise ValueError(f"CogVideoX 1.5 takes latent frames in multiples of {patch_t}; got {frames}")
        if patch_t and self.config.use_rotary_positional_embeddings:
            # CogVideoX 1.5's rotary grid ("slice") has rows for at most sample_height x sample_width latent pixels
            most_h, most_w = self.config.sample_height, self.config.sample_width
            if h > most_h or w > most_w:
                raise ValueError(f"this CogVideoX 1.5 takes latents of at most {most_h}x{most_w} "
                                 f"({most_h * VAE_SPATIAL}x{most_w * VAE_SPATIAL} px), got {h}x{w}: make the video smaller")
        max_text = self.config.max_text_seq_length
        if not self.config.use_rotary_positional_embeddings and context.shape[1] != max_text:
            raise ValueError(f"this CogVideoX (sin-cos positions, as CogVideoX-2b) takes exactly {max_text} text "
                             f"tokens, got {context.shape[1]}: pad the T5 prompt to {max_text} tokens, as diffusers' "
                             "pipeline does")
        device = x.device
        return dict(
            hidden_states=x.to(self.dtype),
            encoder_hidden_states=context.to(device, self.dtype).expand(b, -1, -1),
            timestep=torch.as_tensor(timestep, device=device).reshape(1).expand(b),
            image_rotary_emb=self._rotary_for(frames, h, w, device),
        )
