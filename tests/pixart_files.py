"""Tiny PixArt transformers and the checkpoint files ComfyUI users have, written at test time.

The original-layout writer is the inverse of the loader's mapping, written out here on its own
(q, k, v concatenated into ``qkv``; k, v into ``kv_linear``), so a wrong mapping on either side
shows up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from random_weights import randomize_weights

COMFY_PREFIX = "model.diffusion_model."


def make_pixart_diffusers_model(num_layers: int = 2, heads: int = 2, head_dim: int = 8, caption_channels: int = 32,
                                alpha: bool = False, sample_size: int = 128, seed: int = 0):
    """A tiny float32 PixArtTransformer2DModel with random weights (alpha: with micro-conditions)."""
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=heads * head_dim, caption_channels=caption_channels, sample_size=sample_size,
        use_additional_conditions=alpha,
    )
    randomize_weights(model, seed)
    return model.eval()


def diffusers_to_original_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    top = {
        "pos_embed.proj": "x_embedder.proj",
        "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "adaln_single.linear": "t_block.1",
        "caption_projection.linear_1": "y_embedder.y_proj.fc1",
        "caption_projection.linear_2": "y_embedder.y_proj.fc2",
        "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
        "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
        "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
        "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
        "proj_out": "final_layer.linear",
    }
    for name, target in top.items():
        for end in ("weight", "bias"):
            if f"{name}.{end}" in sd:
                out[f"{target}.{end}"] = sd[f"{name}.{end}"]
    out["final_layer.scale_shift_table"] = sd["scale_shift_table"]
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in blocks:
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[dst + "scale_shift_table"] = sd[src + "scale_shift_table"]
        for end in ("weight", "bias"):
            out[f"{dst}attn.qkv.{end}"] = torch.cat([sd[f"{src}attn1.to_{p}.{end}"] for p in "qkv"])
            out[f"{dst}cross_attn.kv_linear.{end}"] = torch.cat([sd[f"{src}attn2.to_{p}.{end}"] for p in "kv"])
            for a, b in (("attn1.to_out.0", "attn.proj"), ("attn2.to_q", "cross_attn.q_linear"),
                         ("attn2.to_out.0", "cross_attn.proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2")):
                out[f"{dst}{b}.{end}"] = sd[f"{src}{a}.{end}"]
    return out


def write_original_pixart_file(model, path: str | Path, prefix: str = "", pos_embed_grid: int | None = None,
                               dtype: torch.dtype | None = None) -> Path:
    """The model as an original-layout single file, with the training-time y_embedding (and pos_embed if asked)."""
    sd = diffusers_to_original_state_dict({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
    width = model.config.num_attention_heads * model.config.attention_head_dim
    sd["y_embedder.y_embedding"] = torch.randn(12, model.config.caption_channels)
    if pos_embed_grid is not None:
        sd["pos_embed"] = torch.zeros(1, pos_embed_grid * pos_embed_grid, width)
    sd = {prefix + k: (v.to(dtype) if dtype else v).contiguous() for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def write_diffusers_pixart_file(model, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
