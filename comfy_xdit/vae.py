"""VAE decode for the pool: the Flux VAE (any LDM ``AutoencoderKL``), plain and patch-parallel.

What goes in: the VAE weights as ComfyUI holds them. The bridge sends
``vae.first_stage_model.state_dict()`` of the stock VAE (LDM key layout: ``decoder.conv_in``,
``decoder.mid.block_1``, ``decoder.up.N.block.M``, ``decoder.norm_out``, ...), or a caller names a
safetensors file (a VAE file such as ``ae.safetensors``, a checkpoint whose VAE sits under
``first_stage_model.`` or ``vae.``, or a diffusers ``vae`` folder). Only the decoder half is
read: encoder keys are ignored. The config is inferred from tensor shapes; nothing reaches a hub.

What comes out: exactly what ComfyUI's ``VAE.decode`` computes for these VAEs. ComfyUI applies
no latent scaling in ``VAE.decode`` (Flux's 0.3611 / 0.1159 belong to the sampler's latent
format, and a LATENT is already raw VAE space): ``x = decoder(post_quant_conv(latent))`` in the
VAE's dtype, then ``clamp((x.float() + 1) / 2, 0, 1)`` channels last, ``[B, H, W, 3]``.

The decoder is diffusers' ``Decoder`` (the ``UpDecoderBlock2D`` stack), because distvae's
``DecoderAdapter`` is written against it: ``decode_parallel`` runs ``conv_in`` and the mid block
(with its global attention) whole on every rank, then gives each rank a band of latent rows for
the up blocks, with halo exchange in every convolution and group norms whose statistics are
summed over the group; the bands are all-gathered at the end, so every rank returns the whole
image. Heights with fewer latent rows than ranks fall back to a plain decode on every rank.

Supported: AutoencoderKL decoders with ``UpDecoderBlock2D`` levels and no attention outside the
mid block (Flux.1, SD3/3.5, SD1.x/SDXL with ``post_quant_conv``). Refused by name: the SVD
temporal decoder, Flux.2's batch-norm latent, 3D (video) VAEs, TAESD.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from .loading.safetensors_files import CheckpointError, SafetensorsSource, find_weight_files

log = logging.getLogger(__name__)

# Prefixes a VAE's keys carry inside a whole checkpoint (diffusers' LDM_VAE_KEYS, plus the
# ``first_stage_model.`` of ComfyUI's own SD checkpoints, which is the same string).
VAE_PREFIXES = ("first_stage_model.", "vae.")
LDM_LAYOUT = "ldm"
DIFFUSERS_LAYOUT = "diffusers"
# ComfyUI builds every LDM VAE with GroupNorm(32) (``Normalize`` in diffusionmodules/model.py);
# shapes cannot tell the group count, so 32 is assumed unless a diffusers config.json says else.
DEFAULT_NORM_GROUPS = 32


class VAEError(ValueError):
    """A VAE this module cannot decode with; the message says what it is and what to do."""


@dataclass(frozen=True)
class VAEConfig:
    latent_channels: int
    block_out_channels: tuple[int, ...]  # diffusers order: highest resolution first
    layers_per_block: int  # resnets per up level minus one, as diffusers counts it
    out_channels: int
    mid_attention: bool
    post_quant_conv: bool
    norm_num_groups: int = DEFAULT_NORM_GROUPS

    @property
    def upscale_ratio(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------
# Reading the state dict


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE's own keys: a known prefix removed when the VAE sits inside a whole checkpoint."""
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix + "decoder.") for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def _is_decoder_key(key: str) -> bool:
    # bn.* is kept only so that a Flux.2 VAE is recognised and refused by name.
    return key.startswith(("decoder.", "post_quant_conv.", "bn."))


def _decoder_part(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the keys decode needs (the encoder can be half the tensors)."""
    sd = {}
    for key, value in state_dict.items():
        if key.startswith("decoder.post_quant_conv."):  # ComfyUI accepts this spelling too
            key = key[len("decoder."):]
        if _is_decoder_key(key):
            sd[key] = value
    return sd


def decoder_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors decode needs, prefix removed: what the bridge should send (not the encoder)."""
    return _decoder_part(_strip_prefix(state_dict))


def vae_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"ldm"`` or ``"diffusers"`` for a prefix-free VAE state dict; VAEError for anything else."""
    if "taesd_decoder.1.weight" in state_dict or "decoder.22.bias" in state_dict:
        raise VAEError("this is a TAESD/TAEHV preview decoder, not a full VAE; load the model's full VAE (for Flux: ae.safetensors)")
    if "decoder.mid.block_1.mix_factor" in state_dict:
        raise VAEError("this is the SVD temporal video VAE decoder; ParallelVAEDecode supports image AutoencoderKL VAEs (Flux, SD3, SD1.x/SDXL)")
    if "bn.running_mean" in state_dict:
        raise VAEError("this VAE has a batch-norm latent (Flux.2's VAE); it is not supported by ParallelVAEDecode yet: use the stock VAEDecode")
    if "decoder.conv_in.weight" in state_dict and "decoder.up.0.block.0.conv1.weight" in state_dict:
        return LDM_LAYOUT
    if "decoder.conv_in.weight" in state_dict and "decoder.up_blocks.0.resnets.0.conv1.weight" in state_dict:
        return DIFFUSERS_LAYOUT
    if any(k.startswith("decoder.") for k in state_dict):
        raise VAEError(
            "unrecognised VAE decoder layout (expected AutoencoderKL keys such as 'decoder.up.0.block.0.conv1.weight' "
            "or 'decoder.up_blocks.0.resnets.0.conv1.weight'); video and other VAE families are not supported"
        )
    raise VAEError("no VAE decoder weights found (no 'decoder.*' keys, with or without 'first_stage_model.' or 'vae.')")


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := regex.match(k))}
    if found != set(range(len(found))):
        raise VAEError(f"VAE decoder indices are not contiguous for {pattern!r}: {sorted(found)}")
    return len(found)


def infer_vae_config(state_dict: Mapping[str, torch.Tensor], norm_num_groups: int = DEFAULT_NORM_GROUPS) -> VAEConfig:
    """The decoder's config from tensor shapes (prefix-free state dict, either layout)."""
    layout = vae_layout(state_dict)
    conv_in = state_dict["decoder.conv_in.weight"]
    if conv_in.ndim != 4:
        raise VAEError(f"decoder.conv_in.weight has {conv_in.ndim} dims: a 3D (video) VAE, which ParallelVAEDecode does not support")
    keys = list(state_dict)
    if layout == LDM_LAYOUT:
        levels = _count(keys, r"decoder\.up\.(\d+)\.")
        blocks = [_count([k for k in keys if k.startswith(f"decoder.up.{i}.block.")], rf"decoder\.up\.{i}\.block\.(\d+)\.") for i in range(levels)]
        # LDM numbers levels from the highest resolution (0) up; diffusers' block_out_channels too.
        channels = [state_dict[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
        upsample = [f"decoder.up.{i}.upsample.conv.weight" in state_dict for i in range(levels)]
        up_attention = any(re.match(r"decoder\.up\.\d+\.attn\.", k) for k in keys)
        mid_attention = "decoder.mid.attn_1.q.weight" in state_dict
    else:
        levels = _count(keys, r"decoder\.up_blocks\.(\d+)\.")
        # diffusers numbers up_blocks from the lowest resolution: level i is up_blocks[n-1-i].
        blocks = [
            _count([k for k in keys if k.startswith(f"decoder.up_blocks.{levels - 1 - i}.resnets.")], rf"decoder\.up_blocks\.{levels - 1 - i}\.resnets\.(\d+)\.")
            for i in range(levels)
        ]
        channels = [state_dict[f"decoder.up_blocks.{levels - 1 - i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
        upsample = [f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0.conv.weight" in state_dict for i in range(levels)]
        up_attention = any(re.match(r"decoder\.up_blocks\.\d+\.attentions\.", k) for k in keys)
        mid_attention = any(k.startswith("decoder.mid_block.attentions.0.") for k in keys)
    if levels == 0:
        raise VAEError("the VAE decoder has no up levels")
    if len(set(blocks)) != 1 or blocks[0] < 1:
        raise VAEError(f"the VAE decoder's up levels have different numbers of resnets ({blocks}); not an AutoencoderKL decoder")
    if up_attention:
        raise VAEError("the VAE decoder has attention inside its up levels; only AutoencoderKL decoders with mid-block attention are supported")
    if upsample != [False] + [True] * (levels - 1):
        raise VAEError(f"unexpected upsamplers in the VAE decoder (levels with one: {upsample}); not an AutoencoderKL decoder")
    if conv_in.shape[0] != channels[-1]:
        raise VAEError("decoder.conv_in does not feed the lowest-resolution level; not an AutoencoderKL decoder")
    if any(c % norm_num_groups for c in channels):
        raise VAEError(f"VAE decoder channels {channels} do not divide into {norm_num_groups} norm groups")
    return VAEConfig(
        latent_channels=int(conv_in.shape[1]),
        block_out_channels=tuple(int(c) for c in channels),
        layers_per_block=blocks[0] - 1,
        out_channels=int(state_dict["decoder.conv_out.weight"].shape[0]),
        mid_attention=mid_attention,
        post_quant_conv="post_quant_conv.weight" in state_dict,
        norm_num_groups=norm_num_groups,
    )


def _ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """LDM keys -> diffusers AutoencoderKL keys, through diffusers' own single-file converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(config.block_out_channels)
    converter_config = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    return convert_ldm_vae_checkpoint(dict(state_dict), converter_config)


_DEPRECATED_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _diffusers_attention_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers files name the mid attention query/key/value/proj_attn; current ones to_q..."""
    out = {}
    for key, value in state_dict.items():
        if ".mid_block.attentions." in key:
            for old, new in _DEPRECATED_ATTENTION.items():
                if f".{old}" in key:
                    key = key.replace(f".{old}", f".{new}")
                    if value.ndim > 2:  # 1x1 conv weights stored by some exporters
                        value = value.reshape(value.shape[0], value.shape[1])
                    break
        out[key] = value
    return out


def read_vae_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The decoder tensors of a VAE file (safetensors only) or diffusers folder, prefix removed.

    Accepts a VAE file (``ae.safetensors``), a whole checkpoint holding the VAE under
    ``first_stage_model.`` or ``vae.``, and a diffusers folder (``vae/`` of a pipeline folder).
    Only the decoder's tensors are read from disk.
    """
    files, _ = find_weight_files(path, subfolder="vae")
    with SafetensorsSource(files) as source:
        keys = source.keys()
        prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p + "decoder.") for k in keys)), "")
        wanted = [k for k in keys if k.startswith(prefix) and _is_decoder_key(k[len(prefix):])]
        if not wanted:
            raise CheckpointError(
                f"{path}: no VAE decoder weights in it (no 'decoder.*' keys, with or without 'first_stage_model.' or 'vae.')"
            )
        return _decoder_part({k[len(prefix):]: source.get(k) for k in wanted})


def _config_norm_groups(path: str | Path) -> int:
    """norm_num_groups from a diffusers folder's config.json, else ComfyUI's 32."""
    _, config_file = find_weight_files(path, subfolder="vae")
    if config_file is not None:
        try:
            groups = json.loads(Path(config_file).read_text()).get("norm_num_groups")
        except (OSError, ValueError, AttributeError):
            groups = None
        if isinstance(groups, int) and groups > 0:
            return groups
    return DEFAULT_NORM_GROUPS


def state_dict_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A content hash of the decoder's tensors (names, shapes, dtypes and bytes), for caching.

    Encoder keys and prefixes do not change it, so a VAE file and the state dict ComfyUI built
    from it hash the same when their decoder tensors agree. About 0.2 s per 100 MB on one core.
    """
    sd = decoder_state_dict(state_dict)
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(sd):
        tensor = sd[key].detach()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        data = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Building and decoding


def _make_decoder(config: VAEConfig) -> nn.Module:
    from diffusers.models.autoencoders.vae import Decoder

    n = len(config.block_out_channels)
    return Decoder(
        in_channels=config.latent_channels,
        out_channels=config.out_channels,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        act_fn="silu",
        norm_type="group",
        mid_block_add_attention=config.mid_attention,
    )


def _dtype_of(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtype = sd["decoder.conv_in.weight"].dtype
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def build_decoder(
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    norm_num_groups: int = DEFAULT_NORM_GROUPS,
) -> "VAEDecoder":
    """A ready-to-decode VAEDecoder from a VAE state dict (either layout, prefixes allowed).

    ``dtype`` is the dtype ComfyUI decodes in (``vae.vae_dtype``: bfloat16 on recent GPUs,
    float32 on CPU); None keeps the state dict's own (ComfyUI's ``first_stage_model`` already
    holds ``vae_dtype`` weights).
    """
    sd = decoder_state_dict(state_dict)
    config = infer_vae_config(sd, norm_num_groups)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    dtype = dtype or _dtype_of(sd)
    if vae_layout(sd) == LDM_LAYOUT:
        sd = _ldm_to_diffusers(sd, config)
    else:
        sd = _diffusers_attention_names(sd)

    decoder_sd = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    with torch.device("meta"):
        decoder = _make_decoder(config)
    missing, unexpected = decoder.load_state_dict(decoder_sd, strict=False, assign=True)
    if missing or unexpected:
        raise VAEError(
            f"VAE decoder weights do not match an AutoencoderKL decoder of config {config}: "
            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )
    decoder = decoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    post_quant_conv = None
    if config.post_quant_conv:
        weight, bias = sd["post_quant_conv.weight"], sd["post_quant_conv.bias"]
        post_quant_conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1, device="meta")
        post_quant_conv.load_state_dict({"weight": weight, "bias": bias}, assign=True)
        post_quant_conv = post_quant_conv.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return VAEDecoder(decoder, post_quant_conv, config)


def load_vae_decoder(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu") -> "VAEDecoder":
    """build_decoder(read_vae_state_dict(path)): a VAE file, checkpoint or diffusers folder."""
    return build_decoder(read_vae_state_dict(path), dtype=dtype, device=device, norm_num_groups=_config_norm_groups(path))


def process_output(x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ``VAE.process_output`` after ``.float()``, then channels last: [B, H, W, C]."""
    return torch.clamp((x.float() + 1.0) / 2.0, min=0.0, max=1.0).movedim(1, -1)


class VAEDecoder:
    """A diffusers AutoencoderKL decoder (+ post_quant_conv) with ComfyUI's decode semantics.

    Built once per VAE on its device and dtype; do not move it afterwards (the patch-parallel
    copies share its parameter tensors).
    """

    def __init__(self, decoder: nn.Module, post_quant_conv: nn.Module | None, config: VAEConfig):
        self.decoder = decoder
        self.post_quant_conv = post_quant_conv
        self.config = config
        self._parallel: dict = {}  # process group -> distvae DecoderAdapter sharing our weights

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def _check(self, latent: torch.Tensor) -> None:
        if latent.ndim != 4 or latent.shape[1] != self.config.latent_channels:
            raise VAEError(
                f"latent of shape {tuple(latent.shape)} does not fit this VAE: expected [B, {self.config.latent_channels}, h, w]"
                + (" (a 5D latent is a video latent)" if latent.ndim == 5 else "")
            )

    def _run(self, decoder: nn.Module, latent: torch.Tensor, batch_size: int | None) -> torch.Tensor:
        self._check(latent)
        chunk = batch_size or latent.shape[0]
        images = []
        with torch.inference_mode():
            for start in range(0, latent.shape[0], chunk):
                z = latent[start:start + chunk].to(device=self.device, dtype=self.dtype)
                if self.post_quant_conv is not None:
                    z = self.post_quant_conv(z)
                images.append(process_output(decoder(z)))
        return torch.cat(images) if len(images) > 1 else images[0]

    def decode(self, latent: torch.Tensor, batch_size: int | None = 1) -> torch.Tensor:
        """[B, C, h, w] raw VAE latent -> [B, 8h, 8w, 3] float32 in [0, 1], on this decoder's device.

        ``batch_size`` images are decoded at a time (ComfyUI picks it from free memory; per-image
        results do not depend on it); None decodes the whole batch at once.
        """
        return self._run(self.decoder, latent, batch_size)

    def decode_parallel(self, latent: torch.Tensor, group=None, batch_size: int | None = 1) -> torch.Tensor:
        """decode() split by image rows over a process group (distvae); the whole image on every rank.

        ``group`` is a torch.distributed ProcessGroup (None: the default group). Every rank must
        call it with the same latent. One rank, or no process group, is a plain decode; a latent
        with fewer rows than ranks is decoded whole on every rank (logged).
        """
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return self.decode(latent, batch_size)
        group = group if group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if world == 1:
            return self.decode(latent, batch_size)
        self._check(latent)
        if latent.shape[2] < world:
            log.warning(
                "VAE decode: %d latent rows cannot be split over %d ranks; decoding whole on every rank",
                latent.shape[2], world,
            )
            return self.decode(latent, batch_size)
        return self._run(self._adapter(group), latent, batch_size)

    def _adapter(self, group) -> nn.Module:
        adapter = self._parallel.get(group)
        if adapter is None:
            try:
                from distvae.modules.adapters.vae.decoder_adapters import DecoderAdapter
            except ImportError as error:
                raise VAEError(
                    "patch-parallel VAE decode needs the distvae package: pip install distvae "
                    "(or comfy-xdit[vae])"
                ) from error
            # distvae rebuilds the decoder it is given in place, so give it a second module tree
            # that holds the very same parameter tensors: no weight is copied, and the plain
            # decoder stays usable for single-rank and fallback decodes.
            with torch.device("meta"):
                twin = _make_decoder(self.config)
            twin.load_state_dict(self.decoder.state_dict(), assign=True)
            twin.eval().requires_grad_(False)
            adapter = DecoderAdapter(twin, vae_group=group).eval()
            self._parallel[group] = adapter
        return adapter
