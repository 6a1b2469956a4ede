"""Latent previews: a fixed linear map from a family's 16 latent channels to RGB (Flux's by default).

The factors and bias are the published Flux latent-to-RGB fit ComfyUI uses for its live
previews; a real image needs the VAE, a glance at composition does not.
"""

from __future__ import annotations

from pathlib import Path

import torch

FLUX_LATENT_RGB_FACTORS = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
]
FLUX_LATENT_RGB_BIAS = [-0.0329, -0.0718, -0.0851]


def latent_to_rgb(latent: torch.Tensor, factors=FLUX_LATENT_RGB_FACTORS, bias=FLUX_LATENT_RGB_BIAS) -> torch.Tensor:
    """[C, H, W] raw latent -> [H, W, 3] uint8 (Flux's factors unless a family's are given)."""
    factors = torch.tensor(factors, dtype=torch.float32)
    bias = torch.tensor(bias, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latent.float(), factors) + bias
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_latent_preview(latent: torch.Tensor, path: Path, scale: int = 8) -> Path:
    from PIL import Image

    image = Image.fromarray(latent_to_rgb(latent).numpy())
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path
