"""Random Flux ControlNet files in the layouts users keep in models/controlnet, built at test time.

InstantX / Shakker-Labs files are a diffusers ``FluxControlNetModel`` state dict as it is; XLabs
files use Black Forest Labs' block names (written with tests/checkpoints.py's independent
diffusers -> BFL mapping) plus ``pos_embed_input`` and the pixel ``input_hint_block``. Every
parameter is random, the zero-initialised ControlNet outputs included, so the control shows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxControlNetModel
from safetensors.torch import save_file

from checkpoints import diffusers_to_bfl_state_dict
from comfy_xdit.loading.flux import flux_axes_dims_rope


def make_flux_controlnet(num_layers: int = 1, num_single_layers: int = 1, heads: int = 4, head_dim: int = 16,
                         joint_attention_dim: int = 32, pooled_projection_dim: int = 24, guidance: bool = True,
                         num_mode: int | None = None, seed: int = 0, cond_scale: float = 1.0) -> FluxControlNetModel:
    """A float32 FluxControlNetModel, fan-in scaled; ``cond_scale`` scales the ControlNet's outputs."""
    model = FluxControlNetModel(
        num_layers=num_layers, num_single_layers=num_single_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance,
        axes_dims_rope=flux_axes_dims_rope(head_dim), num_mode=num_mode,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 2:
                value = noise / param.shape[1] ** 0.5
                if name.startswith("controlnet_blocks") or name.startswith("controlnet_single_blocks"):
                    value = value * cond_scale
                param.copy_(value)
            elif "norm" in name:
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model.eval()


def write_instantx_file(model: FluxControlNetModel, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    return path


def xlabs_state_dict(model: FluxControlNetModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """The XLabs layout of a ControlNet with no single blocks, plus a random pixel hint encoder."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extra = {k: sd.pop(k) for k in list(sd) if k.startswith(("controlnet_blocks.", "controlnet_single_blocks."))}
    extra["pos_embed_input.weight"] = sd.pop("controlnet_x_embedder.weight")
    extra["pos_embed_input.bias"] = sd.pop("controlnet_x_embedder.bias")
    # diffusers_to_bfl_state_dict expects a whole transformer: give it a final layer to drop again.
    width = sd["x_embedder.weight"].shape[0]
    sd["proj_out.weight"], sd["proj_out.bias"] = torch.zeros(64, width), torch.zeros(64)
    sd["norm_out.linear.weight"], sd["norm_out.linear.bias"] = torch.zeros(2 * width, width), torch.zeros(2 * width)
    out = {k: v for k, v in diffusers_to_bfl_state_dict(sd).items() if not k.startswith("final_layer.")}
    generator = torch.Generator().manual_seed(seed + 100)
    for i in range(8):
        cin = 3 if i == 0 else 16
        out[f"input_hint_block.{2 * i}.weight"] = torch.randn(16, cin, 3, 3, generator=generator) / (cin * 9) ** 0.5
        out[f"input_hint_block.{2 * i}.bias"] = 0.1 * torch.randn(16, generator=generator)
    out.update(extra)
    return {k: v.contiguous() for k, v in out.items()}


def write_xlabs_file(model: FluxControlNetModel, path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(xlabs_state_dict(model, seed), str(path))
    return path


def write_sd15_controlnet_file(path: str | Path) -> Path:
    """A few keys of an SD1.5 ControlNet (the wrong family for a Flux model)."""
    sd = {
        "control_model.zero_convs.0.0.weight": torch.randn(8, 8, 1, 1),
        "control_model.input_hint_block.0.weight": torch.randn(16, 3, 3, 3),
        "control_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
