"""Small random checkpoints in the formats users have, built at test time.

Model weights cannot be downloaded where the tests run, so tests build tiny models of the real
architectures and write them as the files users keep: BFL single files (ComfyUI's
models/diffusion_models, with or without ``model.diffusion_model.``), diffusers single files
and diffusers folders (plain, sharded, pipeline). The diffusers -> BFL mapping here is written
independently of the loader's table, so a round trip checks the loader rather than itself; it
is also checked against diffusers' own BFL converter in tests/test_loading_flux.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from comfy_xdit.loading.flux import flux_axes_dims_rope

COMFY_PREFIX = "model.diffusion_model."


def make_flux_diffusers_model(
    num_layers: int = 1,
    num_single_layers: int = 1,
    heads: int = 2,
    head_dim: int = 16,
    guidance: bool = True,
    seed: int = 0,
    in_channels: int = 64,
    out_channels: int | None = None,
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 24,
) -> FluxTransformer2DModel:
    """A tiny float32 Flux with every parameter random (norm scales too, so swaps show)."""
    model = FluxTransformer2DModel(
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        in_channels=in_channels,
        out_channels=out_channels,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=guidance,
        axes_dims_rope=flux_axes_dims_rope(head_dim),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 2:
                param.copy_(noise / param.shape[1] ** 0.5)
            elif "norm" in name:
                param.copy_(1 + 0.1 * noise)  # RMSNorm scales live around 1
            else:
                param.copy_(0.1 * noise)
    return model.eval()


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    # diffusers' norm_out.linear emits (scale, shift); BFL's final adaLN emits (shift, scale).
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_bfl_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Black Forest Labs' key layout from a diffusers FluxTransformer2DModel state dict."""
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}

    def move(target: str, source: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{target}.{kind}"] = sd.pop(f"{source}.{kind}")

    def fuse(target: str, sources: list[str]) -> None:
        for kind in ("weight", "bias"):
            out[f"{target}.{kind}"] = torch.cat([sd.pop(f"{s}.{kind}") for s in sources], dim=0)

    for bfl, diff in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
        if f"time_text_embed.{diff}.linear_1.weight" in sd:
            move(f"{bfl}.in_layer", f"time_text_embed.{diff}.linear_1")
            move(f"{bfl}.out_layer", f"time_text_embed.{diff}.linear_2")
    move("txt_in", "context_embedder")
    move("img_in", "x_embedder")

    doubles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in doubles:
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        move(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        move(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        fuse(f"{b}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        fuse(f"{b}.txt_attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"])
        out[f"{b}.img_attn.norm.query_norm.scale"] = sd.pop(f"{d}.attn.norm_q.weight")
        out[f"{b}.img_attn.norm.key_norm.scale"] = sd.pop(f"{d}.attn.norm_k.weight")
        out[f"{b}.txt_attn.norm.query_norm.scale"] = sd.pop(f"{d}.attn.norm_added_q.weight")
        out[f"{b}.txt_attn.norm.key_norm.scale"] = sd.pop(f"{d}.attn.norm_added_k.weight")
        move(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        move(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        move(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        move(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        move(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        move(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")

    singles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")})
    for i in singles:
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        move(f"{b}.modulation.lin", f"{d}.norm.linear")
        fuse(f"{b}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"])
        out[f"{b}.norm.query_norm.scale"] = sd.pop(f"{d}.attn.norm_q.weight")
        out[f"{b}.norm.key_norm.scale"] = sd.pop(f"{d}.attn.norm_k.weight")
        move(f"{b}.linear2", f"{d}.proj_out")

    move("final_layer.linear", "proj_out")
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(sd.pop("norm_out.linear.weight"))
    out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(sd.pop("norm_out.linear.bias"))
    assert not sd, f"diffusers keys without a BFL home: {sorted(sd)[:5]}"
    return out


def _quantize_scaled_fp8(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's "scaled fp8" layout: 2-D weights in float8_e4m3fn with a per-layer scale."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.abs().max().float() / 448.0  # 448: largest float8_e4m3fn value
            out[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = tensor
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # ComfyUI's marker key
    return out


def _contiguous(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (v if dtype is None else v.to(dtype)).detach().contiguous().clone() for k, v in state_dict.items()}


def write_bfl_file(
    model: FluxTransformer2DModel,
    path: str | Path,
    prefix: str = "",
    dtype: torch.dtype | None = None,
    scaled_fp8: bool = False,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model as one BFL-layout safetensors file (prefix COMFY_PREFIX for ComfyUI's)."""
    sd = diffusers_to_bfl_state_dict(_contiguous(model.state_dict(), dtype))
    if scaled_fp8:
        sd = _quantize_scaled_fp8(sd)
    sd = {prefix + k: v for k, v in sd.items()}
    sd.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def write_diffusers_file(model: FluxTransformer2DModel, path: str | Path, prefix: str = "") -> Path:
    """Write the model as one safetensors file in diffusers' key layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in _contiguous(model.state_dict(), None).items()}, str(path))
    return path


def write_diffusers_folder(
    model: FluxTransformer2DModel,
    path: str | Path,
    max_shard_size: str | None = None,
    pipeline: bool = False,
) -> Path:
    """Write a diffusers model folder (sharded with max_shard_size, e.g. "20KB").

    With ``pipeline`` the model goes to ``path/transformer`` beside a model_index.json, as in
    a pipeline folder. Returns the folder to give the loader (``path`` in both cases).
    """
    path = Path(path)
    target = path / "transformer" if pipeline else path
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(target), safe_serialization=True, **kwargs)
    if pipeline:
        index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
        (path / "model_index.json").write_text(json.dumps(index))
    return path


def write_sd15_unet_like_file(path: str | Path) -> Path:
    """A safetensors file with SD1.5 UNet-style keys (a checkpoint of the wrong family)."""
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8),
        "model.diffusion_model.middle_block.1.proj_in.weight": torch.randn(8, 8),
        "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3),
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
    }
    path = Path(path)
    save_file(sd, str(path))
    return path


def write_vae_like_file(path: str | Path) -> Path:
    """A safetensors file with Flux/SD VAE-style keys."""
    sd = {
        "decoder.conv_in.weight": torch.randn(8, 16, 3, 3),
        "decoder.mid.block_1.norm1.weight": torch.randn(8),
        "encoder.conv_out.weight": torch.randn(32, 8, 3, 3),
    }
    path = Path(path)
    save_file(sd, str(path))
    return path


def write_stock_flux_file(
    path: str | Path,
    num_layers: int = 1,
    num_single_layers: int = 0,
    seed: int = 0,
    prefix: str = "",
) -> Path:
    """A full-width Flux-dev (24 heads x 128, T5 4096, CLIP 768, guidance) that stock ComfyUI loads.

    ComfyUI pins Flux's width and rotary axes and counts only the blocks, so a file both sides
    must load has full width and few blocks (1 double + 0 single: about 1.5 GB in float32).
    The weights are make_flux_diffusers_model's (fan-in scaled), so activations stay near 1.
    """
    model = make_flux_diffusers_model(
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        heads=24,
        head_dim=128,
        guidance=True,
        seed=seed,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
    )
    try:
        return write_bfl_file(model, path, prefix=prefix)
    finally:
        del model


# --- Stable Diffusion 3 / 3.5 ----------------------------------------------------------------------


def make_sd3_diffusers_model(
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    dual_attention_layers: tuple[int, ...] = (),
    qk_norm: str | None = None,
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 24,
    pos_embed_max_size: int = 16,
    patch_size: int = 2,
    seed: int = 0,
):
    """A tiny float32 SD3Transformer2DModel with every parameter random (norm scales around 1).

    SD3.5-style with ``qk_norm="rms_norm"`` and ``dual_attention_layers`` (SD3.5 medium has
    image-only attn2 in its first blocks). The positional table stays diffusers' sin-cos one
    (a buffer, as in real checkpoints).
    """
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=pos_embed_max_size,
        patch_size=patch_size,
        in_channels=16,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_projection_dim,
        out_channels=16,
        pos_embed_max_size=pos_embed_max_size,
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif "norm" in name:
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model.eval()


def diffusers_to_sai_sd3_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stability AI's MMDiT key layout (what ComfyUI loads) from a diffusers SD3Transformer2DModel state dict.

    Written independently of diffusers' converter (which the loader uses), so a round trip checks it.
    """
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}

    def move(target: str, source: str, swap: bool = False) -> None:
        for kind in ("weight", "bias"):
            tensor = sd.pop(f"{source}.{kind}")
            out[f"{target}.{kind}"] = _swap_halves(tensor) if swap else tensor

    def fuse(target: str, sources: list[str]) -> None:
        for kind in ("weight", "bias"):
            out[f"{target}.{kind}"] = torch.cat([sd.pop(f"{s}.{kind}") for s in sources], dim=0)

    out["pos_embed"] = sd.pop("pos_embed.pos_embed")
    move("x_embedder.proj", "pos_embed.proj")
    move("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    move("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    move("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    move("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    move("context_embedder", "context_embedder")
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in blocks:
        d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        last = i == blocks[-1]
        fuse(f"{x}.attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        fuse(f"{c}.attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"])
        for sai, diff in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                          ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
                          ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
            if f"{d}.{diff}.weight" in sd:
                out[f"joint_blocks.{i}.{sai}.weight"] = sd.pop(f"{d}.{diff}.weight")
        move(f"{x}.attn.proj", f"{d}.attn.to_out.0")
        if f"{d}.attn2.to_q.weight" in sd:
            fuse(f"{x}.attn2.qkv", [f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"])
            move(f"{x}.attn2.proj", f"{d}.attn2.to_out.0")
        move(f"{x}.adaLN_modulation.1", f"{d}.norm1.linear")
        # The last block's text stream is pre-only: SAI's adaLN emits (shift, scale), diffusers' (scale, shift).
        move(f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear", swap=last)
        move(f"{x}.mlp.fc1", f"{d}.ff.net.0.proj")
        move(f"{x}.mlp.fc2", f"{d}.ff.net.2")
        if not last:
            move(f"{c}.attn.proj", f"{d}.attn.to_add_out")
            move(f"{c}.mlp.fc1", f"{d}.ff_context.net.0.proj")
            move(f"{c}.mlp.fc2", f"{d}.ff_context.net.2")
    move("final_layer.linear", "proj_out")
    move("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    assert not sd, f"diffusers keys without an SAI home: {sorted(sd)[:5]}"
    return out


def write_sd3_file(model, path: str | Path, prefix: str = "", dtype: torch.dtype | None = None,
                   extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model as one SAI-layout safetensors file (prefix COMFY_PREFIX for a whole checkpoint's)."""
    sd = diffusers_to_sai_sd3_state_dict(_contiguous(model.state_dict(), dtype))
    sd = {prefix + k: v for k, v in sd.items()}
    sd.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def sd3_checkpoint_extras(seed: int = 0) -> dict[str, torch.Tensor]:
    """What a whole SD3 checkpoint carries beside the transformer (a few keys of each part)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.randn(8, generator=g),
        "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": torch.randn(8, generator=g),
        "text_encoders.t5xxl.transformer.shared.weight": torch.randn(4, 8, generator=g),
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 16, 3, 3, generator=g),
    }


def make_wan_diffusers_model(num_layers: int = 1, heads: int = 2, head_dim: int = 8, ffn_dim: int = 32,
                             text_dim: int = 32, freq_dim: int = 256, seed: int = 0):
    """A tiny float32 WanTransformer3DModel (text-to-video) with every parameter random (norm scales around 1)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=True,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "scale_shift_table" in name:
                param.copy_(0.1 * noise)
            elif param.ndim >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif "norm" in name:
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model.eval()


def diffusers_to_wan_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original Wan key layout (what ComfyUI loads) from a diffusers WanTransformer3DModel state dict.

    Written independently of diffusers' converter (which the loader uses), so a round trip checks it.
    """
    top = {
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "proj_out": "head.head",
        "patch_embedding": "patch_embedding",
    }
    block = {
        "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
        "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
        "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
        "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
        "norm2": "norm3",  # the cross-attention norm: norm3 in the original Wan
        "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    }
    out = {}
    for key, tensor in state_dict.items():
        if key == "scale_shift_table":
            out["head.modulation"] = tensor
            continue
        module, kind = key.rsplit(".", 1)
        if module in top:
            out[f"{top[module]}.{kind}"] = tensor
            continue
        _, index, rest = key.split(".", 2)
        if rest == "scale_shift_table":
            out[f"blocks.{index}.modulation"] = tensor
            continue
        module, kind = rest.rsplit(".", 1)
        out[f"blocks.{index}.{block[module]}.{kind}"] = tensor
    return out


def write_wan_file(model, path: str | Path, prefix: str = "", dtype: torch.dtype | None = None,
                   scaled_fp8: bool = False) -> Path:
    """Write the model as one original-Wan-layout safetensors file (prefix COMFY_PREFIX for ComfyUI's)."""
    sd = diffusers_to_wan_state_dict(_contiguous(model.state_dict(), dtype))
    if scaled_fp8:
        sd = _quantize_scaled_fp8(sd)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in sd.items()}, str(path))
    return path


def make_qwen_image_diffusers_model(num_layers: int = 1, heads: int = 2, head_dim: int = 32, joint_attention_dim: int = 32,
                                    seed: int = 0):
    """A tiny float32 QwenImageTransformer2DModel with every parameter random (norm scales around 1).

    The rotary axes follow the releases' proportion (16 / 56 / 56 of 128), as the loader infers them.
    """
    from diffusers import QwenImageTransformer2DModel

    from comfy_xdit.loading.qwen_image import RELEASE_AXES_DIMS, rotary_axes

    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
        axes_dims_rope=RELEASE_AXES_DIMS if head_dim == 128 else rotary_axes(head_dim),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif "norm" in name:
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model.eval()


def write_qwen_image_file(model, path: str | Path, prefix: str = "", dtype: torch.dtype | None = None,
                          scaled_fp8: bool = False) -> Path:
    """A Qwen-Image single file as ComfyUI users keep it (diffusers' key names, ComfyUI's prefix or none)."""
    state = _contiguous(model.state_dict(), dtype)
    if scaled_fp8:
        state = _quantize_scaled_fp8(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in state.items()}, str(path))
    return path


def make_hunyuan_video_diffusers_model(num_layers: int = 1, num_single_layers: int = 1, num_refiner_layers: int = 1,
                                       heads: int = 2, head_dim: int = 8, rope_axes_dim=(2, 2, 4), text_dim: int = 32,
                                       pooled_dim: int = 24, mlp_ratio: float = 2.0, guidance: bool = True, seed: int = 0):
    """A tiny float32 HunyuanVideoTransformer3DModel (text-to-video) with every parameter random (norm scales around 1)."""
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=num_refiner_layers, mlp_ratio=mlp_ratio, patch_size=2,
        patch_size_t=1, guidance_embeds=guidance, text_embed_dim=text_dim, pooled_projection_dim=pooled_dim,
        rope_axes_dim=tuple(rope_axes_dim),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model.eval()


def diffusers_to_hunyuan_video_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original HunyuanVideo key layout (what ComfyUI loads) from a diffusers HunyuanVideoTransformer3DModel state dict.

    Written independently of diffusers' converter (which the loader uses), so a round trip checks it:
    fused q/k/v (and q/k/v/mlp in the single-stream blocks), and the final layer's (shift, scale) order.
    """
    top = {
        "x_embedder.proj": "img_in.proj",
        "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "context_embedder.proj_in": "txt_in.input_embedder",
        "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
        "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
        "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
        "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
        "proj_out": "final_layer.linear",
    }
    refiner = {"norm1": "norm1", "norm2": "norm2", "attn.to_out.0": "self_attn_proj", "ff.net.0.proj": "mlp.fc1",
               "ff.net.2": "mlp.fc2", "norm_out.linear": "adaLN_modulation.1"}
    double = {
        "norm1.linear": "img_mod.linear", "norm1_context.linear": "txt_mod.linear",
        "attn.norm_q": "img_attn_q_norm", "attn.norm_k": "img_attn_k_norm", "attn.to_out.0": "img_attn_proj",
        "attn.norm_added_q": "txt_attn_q_norm", "attn.norm_added_k": "txt_attn_k_norm", "attn.to_add_out": "txt_attn_proj",
        "ff.net.0.proj": "img_mlp.fc1", "ff.net.2": "img_mlp.fc2", "ff_context.net.0.proj": "txt_mlp.fc1",
        "ff_context.net.2": "txt_mlp.fc2",
    }
    single = {"norm.linear": "modulation.linear", "attn.norm_q": "q_norm", "attn.norm_k": "k_norm", "proj_out": "linear2"}
    fused = {  # target -> the diffusers modules concatenated along the output features
        "double_blocks.{i}.img_attn_qkv": ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                           "transformer_blocks.{i}.attn.to_v"),
        "double_blocks.{i}.txt_attn_qkv": ("transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks.{i}.attn.add_k_proj",
                                           "transformer_blocks.{i}.attn.add_v_proj"),
        "single_blocks.{i}.linear1": ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                      "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp"),
        "txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv": (
            "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_q",
            "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_k",
            "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_v"),
    }
    out, used = {}, set()
    blocks = {int(k.split(".")[1]) for k in state_dict if k.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")}
    refiners = {int(k.split(".")[3]) for k in state_dict if k.startswith("context_embedder.token_refiner.refiner_blocks.")}
    for target, sources in fused.items():
        for i in blocks | refiners:
            for kind in ("weight", "bias"):
                names = [f"{s.format(i=i)}.{kind}" for s in sources]
                if all(n in state_dict for n in names):
                    out[f"{target.format(i=i)}.{kind}"] = torch.cat([state_dict[n] for n in names])
                    used.update(names)
    for key, tensor in state_dict.items():
        if key in used:
            continue
        module, kind = key.rsplit(".", 1)
        if module == "norm_out.linear":  # diffusers' (scale, shift) -> the original (shift, scale)
            scale, shift = tensor.chunk(2)
            out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
        elif module in top:
            out[f"{top[module]}.{kind}"] = tensor
        elif module.startswith("context_embedder.token_refiner.refiner_blocks."):
            i, rest = module.split(".", 4)[3:]
            out[f"txt_in.individual_token_refiner.blocks.{i}.{refiner[rest]}.{kind}"] = tensor
        elif module.startswith("transformer_blocks."):
            _, i, rest = module.split(".", 2)
            out[f"double_blocks.{i}.{double[rest]}.{kind}"] = tensor
        elif module.startswith("single_transformer_blocks."):
            _, i, rest = module.split(".", 2)
            out[f"single_blocks.{i}.{single[rest]}.{kind}"] = tensor
        else:
            raise KeyError(f"no original HunyuanVideo name for {key}")
    return out


def write_hunyuan_video_file(model, path: str | Path, prefix: str = "", dtype: torch.dtype | None = None) -> Path:
    """Write the model as one original-HunyuanVideo-layout safetensors file (prefix COMFY_PREFIX for ComfyUI's)."""
    sd = diffusers_to_hunyuan_video_state_dict(_contiguous(model.state_dict(), dtype))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in sd.items()}, str(path))
    return path


def make_mochi_diffusers_model(num_layers: int = 2, heads: int = 2, head_dim: int = 8, pooled_dim: int = 8,
                               text_dim: int = 32, time_embed_dim: int = 16, seed: int = 0):
    """A tiny float32 MochiTransformer3DModel with every parameter random (norm scales around 1, rotary frequencies ~0.3)."""
    from diffusers import MochiTransformer3DModel

    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=heads, attention_head_dim=head_dim,
                                    num_layers=num_layers, pooled_projection_dim=pooled_dim, in_channels=12,
                                    text_embed_dim=text_dim, time_embed_dim=time_embed_dim)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name == "pos_frequencies":
                param.copy_(0.3 * noise)
            elif param.ndim >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model.eval()


def diffusers_to_genmo_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Genmo's Mochi key layout (what ComfyUI loads) from a diffusers MochiTransformer3DModel state dict.

    Written independently of diffusers' converter (which the loader uses), so a round trip checks it:
    fused q/k/v per stream, the SwiGLU's (proj, gate) halves swapped, the final layer's (shift, scale).
    """
    top = {"patch_embed.proj": "x_embedder.proj", "time_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "time_embed.pooler.to_kv": "t5_y_embedder.to_kv",
           "time_embed.pooler.to_q": "t5_y_embedder.to_q", "time_embed.pooler.to_out": "t5_y_embedder.to_out",
           "time_embed.caption_proj": "t5_yproj", "proj_out": "final_layer.linear"}
    block = {"norm1.linear": "mod_x", "norm1_context.linear": "mod_y", "norm1_context.linear_1": "mod_y",
             "attn1.norm_q": "attn.q_norm_x", "attn1.norm_k": "attn.k_norm_x", "attn1.to_out.0": "attn.proj_x",
             "attn1.norm_added_q": "attn.q_norm_y", "attn1.norm_added_k": "attn.k_norm_y", "attn1.to_add_out": "attn.proj_y",
             "ff.net.0.proj": "mlp_x.w1", "ff.net.2": "mlp_x.w2", "ff_context.net.0.proj": "mlp_y.w1",
             "ff_context.net.2": "mlp_y.w2"}
    fused = {"attn.qkv_x": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
             "attn.qkv_y": ("attn1.add_q_proj", "attn1.add_k_proj", "attn1.add_v_proj")}
    out = {}
    for key, tensor in state_dict.items():
        module, _, kind = key.rpartition(".")
        if key == "pos_frequencies":
            out[key] = tensor
        elif module == "norm_out.linear":  # diffusers' (scale, shift) -> Genmo's (shift, scale)
            scale, shift = tensor.chunk(2)
            out[f"final_layer.mod.{kind}"] = torch.cat([shift, scale])
        elif module in top:
            out[f"{top[module]}.{kind}"] = tensor
        elif module.startswith("transformer_blocks."):
            _, i, rest = module.split(".", 2)
            if any(rest in sources for sources in fused.values()):
                continue
            if rest.endswith("net.0.proj"):  # diffusers' SwiGLU is (hidden, gate); Genmo's w1 is (gate-less x, gate)
                first, second = tensor.chunk(2)
                tensor = torch.cat([second, first])
            out[f"blocks.{i}.{block[rest]}.{kind}"] = tensor
        else:
            raise KeyError(f"no Genmo name for {key}")
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks.")}
    for i in blocks:
        for target, sources in fused.items():
            out[f"blocks.{i}.{target}.weight"] = torch.cat([state_dict[f"transformer_blocks.{i}.{s}.weight"] for s in sources])
    return out


def write_mochi_file(model, path: str | Path, prefix: str = "", dtype: torch.dtype | None = None) -> Path:
    """Write the model as one Genmo-layout safetensors file (prefix COMFY_PREFIX for ComfyUI's)."""
    sd = diffusers_to_genmo_state_dict(_contiguous(model.state_dict(), dtype))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in sd.items()}, str(path))
    return path
