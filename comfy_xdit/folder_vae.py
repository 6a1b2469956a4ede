"""Decode with the VAE of a model's own diffusers folder, as the family's diffusers pipeline decodes.

Core ComfyUI has no VAE for some diffusers-semantics families (CogVideoX's 3-D causal
``AutoencoderKLCogVideoX``), so stock VAELoader cannot load one; Latte's is the SD image VAE
(``AutoencoderKL``) applied frame by frame, which stock VAE Decode does not do to a video latent.
The diffusers folder the model was loaded from has it beside ``transformer/``: ``<folder>/vae/``
(config.json + safetensors). It is loaded offline with diffusers' own class and decodes exactly as
the pipeline's ``decode_latents`` and ``postprocess_video`` do: ``vae.decode(model_space /
vae.config.scaling_factor)``, then ``(x / 2 + 0.5).clamp(0, 1)`` (an image VAE gets the frames as
a batch, as LattePipeline's ``decode_latents`` does). A ComfyUI LATENT is the family latent format's raw space (model space
/ the family's scale), so it is brought back to model space first: the result is the pipeline's
even when the folder's VAE scale differs from the family's default.

The decode runs in the calling process on one device: the 3-D VAE is not patch-parallel (its causal
3-D convolutions carry a cache from one frame batch to the next), so splitting it over the pool
would decode the same frames on every worker (Latte's image VAE could be split by frames; not done yet). diffusers' tiling bounds its memory on large frames.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .loading.diffusers_folders import folder_of_weights_file
from .loading.safetensors_files import CheckpointError

VAE_FOLDER = "vae"
# The diffusers VAE classes this decode runs, and the latent dimensions they take after [B, C]
# (2: an image VAE, given the video's frames as a batch).
VIDEO_VAE_CLASSES = {"AutoencoderKLCogVideoX": 3, "AutoencoderKL": 2}
FRAMES_PER_DECODE = 14  # LattePipeline's decode_chunk_size: frames an image VAE decodes at once


def vae_folder_of(model_path: str | Path) -> Path:
    """The ``vae/`` of the diffusers folder a model was loaded from (the folder itself, its
    ``transformer/``, or a weights file inside it)."""
    folder = folder_of_weights_file(model_path)
    candidates = [folder / VAE_FOLDER, folder.parent / VAE_FOLDER]
    found = next((c for c in candidates if (c / "config.json").is_file()), None)
    if found is None:
        raise CheckpointError(f"{folder}: no {VAE_FOLDER}/config.json beside the transformer; this decode uses the VAE of "
                              "the model's diffusers folder: copy the whole folder (with vae/) into models/diffusion_models")
    return found


def read_vae_class(vae_folder: Path) -> str:
    try:
        name = json.loads((vae_folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{vae_folder / 'config.json'}: unreadable config ({error})") from error
    if name not in VIDEO_VAE_CLASSES:
        raise CheckpointError(f"{vae_folder}: holds a {name}, which this node does not decode (it decodes "
                              f"{', '.join(VIDEO_VAE_CLASSES)}); decode this model's latent with the stock VAELoader + "
                              "VAE Decode nodes")
    return name


def load_folder_vae(vae_folder: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    tiled: bool = True):
    """The folder's diffusers VAE, loaded offline from safetensors only."""
    import diffusers

    cls = getattr(diffusers, read_vae_class(vae_folder))
    try:
        vae = cls.from_pretrained(vae_folder, torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as error:
        raise CheckpointError(f"{vae_folder}: the VAE did not load ({error}); it needs config.json and "
                              "diffusion_pytorch_model.safetensors") from error
    vae = vae.to(device).eval()
    vae.enable_slicing()  # one video of the batch at a time, as the pipelines recommend
    if tiled:
        vae.enable_tiling()
    return vae


@torch.no_grad()
def decode_video_latent(vae, model_space: torch.Tensor) -> torch.Tensor:
    """A video latent in model space [B, C, T, H, W] -> ComfyUI IMAGE frames [B x F, H', W', 3] in [0, 1]
    (CogVideoXPipeline's / LattePipeline's decode_latents + postprocess_video, output_type 'pt', channels last)."""
    if model_space.ndim != 5:
        raise ValueError(f"this VAE decodes video latents [B, C, T, H, W], got shape {list(model_space.shape)}")
    channels = vae.config.latent_channels
    if model_space.shape[1] != channels:
        raise ValueError(f"this VAE decodes latents with {channels} channels, got shape {list(model_space.shape)}")
    latents = model_space / vae.config.scaling_factor
    param = next(vae.parameters())
    latents = latents.to(param.device, param.dtype)
    if VIDEO_VAE_CLASSES.get(type(vae).__name__) == 2:
        frames = latents.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B x F, C, H, W]
        images = torch.cat([vae.decode(chunk).sample for chunk in frames.split(FRAMES_PER_DECODE)])
        return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
    video = vae.decode(latents).sample  # [B, 3, F, H, W]
    frames = (video.float() / 2 + 0.5).clamp(0, 1)
    return frames.permute(0, 2, 3, 4, 1).flatten(0, 1).cpu()
