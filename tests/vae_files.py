"""Random VAE weights in ComfyUI's (LDM) key layout, and stock ComfyUI's decode of them.

The LDM key list is written here from ComfyUI's ``comfy/ldm/modules/diffusionmodules/model.py``
Decoder, independently of the engine's converter (which goes through diffusers), so a decode
that matches ComfyUI checks the conversion rather than itself.

ComfyUI recognises an LDM AutoencoderKL by ``decoder.conv_in.weight`` and then builds it with a
fixed ``ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2`` whatever the shapes say (only
``z_channels`` is read from the weights), so a VAE that stock ComfyUI must load is full width:
the Flux VAE's decoder, about 50M parameters (200 MB in float32). Engine-only tests use any
width that divides into 32 norm groups.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FLUX_VAE = dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16)


def _resnet(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        f"{prefix}.norm1.weight": (cin,),
        f"{prefix}.norm1.bias": (cin,),
        f"{prefix}.conv1.weight": (cout, cin, 3, 3),
        f"{prefix}.conv1.bias": (cout,),
        f"{prefix}.norm2.weight": (cout,),
        f"{prefix}.norm2.bias": (cout,),
        f"{prefix}.conv2.weight": (cout, cout, 3, 3),
        f"{prefix}.conv2.bias": (cout,),
    }
    if cin != cout:
        shapes[f"{prefix}.nin_shortcut.weight"] = (cout, cin, 1, 1)
        shapes[f"{prefix}.nin_shortcut.bias"] = (cout,)
    return shapes


def ldm_decoder_shapes(
    ch: int = 128,
    ch_mult: tuple[int, ...] = (1, 2, 4, 4),
    num_res_blocks: int = 2,
    z_channels: int = 16,
    out_ch: int = 3,
    post_quant_conv: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an LDM/ComfyUI AutoencoderKL decoder (what ``first_stage_model`` holds)."""
    block_in = ch * ch_mult[-1]
    shapes = {"decoder.conv_in.weight": (block_in, z_channels, 3, 3), "decoder.conv_in.bias": (block_in,)}
    shapes |= _resnet("decoder.mid.block_1", block_in, block_in)
    shapes["decoder.mid.attn_1.norm.weight"] = (block_in,)
    shapes["decoder.mid.attn_1.norm.bias"] = (block_in,)
    for name in ("q", "k", "v", "proj_out"):
        shapes[f"decoder.mid.attn_1.{name}.weight"] = (block_in, block_in, 1, 1)
        shapes[f"decoder.mid.attn_1.{name}.bias"] = (block_in,)
    shapes |= _resnet("decoder.mid.block_2", block_in, block_in)
    for level in reversed(range(len(ch_mult))):
        block_out = ch * ch_mult[level]
        for i in range(num_res_blocks + 1):
            shapes |= _resnet(f"decoder.up.{level}.block.{i}", block_in, block_out)
            block_in = block_out
        if level != 0:
            shapes[f"decoder.up.{level}.upsample.conv.weight"] = (block_in, block_in, 3, 3)
            shapes[f"decoder.up.{level}.upsample.conv.bias"] = (block_in,)
    shapes["decoder.norm_out.weight"] = (block_in,)
    shapes["decoder.norm_out.bias"] = (block_in,)
    shapes["decoder.conv_out.weight"] = (out_ch, block_in, 3, 3)
    shapes["decoder.conv_out.bias"] = (out_ch,)
    if post_quant_conv:
        shapes["post_quant_conv.weight"] = (z_channels, z_channels, 1, 1)
        shapes["post_quant_conv.bias"] = (z_channels,)
    return shapes


def ldm_encoder_shapes(ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2,
                       z_channels: int = 16, in_ch: int = 3) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an LDM/ComfyUI AutoencoderKL encoder (double_z, no quant_conv: the Flux VAE's)."""
    shapes = {"encoder.conv_in.weight": (ch, in_ch, 3, 3), "encoder.conv_in.bias": (ch,)}
    block_in = ch
    for level, mult in enumerate(ch_mult):
        for i in range(num_res_blocks):
            shapes |= _resnet(f"encoder.down.{level}.block.{i}", block_in, ch * mult)
            block_in = ch * mult
        if level != len(ch_mult) - 1:
            shapes[f"encoder.down.{level}.downsample.conv.weight"] = (block_in, block_in, 3, 3)
            shapes[f"encoder.down.{level}.downsample.conv.bias"] = (block_in,)
    shapes |= _resnet("encoder.mid.block_1", block_in, block_in)
    shapes["encoder.mid.attn_1.norm.weight"] = (block_in,)
    shapes["encoder.mid.attn_1.norm.bias"] = (block_in,)
    for name in ("q", "k", "v", "proj_out"):
        shapes[f"encoder.mid.attn_1.{name}.weight"] = (block_in, block_in, 1, 1)
        shapes[f"encoder.mid.attn_1.{name}.bias"] = (block_in,)
    shapes |= _resnet("encoder.mid.block_2", block_in, block_in)
    shapes["encoder.norm_out.weight"] = (block_in,)
    shapes["encoder.norm_out.bias"] = (block_in,)
    shapes["encoder.conv_out.weight"] = (2 * z_channels, block_in, 3, 3)
    shapes["encoder.conv_out.bias"] = (2 * z_channels,)
    return shapes


def make_ldm_vae_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> dict[str, torch.Tensor]:
    """Random decoder weights (every tensor random, norm scales around 1), LDM key layout."""
    return _random(ldm_decoder_shapes(**config), seed, dtype)


def make_ldm_encoder_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> dict[str, torch.Tensor]:
    """Random encoder weights in the LDM key layout (for the stock VAEEncode of a control image)."""
    return _random(ldm_encoder_shapes(**config), seed, dtype)


def _random(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) > 1:
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            value = noise / fan_in**0.5
        elif "norm" in key and key.endswith(".weight"):
            value = 1 + 0.1 * noise
        else:
            value = 0.1 * noise
        sd[key] = value.to(dtype)
    return sd


def comfyui_root() -> Path | None:
    """The pinned test ComfyUI (tools/setup.sh puts it in .comfyui/ComfyUI), or $COMFY_XDIT_COMFYUI."""
    for candidate in (os.environ.get("COMFY_XDIT_COMFYUI"), REPO / ".comfyui" / "ComfyUI"):
        if candidate and (Path(candidate) / "comfy" / "sd.py").is_file():
            return Path(candidate)
    return None


_COMFY_DECODE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import comfy.cli_args
    comfy.cli_args.args.cpu = True          # --cpu: VAE on the CPU, float32
    import comfy.sd, comfy.utils
    torch.set_num_threads(int(sys.argv[5]))
    sd = comfy.utils.load_torch_file(sys.argv[2])   # what the stock VAELoader does
    vae = comfy.sd.VAE(sd=sd)
    latents = torch.load(sys.argv[3])
    with torch.inference_mode():                    # as ComfyUI's executor runs nodes
        images = [vae.decode(latent) for latent in latents]   # what the stock VAEDecode does
    state = {k: v.detach().clone() for k, v in vae.first_stage_model.state_dict().items()}
    torch.save({"images": images, "state_dict": state, "vae_dtype": str(vae.vae_dtype)}, sys.argv[4])
    """
)


def comfyui_decode(vae_file: Path, latents: list[torch.Tensor], work: Path, threads: int = 2) -> dict:
    """Stock ComfyUI (in a subprocess, on the CPU): ``VAE(sd=load_torch_file(vae_file)).decode``.

    Returns ``images`` (one [B, H, W, 3] per latent), ``state_dict`` (``first_stage_model``'s,
    what the bridge hands the pool) and ``vae_dtype``.
    """
    root = comfyui_root()
    if root is None:
        raise RuntimeError("no ComfyUI source: run tools/setup.sh or set COMFY_XDIT_COMFYUI")
    latents_file, out_file = work / "latents.pt", work / "comfy_out.pt"
    torch.save(latents, latents_file)
    env = dict(os.environ, PYTHONPATH="")  # ComfyUI's top-level packages must not shadow ours
    result = subprocess.run(
        [sys.executable, "-c", _COMFY_DECODE, str(root), str(vae_file), str(latents_file), str(out_file), str(threads)],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"ComfyUI decode failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return torch.load(out_file)
