"""Tiny HunyuanDiT transformers and the checkpoint files ComfyUI users have, written at test time.

The original-layout writer is the inverse of the loader's mapping, written out here on its own
(q, k, v concatenated into ``Wqkv``; k, v into ``kv_proj``; norm2 / norm3 swapped; the final
modulation's halves swapped back), so a wrong mapping on either side shows up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from random_weights import randomize_weights

COMFY_PREFIX = "model.diffusion_model."


def make_hunyuan_dit_diffusers_model(num_layers: int = 4, heads: int = 2, head_dim: int = 8, text_width: int = 24,
                                     t5_width: int = 32, pooled: int = 16, text_len: int = 7, text_len_t5: int = 9,
                                     meta: bool = True, mlp_ratio: float = 4.0, seed: int = 0):
    """A tiny float32 HunyuanDiT2DModel with random weights (meta: v1.0/1.1's size and style conditions).

    num_layers 4 or more gives at least one long skip connection (block 3 takes block 0's output)."""
    from diffusers import HunyuanDiT2DModel

    model = HunyuanDiT2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, patch_size=2, hidden_size=heads * head_dim,
        num_layers=num_layers, cross_attention_dim=text_width, cross_attention_dim_t5=t5_width,
        pooled_projection_dim=pooled, text_len=text_len, text_len_t5=text_len_t5,
        use_style_cond_and_image_meta_size=meta, sample_size=16, mlp_ratio=mlp_ratio,
    )
    randomize_weights(model, seed)
    return model.eval()


def diffusers_to_original_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"text_embedding_padding": sd["text_embedding_padding"],
           "pooler.positional_embedding": sd["time_extra_emb.pooler.positional_embedding"]}
    top = {
        "text_embedder.linear_1": "mlp_t5.0", "text_embedder.linear_2": "mlp_t5.2", "pos_embed.proj": "x_embedder.proj",
        "time_extra_emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_extra_emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_extra_emb.extra_embedder.linear_1": "extra_embedder.0",
        "time_extra_emb.extra_embedder.linear_2": "extra_embedder.2",
        "time_extra_emb.style_embedder": "style_embedder", "proj_out": "final_layer.linear",
        **{f"time_extra_emb.pooler.{p}_proj": f"pooler.{p}_proj" for p in "qkvc"},
    }
    for name, target in top.items():
        for end in ("weight", "bias"):
            if f"{name}.{end}" in sd:
                out[f"{target}.{end}"] = sd[f"{name}.{end}"]
    for end in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{end}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{end}"] = torch.cat([shift, scale])
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    for i in blocks:
        src, dst = f"blocks.{i}.", f"blocks.{i}."
        for end in ("weight", "bias"):
            out[f"{dst}attn1.Wqkv.{end}"] = torch.cat([sd[f"{src}attn1.to_{p}.{end}"] for p in "qkv"])
            out[f"{dst}attn2.kv_proj.{end}"] = torch.cat([sd[f"{src}attn2.to_{p}.{end}"] for p in "kv"])
            for a, b in (("norm1.norm", "norm1"), ("norm1.linear", "default_modulation.1"), ("attn1.norm_q", "attn1.q_norm"),
                         ("attn1.norm_k", "attn1.k_norm"), ("attn1.to_out.0", "attn1.out_proj"), ("norm2", "norm3"),
                         ("attn2.to_q", "attn2.q_proj"), ("attn2.norm_q", "attn2.q_norm"), ("attn2.norm_k", "attn2.k_norm"),
                         ("attn2.to_out.0", "attn2.out_proj"), ("norm3", "norm2"), ("ff.net.0.proj", "mlp.fc1"),
                         ("ff.net.2", "mlp.fc2"), ("skip_norm", "skip_norm"), ("skip_linear", "skip_linear")):
                if f"{src}{a}.{end}" in sd:
                    out[f"{dst}{b}.{end}"] = sd[f"{src}{a}.{end}"]
    return out


def write_original_hunyuan_dit_file(model, path: str | Path, prefix: str = "", dtype: torch.dtype | None = None) -> Path:
    sd = diffusers_to_original_state_dict({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
    sd = {prefix + k: (v.to(dtype) if dtype else v).contiguous() for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def write_diffusers_hunyuan_dit_file(model, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
