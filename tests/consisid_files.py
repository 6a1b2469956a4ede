"""Tiny ConsisID transformers, their diffusers folders, identity inputs, and diffusers' own
ConsisIDPipeline as the reference.

The real architecture at toy width: 2 heads x 16 (3-D rotary), 2 blocks with a perceiver
cross-attention after each (cross_attn_interval 1), 32 input channels (latent + face latent), a
local facial extractor with 2 scales of 5 EVA-CLIP tokens 8 wide and a 12-wide face embedding;
random weights. The VAE is tests/cogvideox_files.py's tiny AutoencoderKLCogVideoX.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cogvideox_files import SCHEDULERS, make_cogvideox_vae
from random_weights import randomize_weights

ID_DIM, VIT_DIM, SCALES, VIT_TOKENS = 12, 8, 2, 5


def make_consisid_model(seed: int = 0, text_tokens: int = 7, text_dim: int = 16, face: bool = True):
    from diffusers import ConsisIDTransformer3DModel

    model = ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=32, out_channels=16, time_embed_dim=8,
        text_embed_dim=text_dim, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=text_tokens, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
        is_train_face=face, is_kps=False, cross_attn_interval=1, cross_attn_dim_head=8, cross_attn_num_heads=2,
        LFE_id_dim=ID_DIM, LFE_vit_dim=VIT_DIM, LFE_depth=2, LFE_dim_head=4, LFE_num_heads=2, LFE_num_id_token=2,
        LFE_num_querie=3, LFE_output_dim=int(32 / 3 * 2), LFE_ff_mult=1, LFE_num_scale=SCALES,
    )
    randomize_weights(model, seed)
    return model.eval()


def write_consisid_folder(root: Path, model=None, scheduler: str | None = "dpm", vae: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (model or make_consisid_model()).save_pretrained(root / "transformer", safe_serialization=True)
    if scheduler is not None:
        (root / "scheduler").mkdir(exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULERS[scheduler]))
    if vae:
        make_cogvideox_vae().save_pretrained(root / "vae", safe_serialization=True)
    return root


def identity(seed: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(id_cond [1, ID_DIM], id_vit_hidden: SCALES tensors [1, VIT_TOKENS, VIT_DIM]), as process_face_embeddings_infer gives."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, ID_DIM, generator=g), [torch.randn(1, VIT_TOKENS, VIT_DIM, generator=g) for _ in range(SCALES)]


def face_image(height: int, width: int, seed: int = 4) -> torch.Tensor:
    """A ComfyUI IMAGE [1, H, W, 3] of whole 8-bit levels (as LoadImage gives from a PNG)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, height, width, 3), generator=g).float() / 255


def as_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy().astype(np.uint8))


def consisid_pipeline_latents(model, image, positive: torch.Tensor, negative: torch.Tensor, id_cond, id_vit_hidden, *,
                              frames: int, height: int, width: int, seed: int, steps: int, guidance_scale: float,
                              scheduler: str = "dpm") -> torch.Tensor:
    """ConsisIDPipeline.__call__ (diffusers' own) with prompt embeddings given and output_type 'latent';
    returns its latents [B, T, C, H, W]."""
    import diffusers
    from diffusers.pipelines.consisid.pipeline_consisid import ConsisIDPipeline  # the top-level name needs opencv

    scheduler_class = getattr(diffusers, SCHEDULERS[scheduler]["_class_name"])
    pipe = ConsisIDPipeline(tokenizer=None, text_encoder=None, vae=make_cogvideox_vae(), transformer=model,
                            scheduler=scheduler_class.from_config(SCHEDULERS[scheduler]))
    pipe.set_progress_bar_config(disable=True)
    return pipe(image=image, prompt_embeds=positive, negative_prompt_embeds=negative, num_frames=(frames - 1) * 4 + 1,
                height=height * 8, width=width * 8, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed), output_type="latent", return_dict=False,
                id_cond=id_cond, id_vit_hidden=id_vit_hidden)[0]
