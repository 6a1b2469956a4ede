"""Tiny Latte transformers, their diffusers folders, and diffusers' own LattePipeline as the reference.

2 heads x 8, 2 spatial + 2 temporal blocks, 4 latent channels (8 out: noise and learned variance),
T5 width 12, 3 frames (video_length), random weights. The reference is LattePipeline.__call__ itself
with prompt embeddings given and output_type "latent" (no text encoder or VAE needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from random_weights import randomize_weights

FRAMES = 3  # the tiny model's video_length
TEXT_WIDTH = 12

SCHEDULERS = {
    # Latte-1's kind: no learned variance in the scheduler, so LattePipeline keeps the noise half of the output
    "ddim": {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
             "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": True,
             "steps_offset": 0},
    # a scheduler that reads the learned variance and draws noise in its step
    "ddpm": {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
             "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "variance_type": "learned_range"},
}


def make_latte_model(seed: int = 0, text_dim: int = TEXT_WIDTH):
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, attention_bias=True, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=text_dim, video_length=FRAMES,
    )
    randomize_weights(model, seed)
    return model.eval()


def write_latte_folder(root: Path, scheduler: str | dict | None = "ddim", model=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (model or make_latte_model()).save_pretrained(root / "transformer", safe_serialization=True)
    if scheduler is not None:
        config = SCHEDULERS[scheduler] if isinstance(scheduler, str) else scheduler
        (root / "scheduler").mkdir(exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return root


def make_latte_vae(seed: int = 0):
    """A tiny AutoencoderKL with the SD VAE's 8x compression (4 levels), 8 channels wide, scale 0.18215."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
                         latent_channels=4, scaling_factor=0.18215).eval()


def latte_pipeline_latents(model, scheduler: str, positive: torch.Tensor, negative: torch.Tensor, *, height: int,
                           width: int, seed: int, steps: int, guidance_scale: float,
                           enable_temporal_attentions: bool = True) -> torch.Tensor:
    """LattePipeline.__call__ (diffusers' own) on latents of FRAMES x ``height`` x ``width``; returns its
    latents [B, C, F, H, W]."""
    import diffusers
    from diffusers import LattePipeline

    scheduler_class = getattr(diffusers, SCHEDULERS[scheduler]["_class_name"])
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                         scheduler=scheduler_class.from_config(SCHEDULERS[scheduler]))
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=positive, negative_prompt=None, negative_prompt_embeds=negative, video_length=FRAMES, height=height * 8,
                width=width * 8, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed), enable_temporal_attentions=enable_temporal_attentions,
                output_type="latent", return_dict=False)[0]
