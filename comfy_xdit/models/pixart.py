"""PixArt-alpha / PixArt-Sigma adapter: ComfyUI's latent layout in, diffusers' PixArtTransformer2DModel in the middle.

The model code is diffusers', unchanged. Like SD3, PixArt patch-embeds inside its forward, so the
image tokens are split after ``pos_embed`` and gathered after ``proj_out`` (PIXART_SEQUENCE_PLAN).
Only the self-attention (``attn1``) mixes image tokens, so only it goes through
SequenceParallelAttention. The cross-attention (``attn2``) takes this rank's image queries
against all text tokens, which every rank holds: it needs no communication and runs as diffusers
wrote it.

What differs from diffusers' own pipeline, to match ComfyUI (comfy/ldm/pixart/pixartms.py):

- the sin-cos positional embedding is ComfyUI's: its base size follows the resolution
  (round((H + W) / 2 / 64) * 64 / patch), and its interpolation too unless the checkpoint fixed
  it (an original-layout file with a ``pos_embed`` table; diffusers' config ``interpolation_scale``);
- the resolution / aspect-ratio micro-conditions (PixArt-alpha only) are the conditioning's
  width and height (CLIPTextEncodePixArtAlpha) or else the latent's pixel size, as ComfyUI does;
- the timestep is ComfyUI's: the index of the nearest tabulated sigma (discrete_sampling.py);
- of the learned-sigma output (8 channels) the first 4, the noise prediction, are kept.
"""

from __future__ import annotations

import dataclasses

import torch

from ..attention.usp import SequenceLayout, SequenceParallelAttention
from .module_sharding import ModuleSequencePlan, ModuleShardedForward

# The image tokens exist from the patch embedding (positional embedding added) to the output
# projection; the text tokens and the timestep embedding are replicated on every rank because
# every image token needs all of them.
PIXART_SEQUENCE_PLAN = ModuleSequencePlan(
    split_output_of="pos_embed",
    gather_output_of="proj_out",
    attention_kwargs_name="cross_attention_kwargs",
)


class ParallelSelfAttnProcessor:
    """diffusers' PixArt self-attention with the attention call routed through USP (image tokens only)."""

    def __init__(self, attention: SequenceParallelAttention):
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, layout: SequenceLayout | None = None):
        if layout is None:
            raise RuntimeError("sequence-parallel PixArt attention was called without a SequenceLayout")
        heads_view = (attn.heads, -1)
        query = attn.to_q(hidden_states).unflatten(-1, heads_view)
        key = attn.to_k(hidden_states).unflatten(-1, heads_view)
        value = attn.to_v(hidden_states).unflatten(-1, heads_view)
        out = self.attention(query, key, value, dataclasses.replace(layout, text_tokens=0))
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))


class LocalCrossAttnProcessor:
    """diffusers' own cross-attention; takes (and ignores) the layout the self-attention needs."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, layout: SequenceLayout | None = None):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


def comfy_pos_embed(embed_dim: int, grid_h: int, grid_w: int, patch_size: int, fixed_interpolation: float | None,
                    device, dtype) -> torch.Tensor:
    """ComfyUI's PixArt positional embedding [1, grid_h * grid_w, D] for a latent of (grid * patch) pixels/8."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    c_res = (grid_h * patch_size + grid_w * patch_size) // 2
    if round(c_res / 64) == 0:  # ComfyUI divides by zero there
        raise ValueError(f"PixArt needs images whose (width + height) / 2 is at least 264 px (as in ComfyUI); "
                         f"got a {grid_h * patch_size}x{grid_w * patch_size} latent: use a larger empty latent")
    interpolation = fixed_interpolation if fixed_interpolation is not None else round(c_res / (512 / 8.0), 0)
    base_size = (round(c_res / 64) * 64) // patch_size
    embed = get_2d_sincos_pos_embed(embed_dim, (grid_h, grid_w), base_size=base_size, interpolation_scale=interpolation,
                                    device=device)
    return embed.to(dtype).unsqueeze(0)


def _add_comfy_pos_embed(model: torch.nn.Module) -> None:
    """Replace diffusers' positional embedding (fixed base size) by ComfyUI's, as a hook on ``pos_embed``."""
    patch_embed = model.pos_embed
    patch_embed.pos_embed = None  # diffusers' PatchEmbed then returns the patch tokens alone
    patch_size, fixed = model.config.patch_size, model.config.interpolation_scale

    def add(module, args, tokens: torch.Tensor) -> torch.Tensor:
        h, w = args[0].shape[-2] // patch_size, args[0].shape[-1] // patch_size
        return tokens + comfy_pos_embed(tokens.shape[-1], h, w, patch_size, fixed, tokens.device, tokens.dtype)

    patch_embed.register_forward_hook(add)  # registered before the split hook, so it sees the whole grid


def install_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel) -> ModuleShardedForward:
    """ComfyUI's positional embedding, attention routed through USP; returns the sharded forward to call."""
    _add_comfy_pos_embed(model)
    if mesh.size("ulysses") * mesh.size("ring") > 1:
        attention = SequenceParallelAttention(mesh.group("ulysses"), mesh.group("ring"), lse_kernel)
        processors = {}
        for name in model.attn_processors:
            processors[name] = ParallelSelfAttnProcessor(attention) if ".attn1." in name else LocalCrossAttnProcessor()
        model.set_attn_processor(processors)
    return ModuleShardedForward(model, PIXART_SEQUENCE_PLAN, mesh)


class PixArtDenoiser:
    """Noise prediction of PixArt for ComfyUI-layout model inputs (already scaled by c_in): x [B, 4, H, W] -> eps."""

    def __init__(self, forward: ModuleShardedForward, dtype: torch.dtype, config, sampling):
        self.forward = forward
        self.dtype = dtype
        self.patch_size = config.patch_size
        self.in_channels = config.in_channels
        self.micro_conditions = bool(forward.model.use_additional_conditions)
        self.sampling = sampling  # turns sigma into the model's timestep

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                 size: tuple[float, float] | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"PixArt takes latents whose sides are multiples of {self.patch_size} "
                             f"(images in steps of {8 * self.patch_size} px); got a {h}x{w} latent")
        device = x.device
        timestep = self.sampling.timestep(sigma.to(device, torch.float32)).expand(b)
        added = None
        if self.micro_conditions:
            # ComfyUI's PixArt extra_conds: the conditioning's width/height, else the latent's pixels.
            height, width = size if size is not None else (h * 8, w * 8)
            added = {
                "resolution": torch.tensor([[height, width]], dtype=torch.float32, device=device).to(self.dtype).expand(b, -1),
                "aspect_ratio": torch.tensor([[height / width]], dtype=torch.float32, device=device).to(self.dtype).expand(b, -1),
            }
        out = self.forward(
            hidden_states=x.to(self.dtype),
            encoder_hidden_states=context.to(device, self.dtype).expand(b, -1, -1),
            timestep=timestep,
            added_cond_kwargs=added,
        )
        return out.float()[:, : self.in_channels]
