"""ConsisID's identity inputs: the identity-embedding file and the face image's VAE latent.

ConsisIDPipeline takes three things about the face besides the prompt:
- ``id_cond``, the face embedding (insightface antelopev2's, 512, and the EVA-CLIP class token,
  768: [1, 1280]), and ``id_vit_hidden``, five EVA-CLIP hidden states [1, 577, 1024]. diffusers'
  ``process_face_embeddings_infer`` makes them with insightface + EVA-CLIP + facexlib, which this
  pack does not run: they come in an identity file (safetensors, written by ``save_identity_file``
  from that helper's outputs; README, "ConsisID").
- the face image (that helper's aligned crop), resized to the video's size, VAE-encoded and used
  as the first latent frame. Encoding happens here, in ComfyUI's process, with the VAE of the
  model's own diffusers folder, exactly as the pipeline preprocesses and encodes it; what is
  kept is the posterior (mean, std): the sampler draws its sample from the job's seed before the
  noise, as the pipeline does, so a seed gives the pipeline's result.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .loading.safetensors_files import CheckpointError

ID_COND = "id_cond"
ID_VIT_HIDDEN = "id_vit_hidden"  # id_vit_hidden.0, id_vit_hidden.1, ...: one tensor per scale


def save_identity_file(path: str | Path, id_cond: torch.Tensor, id_vit_hidden) -> None:
    """Write process_face_embeddings_infer's id_cond and id_vit_hidden (list) as an identity file."""
    from safetensors.torch import save_file

    tensors = {ID_COND: id_cond.detach().float().cpu().contiguous()}
    tensors.update({f"{ID_VIT_HIDDEN}.{i}": h.detach().float().cpu().contiguous() for i, h in enumerate(id_vit_hidden)})
    save_file(tensors, str(path))


def read_identity_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(id_cond [1, D], id_vit_hidden with its scales stacked [1, scales, tokens, width]) from an identity file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    how = ("write it from diffusers' process_face_embeddings_infer outputs with "
           "comfy_xdit.consisid_identity.save_identity_file (README, ConsisID)")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path}: not a readable identity file ({error}); {how}") from error
    scales = sorted((k for k in tensors if k.startswith(ID_VIT_HIDDEN + ".")), key=lambda k: int(k.rsplit(".", 1)[1]))
    missing = [name for name, present in ((ID_COND, ID_COND in tensors), (f"{ID_VIT_HIDDEN}.0, ...", bool(scales)))
               if not present]
    if missing:
        raise CheckpointError(f"{path}: the identity file has no {' and no '.join(missing)} (it holds "
                              f"{', '.join(sorted(tensors)) or 'nothing'}); {how}")
    id_cond = tensors[ID_COND].float()
    hidden = [tensors[k].float() for k in scales]
    if id_cond.ndim == 1:
        id_cond = id_cond[None]
    if any(h.shape != hidden[0].shape or h.ndim != 3 for h in hidden) or id_cond.ndim != 2 or id_cond.shape[0] != 1:
        raise CheckpointError(f"{path}: id_cond {list(id_cond.shape)} and id_vit_hidden "
                              f"{[list(h.shape) for h in hidden]} are not one face's [1, D] and [1, tokens, width] "
                              f"each; {how}")
    for name, value in ((ID_COND, id_cond), (ID_VIT_HIDDEN, torch.stack(hidden))):
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: {name} contains NaN or infinity")
    return id_cond, torch.stack(hidden, dim=1)


def face_latent_distribution(vae, image: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The face IMAGE [B, H, W, 3] in [0, 1] -> its VAE posterior (mean, std) [B, C, 1, h, w], each image
    as ConsisIDPipeline encodes it: 8-bit PIL image, the pipeline's VideoProcessor.preprocess to
    ``height`` x ``width`` pixels, ``vae.encode`` of one frame."""
    import numpy as np
    from diffusers.video_processor import VideoProcessor
    from PIL import Image

    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"the face image must be a ComfyUI IMAGE [B, H, W, 3] (RGB), got shape {list(image.shape)}")
    processor = VideoProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    param = next(vae.parameters())
    means, stds = [], []
    with torch.no_grad():
        for frame in image:
            pil = Image.fromarray((frame.float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).numpy().astype(np.uint8))
            pixels = processor.preprocess(pil, height=height, width=width).to(param.device, param.dtype)
            posterior = vae.encode(pixels.unsqueeze(2)).latent_dist
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)
