"""Tiny CogVideoX transformers, their diffusers folders, and diffusers' own CogVideoXPipeline as the reference.

2 heads x 16 (the 3-D rotary splits the head width 4 / 6 / 6), 2 blocks, 16 latent channels, text
width 16, random weights. The reference is CogVideoXPipeline.__call__ itself with prompt embeddings
given and output_type "latent" (no text encoder or VAE needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from random_weights import randomize_weights

SCHEDULERS = {
    # CogVideoX-5b's
    "dpm": {"_class_name": "CogVideoXDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True, "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0,
            "timestep_spacing": "trailing"},
    # CogVideoX-2b's
    "ddim": {"_class_name": "CogVideoXDDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
             "rescale_betas_zero_snr": True, "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0,
             "timestep_spacing": "trailing"},
}


def make_cogvideox_model(rotary: bool = True, seed: int = 0, text_tokens: int = 7, text_dim: int = 16, **config):
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(**{
        **dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=8,
               text_embed_dim=text_dim, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
               max_text_seq_length=text_tokens, use_rotary_positional_embeddings=rotary),
        **config,
    })
    randomize_weights(model, seed)
    return model.eval()


def make_cogvideox15_model(seed: int = 0, **config):
    """A tiny CogVideoX 1.5 (THUDM/CogVideoX1.5-5B's layout): 2 latent frames x 2x2 pixels per token
    (a linear patch embedding without bias), 3-D rotary over a "slice" grid of at most 10x10 latent
    pixels (sample_height / sample_width), no learned positions. The per-head q/k LayerNorm weights
    are 2 (not ~0.1 as the other random weights) so that attention is far from uniform and the
    rotary positions matter: a rotary row on the wrong token changes the result."""
    model = make_cogvideox_model(rotary=True, seed=seed, **{
        **dict(patch_size_t=2, patch_bias=False, sample_width=10, sample_height=10, sample_frames=17,
               use_learned_positional_embeddings=False),
        **config,
    })
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight")):
                param.add_(2.0)
    return model


def write_cogvideox_folder(root: Path, scheduler: str | dict | None = "dpm", model=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (model or make_cogvideox_model()).save_pretrained(root / "transformer", safe_serialization=True)
    if scheduler is not None:
        config = SCHEDULERS[scheduler] if isinstance(scheduler, str) else scheduler
        (root / "scheduler").mkdir(exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return root


def cogvideox_pipeline_latents(model, scheduler: str, positive: torch.Tensor, negative: torch.Tensor, *, frames: int,
                               height: int, width: int, seed: int, steps: int, guidance_scale: float) -> torch.Tensor:
    """CogVideoXPipeline.__call__ (diffusers' own) on latents of ``frames`` x ``height`` x ``width``;
    returns its latents [B, T, C, H, W]."""
    from diffusers import CogVideoXPipeline
    import diffusers

    scheduler_class = getattr(diffusers, SCHEDULERS[scheduler]["_class_name"])
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                             scheduler=scheduler_class.from_config(SCHEDULERS[scheduler]))
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_frames=(frames - 1) * 4 + 1,
                height=height * 8, width=width * 8, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed), output_type="latent", return_dict=False)[0]


def make_cogvideox_vae(scaling_factor: float = 0.7, seed: int = 0):
    """A tiny AutoencoderKLCogVideoX with the real compression (4 levels: 8x in space, 4x in time), 8 channels wide."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                  latent_channels=16, scaling_factor=scaling_factor).eval()
