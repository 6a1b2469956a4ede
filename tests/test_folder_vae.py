"""The VAE of a model's diffusers folder decodes as the family's diffusers pipeline does (CogVideoX, Latte).

The reference is diffusers' own CogVideoXPipeline: ``decode_latents`` (vae.decode of latents /
scaling_factor) and ``video_processor.postprocess_video`` on a tiny random AutoencoderKLCogVideoX
(4 levels, 8 channels: the real 8x spatial and 4x temporal compression), saved in the folder
beside the tiny transformer.
"""

from __future__ import annotations

import json

import pytest
import torch

from comfy_xdit.folder_vae import decode_video_latent, load_folder_vae, vae_folder_of
from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.models import families
from cogvideox_files import make_cogvideox_vae, write_cogvideox_folder
from latte_files import make_latte_vae


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = write_cogvideox_folder(tmp_path_factory.mktemp("cogvideox") / "CogVideoX-tiny")
    make_cogvideox_vae(scaling_factor=0.7).save_pretrained(root / "vae", safe_serialization=True)
    return root


def pipeline_decode(vae, latents_btchw: torch.Tensor) -> torch.Tensor:
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=None, scheduler=None)
    video = pipe.decode_latents(latents_btchw)
    return pipe.video_processor.postprocess_video(video, output_type="pt")  # [B, F, 3, H, W]


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_equals_the_cogvideox_pipeline(folder, batch):
    vae = load_folder_vae(vae_folder_of(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    # The pipeline's latents [B, T, C, H, W] in model space; ComfyUI's LATENT is [B, C, T, H, W] / the family scale.
    latents = torch.randn(batch, 3, 16, 6, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = pipeline_decode(vae, latents)
    family_scale = families.COGVIDEOX_5B_LATENT
    comfy_latent = family_scale.from_model_space(latents.permute(0, 2, 1, 3, 4))
    ours = decode_video_latent(vae, family_scale.to_model_space(comfy_latent))
    assert ours.shape == (batch * 9, 48, 80, 3)
    expected = reference.permute(0, 1, 3, 4, 2).flatten(0, 1)
    assert expected.std() > 0.01  # a random VAE that draws something
    assert float((ours - expected).abs().max()) < 1e-5


def test_the_vae_folder_is_found_from_the_folder_or_its_weights_file(folder):
    assert vae_folder_of(folder) == folder / "vae"
    assert vae_folder_of(folder / "transformer") == folder / "vae"
    assert vae_folder_of(folder / "transformer" / "diffusion_pytorch_model.safetensors") == folder / "vae"


def test_a_folder_without_vae_or_with_another_vae_is_refused_by_name(tmp_path):
    bare = write_cogvideox_folder(tmp_path / "bare")
    with pytest.raises(CheckpointError, match="no vae/config.json beside the transformer"):
        vae_folder_of(bare / "transformer" / "diffusion_pytorch_model.safetensors")
    (bare / "vae").mkdir()
    (bare / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLMochi"}))
    with pytest.raises(CheckpointError, match="holds a AutoencoderKLMochi.*stock VAELoader"):
        load_folder_vae(vae_folder_of(bare))
    with pytest.raises(ValueError, match=r"decodes latents with 16 channels"):
        decode_video_latent(make_cogvideox_vae(), torch.zeros(1, 4, 2, 6, 10))


def test_an_image_vae_decodes_the_frames_as_the_latte_pipeline(tmp_path):
    from diffusers import LattePipeline

    make_latte_vae().save_pretrained(tmp_path / "vae", safe_serialization=True)
    vae = load_folder_vae(tmp_path / "vae")
    latents = torch.randn(2, 4, 3, 6, 10, generator=torch.Generator().manual_seed(3))  # model space [B, C, F, H, W]
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=None, scheduler=None)
    with torch.no_grad():
        video = pipe.video_processor.postprocess_video(pipe.decode_latents(latents, video_length=3), output_type="pt")
    latte = families.LATTE.latent
    ours = decode_video_latent(vae, latte.to_model_space(latte.from_model_space(latents)))
    expected = video.permute(0, 1, 3, 4, 2).flatten(0, 1)  # [B x F, H, W, 3]
    assert ours.shape == expected.shape == (6, 48, 80, 3)
    assert expected.std() > 0.01
    assert float((ours - expected).abs().max()) < 1e-5
