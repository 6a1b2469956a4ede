"""Full and window attention on [B, S, H, D] queries, keys and values (diffusers' layout).

Full attention goes through diffusers' dispatch, as diffusers' own Flux processor does, so a plan
of only "full" gives the model's output bit for bit. Window attention is the paper's 1-D window:
token i attends to tokens j with |i - j| <= window over the whole (text + image) sequence, as
SDPA with a band mask. On GPUs a kernel with a native window (flash-attn's ``window_size``) would
skip the masked blocks; the masked SDPA here computes them and only proves the numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return dispatch_attention_fn(q, k, v)


def band_mask(tokens: int, window: int, device: torch.device) -> torch.Tensor:
    """[S, S] boolean: True where |i - j| <= window (the pairs window attention keeps)."""
    index = torch.arange(tokens, device=device)
    return (index[:, None] - index[None, :]).abs() <= window


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    mask = band_mask(q.shape[1], window, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
