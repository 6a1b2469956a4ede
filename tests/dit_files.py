"""Tiny DiT transformers, their diffusers folders and single files, and DiTPipeline's loop as a reference.

The model is diffusers' DiTTransformer2DModel at 2 heads x 64 (width 128: the single-file loader
infers heads = width / 64, as for DiT-S/B/L), 2 blocks, patch 2, sample size 8, the real 1,000
classes (+ null class), random weights (adaLN-zero starts at zero; the weights are redrawn so the
model's output is not).
"""

from __future__ import annotations

from pathlib import Path

import torch
from random_weights import randomize_weights

DDIM_CONFIG = {  # DiT's training betas with DDIM, as the released folder samples
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": True, "prediction_type": "epsilon",
}
DPM_CONFIG = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
              "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"}
DDPM_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
               "beta_schedule": "linear", "clip_sample": False, "variance_type": "fixed_small"}


def make_dit_model(num_layers: int = 2, heads: int = 2, head_dim: int = 64, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
                                  num_layers=num_layers, sample_size=8, patch_size=2)
    randomize_weights(model, seed)
    return model.eval()


def write_dit_folder(root: Path, scheduler_config: dict | None = DDIM_CONFIG, model=None) -> Path:
    """A diffusers pipeline folder: transformer/ (config.json + safetensors) and scheduler/."""
    from diffusers import SchedulerMixin  # noqa: F401  (diffusers must import; the scheduler is saved as JSON)
    import json

    root.mkdir(parents=True, exist_ok=True)
    (model or make_dit_model()).save_pretrained(root / "transformer", safe_serialization=True)
    if scheduler_config is not None:
        (root / "scheduler").mkdir(exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    return root


def write_dit_file(path: Path, model=None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in (model or make_dit_model()).state_dict().items()}, str(path))
    return path


def dit_pipeline_loop(model, scheduler, latents: torch.Tensor, class_labels: list[int], guidance_scale: float,
                      steps: int) -> torch.Tensor:
    """DiTPipeline.__call__'s denoising loop (diffusers 0.42), step for step, up to the VAE decode:
    the doubled latents, [classes, null classes], guidance on the noise prediction, the learned
    sigma dropped, scheduler.step on the whole doubled batch. Returns the model-space latents."""
    channels = model.config.in_channels
    batch = len(class_labels)
    model_input = torch.cat([latents] * 2) if guidance_scale > 1 else latents
    labels = torch.tensor(class_labels).reshape(-1)
    labels_in = torch.cat([labels, torch.tensor([1000] * batch)]) if guidance_scale > 1 else labels
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            if guidance_scale > 1:
                half = model_input[: len(model_input) // 2]
                model_input = torch.cat([half, half], dim=0)
            model_input = scheduler.scale_model_input(model_input, t)
            timesteps = t[None].expand(model_input.shape[0])
            noise_pred = model(model_input, timestep=timesteps, class_labels=labels_in).sample
            if guidance_scale > 1:
                eps, rest = noise_pred[:, :channels], noise_pred[:, channels:]
                cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
                half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
                noise_pred = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
            model_output = torch.split(noise_pred, channels, dim=1)[0] if model.config.out_channels // 2 == channels else noise_pred
            model_input = scheduler.step(model_output, t, model_input).prev_sample
    return model_input.chunk(2, dim=0)[0] if guidance_scale > 1 else model_input
