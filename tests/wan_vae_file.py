#!/usr/bin/env python
"""A tiny random Wan 2.1 VAE file that stock ComfyUI's VAELoader accepts, written at test time.

ComfyUI recognises the Wan 2.1 VAE by ``decoder.middle.0.residual.0.gamma`` and takes its base
width from ``decoder.head.0.gamma`` (z_dim 16, width multipliers 1, 2, 4, 4 fixed), so a width of 8
gives a small file of the real architecture. The weights come from ComfyUI's own WanVAE class
(default initialisation, fixed seed), built in a subprocess because it imports ComfyUI's modules.

    python tests/wan_vae_file.py OUT.safetensors
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMFYUI = HERE.parent / ".comfyui" / "ComfyUI"
WIDTH = 8


def write_wan_vae_file(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), str(path)], check=True, capture_output=True, timeout=300)
    return path


def main() -> None:
    out = sys.argv[1]
    sys.path.insert(0, str(COMFYUI))
    sys.argv = [str(COMFYUI / "main.py"), "--cpu"]  # ComfyUI's device setup reads its arguments on import
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import save_file

    from comfy.ldm.wan.vae import WanVAE

    torch.manual_seed(0)
    model = WanVAE(dim=WIDTH, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True], dropout=0.0)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out)


if __name__ == "__main__":
    main()
