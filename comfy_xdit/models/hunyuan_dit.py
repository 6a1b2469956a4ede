"""HunyuanDiT v1.0-1.2 adapter: ComfyUI's latent and CONDITIONING in, diffusers' HunyuanDiT2DModel in the middle.

The model code is diffusers', unchanged. HunyuanDiT patch-embeds inside its forward, so the image
tokens are split after ``pos_embed`` and gathered after ``proj_out`` (HUNYUAN_DIT_SEQUENCE_PLAN).
Everything between is per token or per image: the long skip connections join hidden states of
the same (local) tokens, so they need no communication. The 2-D rotary table is a forward
argument with one row per image token: each rank passes its own rows (padded like its tokens),
so every rank rotates its tokens by their own positions, in the self-attention (queries and keys)
and in the cross-attention (queries only). Only the self-attention (``attn1``) mixes image tokens,
so only it goes through SequenceParallelAttention; the cross-attention (``attn2``) takes this
rank's queries against the whole text, which every rank holds, and runs as diffusers wrote it.

What differs from diffusers' pipeline, to match ComfyUI (comfy/ldm/hydit/models.py):

- the rotary positions are ComfyUI's: a grid resized and centre-cropped into the 512 px base grid,
  spaced like numpy's ``linspace(start, stop, n, endpoint=False)`` (diffusers' pipeline spaces a
  cropped grid slightly differently, so non-square images would differ);
- odd latent sides are padded circularly to the patch size and cropped back, as ComfyUI's patch
  embedding does;
- the image meta size (v1.0/1.1 only) is ComfyUI's ``[height, width, target_height,
  target_width, 0, 0]``: the conditioning's, else the latent's pixel size (``meta_size``); style 0;
- the timestep is ComfyUI's: the index of the nearest tabulated sigma (discrete_sampling.py);
- of the learned-sigma output (8 channels) the first 4, the v prediction, are kept.

Text: ComfyUI replaces the masked tokens of the last ``text_len`` BERT tokens and the last
``text_len_t5`` mT5 tokens with the learned padding embeddings and then attends to every token;
diffusers does the same for exactly ``text_len`` + ``text_len_t5`` tokens, which is what the
stock encoders give for prompts up to 75 BERT / 255 mT5 tokens. Longer text is refused (see
``check_text_lengths``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..attention.usp import SequenceParallelAttention
from .module_sharding import ModuleSequencePlan, ModuleShardedForward
from .sharding import pad_to_multiple

# Image tokens exist from the patch embedding to the output projection; the text, the timestep
# embedding and the rotary table's other rows stay on every rank.
HUNYUAN_DIT_SEQUENCE_PLAN = ModuleSequencePlan(
    split_output_of="pos_embed",
    gather_output_of="proj_out",
    # The blocks pass no kwargs down to their attention processors: the processors ask for the layout.
    attention_kwargs_name=None,
)
BASE_PIXELS = 512  # ComfyUI's and the original's rotary base resolution


class ParallelSelfAttnProcessor:
    """diffusers' HunyuanDiT self-attention (per-head LayerNorm on q and k, rotary) with the attention call routed through USP."""

    def __init__(self, attention: SequenceParallelAttention, forward: ModuleShardedForward):
        self.attention = attention
        self.forward = forward

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        heads_view = (attn.heads, -1)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, heads_view))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, heads_view))
        value = attn.to_v(hidden_states).unflatten(-1, heads_view)
        if image_rotary_emb is not None:  # [S, D] tables: this rank's rows, tokens on dim 1
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        layout = dataclasses.replace(self.forward.current_layout(), text_tokens=0)
        out = self.attention(query, key, value, layout).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def crop_region(grid_h: int, grid_w: int, base: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The grid resized to fit the square base grid and centred in it: ((top, left), (bottom, right))."""
    if grid_h > grid_w:
        height, width = base, int(round(base / grid_h * grid_w))
    else:
        height, width = int(round(base / grid_w * grid_h)), base
    top, left = int(round((base - height) / 2.0)), int(round((base - width) / 2.0))
    return (top, left), (top + height, left + width)


def comfy_rotary(head_dim: int, grid_h: int, grid_w: int, patch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's HunyuanDiT rotary table (cos, sin), each [grid_h * grid_w, head_dim], rows in token order."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_from_grid

    (top, left), (bottom, right) = crop_region(grid_h, grid_w, BASE_PIXELS // 8 // patch_size)
    # numpy's linspace(start, stop, n, endpoint=False) in float64, stored as float32, as ComfyUI builds it
    rows = (torch.arange(grid_h, dtype=torch.float64) * ((bottom - top) / grid_h) + top).float()
    cols = (torch.arange(grid_w, dtype=torch.float64) * ((right - left) / grid_w) + left).float()
    grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"))  # [2 (column, row), H, W], as ComfyUI orders it
    cos, sin = get_2d_rotary_pos_embed_from_grid(head_dim, grid.reshape(2, 1, grid_h, grid_w), use_real=True)
    return cos.to(device), sin.to(device)


def install_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel) -> ModuleShardedForward:
    """Route the self-attention through USP; returns the sharded forward to call the model with."""
    forward = ModuleShardedForward(model, HUNYUAN_DIT_SEQUENCE_PLAN, mesh)
    if mesh.size("ulysses") * mesh.size("ring") > 1:
        processor = ParallelSelfAttnProcessor(SequenceParallelAttention(mesh.group("ulysses"), mesh.group("ring"), lse_kernel),
                                              forward)
        for block in model.blocks:
            block.attn1.set_processor(processor)
    return forward


def check_text_lengths(config, clip_tokens: int, t5_tokens: int) -> None:
    if clip_tokens != config.text_len or t5_tokens != config.text_len_t5:
        raise ValueError(
            f"HunyuanDiT conditioning with {clip_tokens} BERT and {t5_tokens} mT5 tokens: ParallelSampler takes exactly "
            f"{config.text_len} and {config.text_len_t5} (what the stock HunyuanDiT text encoders give for prompts of up "
            "to 75 BERT / 255 mT5 tokens); shorten the prompt")


def meta_size(size, latent_h: int, latent_w: int) -> list[float]:
    """v1.0/1.1's image meta size: ComfyUI's sampler fills in the latent's pixel size where the
    conditioning names none (comfy/samplers.py encode_model_conds), the target defaults to the size."""
    height, width, target_height, target_width = size
    height = height if height is not None else latent_h * 8.0
    width = width if width is not None else latent_w * 8.0
    return [height, width, target_height if target_height is not None else height,
            target_width if target_width is not None else width, 0.0, 0.0]


class HunyuanDiTDenoiser:
    """v prediction of HunyuanDiT for ComfyUI-layout model inputs (already scaled by c_in): x [B, 4, H, W] -> v."""

    def __init__(self, forward: ModuleShardedForward, dtype: torch.dtype, config, sampling):
        self.forward = forward
        self.dtype = dtype
        self.config = config
        self.sampling = sampling  # turns sigma into the model's timestep
        self.head_dim = config.attention_head_dim

    def _rotary_rows(self, grid_h: int, grid_w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the rotary table, split and padded exactly like its image tokens."""
        tables = comfy_rotary(self.head_dim, grid_h, grid_w, self.config.patch_size, device)
        degree, shard = self.forward.degree, self.forward.shard_index
        if degree == 1:
            return tables
        return tuple(pad_to_multiple(t, 0, degree).chunk(degree, dim=0)[shard] for t in tables)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        b, _, h, w = x.shape
        patch = self.config.patch_size
        if h % patch or w % patch:  # ComfyUI's patch embedding pads circularly; the output is cropped back
            x = F.pad(x, (0, -w % patch, 0, -h % patch), mode="circular")
        grid_h, grid_w = x.shape[-2] // patch, x.shape[-1] // patch
        device = x.device
        check_text_lengths(self.config, cond.context.shape[1], cond.context_t5.shape[1])
        timestep = self.sampling.timestep(sigma.to(device, torch.float32)).expand(b)
        meta = None
        if self.config.use_style_cond_and_image_meta_size:
            meta = torch.tensor([meta_size(cond.size, h, w)], dtype=torch.float32, device=device).repeat(b, 1)
        out = self.forward(
            hidden_states=x.to(self.dtype),
            # diffusers embeds the timestep in the timestep's dtype
            timestep=timestep.to(self.dtype),
            encoder_hidden_states=cond.context.to(device, self.dtype).expand(b, -1, -1),
            text_embedding_mask=cond.mask.to(device).expand(b, -1),
            encoder_hidden_states_t5=cond.context_t5.to(device, self.dtype).expand(b, -1, -1),
            text_embedding_mask_t5=cond.mask_t5.to(device).expand(b, -1),
            image_meta_size=meta,
            style=torch.zeros(b, dtype=torch.long, device=device) if meta is not None else None,
            image_rotary_emb=self._rotary_rows(grid_h, grid_w, device),
        )
        return out.float()[:, : self.config.in_channels, :h, :w]
