"""The model families the engine runs, as data: one entry per family, everything the engine,
the bridge and the README need to know about it.

An entry says how to recognise the family's checkpoints from their keys, how to load them
(offline, single file or diffusers folder), how ComfyUI's LATENT maps to the model's space, which
model sampling ComfyUI uses for it, which conditioning it takes, and which parallel methods it
supports. The README's model table is generated from this registry (tools/make_model_table.py;
tests/test_families.py checks that the README matches), so it cannot drift from the code.

Heavy imports (diffusers) happen inside the functions, so reading the registry stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..loading.safetensors_files import CheckpointError, SafetensorsSource, find_layouts, find_weight_files
from ..preview import FLUX_LATENT_RGB_BIAS, FLUX_LATENT_RGB_FACTORS
from ..requests import (CogVideoXConditioning, ConsisIDConditioning, DiTConditioning, FluxConditioning, HunyuanDiTConditioning,
                        HunyuanVideoConditioning, MochiConditioning, PixArtConditioning, QwenImageConditioning, SD3Conditioning,
                        WanConditioning)
from ..requests import LatteConditioning
from ..sampling.diffusers_schedulers import DiffusersPipeline
from ..sampling.discrete_sampling import DiscreteSampling
from ..sampling.schedules import FLUX_DEV_SHIFT, FLUX_SCHNELL_SHIFT, DiscreteFlowSampling, FlowSampling


@dataclass(frozen=True)
class LatentFormat:
    """ComfyUI's latent format of a family: model space = (latent - shift) * scale.

    Video families (Wan) normalise each channel with the VAE's statistics instead:
    model space = (latent - mean[c]) * scale / std[c], in ComfyUI's order of operations.
    """

    channels: int
    scale: float
    shift: float
    # Linear latent -> RGB map for live previews (the published fit ComfyUI uses).
    rgb_factors: tuple[tuple[float, float, float], ...]
    rgb_bias: tuple[float, float, float]
    # Per-channel statistics (None: the scalar shift above applies).
    channel_mean: tuple[float, ...] | None = None
    channel_std: tuple[float, ...] | None = None
    # Spatial dimensions of the latent after [B, C]: 2 for images, 3 for video [T, H, W].
    dimensions: int = 2

    def _per_channel(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        # float32 first, as ComfyUI builds its tables, then the latent's dtype.
        table = torch.tensor(values, dtype=torch.float32).view(1, self.channels, *([1] * (like.ndim - 2)))
        return table.to(like.device, like.dtype)

    def to_model_space(self, latent: torch.Tensor) -> torch.Tensor:
        if self.channel_mean is None:
            return (latent - self.shift) * self.scale
        return (latent - self._per_channel(self.channel_mean, latent)) * self.scale / self._per_channel(self.channel_std, latent)

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_mean is None:
            return x / self.scale + self.shift
        return x * self._per_channel(self.channel_std, x) / self.scale + self._per_channel(self.channel_mean, x)


# Method names, in the README table's column order.
METHODS = {
    "ulysses": "Ulysses",
    "ring": "Ring",
    "cfg": "CFG parallel",
    "data": "data parallel",
    "pipefusion": "PipeFusion",
    "cache": "cache",
    "vae": "patch-parallel VAE",
    "lora": "LoRA",
    "controlnet": "ControlNet",
    "compile": "torch.compile",
    "tensor": "tensor parallel",
    "distrifusion": "DistriFusion",
}


@dataclass(frozen=True)
class ModelFamily:
    name: str  # ModelSpec.family
    display_name: str  # in messages and the README
    formats: str  # the checkpoint formats it loads, for the README
    # (layout -> signature keys): a checkpoint belongs to the family if its keys hold one signature
    key_signatures: dict[str, tuple[str, ...]]
    diffusers_class: str  # a diffusers folder's config.json _class_name
    read_config: Callable[[str], dict]  # headers only: refuses a bad file before any weight is read
    load: Callable[..., torch.nn.Module]  # (path, dtype=, device=) -> diffusers model
    latent: LatentFormat
    sampling: Callable[[float], object]  # shift -> the ComfyUI model sampling (schedules.py)
    default_shift: Callable[[object], float]  # model config -> shift
    sampling_note: str  # for the README
    build_denoiser: Callable[..., object]  # (model, mesh, lse_kernel, dtype) -> denoiser
    velocity: Callable[..., torch.Tensor]  # (denoiser, x, sigma, conditioning, active controls) -> v
    conditioning: type
    text_encoders: str  # what makes its CONDITIONING in ComfyUI, for messages
    # CONDITIONING extras the sampler uses; others are refused by name, except those in ignored_keys
    conditioning_keys: frozenset[str]
    ignored_keys: frozenset[str]
    methods: frozenset[str]
    resolution_shift: bool  # whether ModelSamplingFlux's resolution-dependent shift applies
    # model config -> latent format, for a family whose members differ in it (PixArt-alpha / Sigma)
    latent_for: Callable[[dict], LatentFormat] | None = None
    # model config -> {conditioning field: width the model takes}, checked before sampling
    conditioning_widths: Callable[[object], dict[str, int]] = lambda config: {
        "context": config.joint_attention_dim, "pooled": config.pooled_projection_dim}
    # what decodes its latents where ParallelVAEDecode cannot (no "vae" method), for the README
    vae_note: str = ""
    # frames a 5-D latent may have (None: any); an image family on a video VAE takes one
    max_frames: int | None = None
    # "comfyui": ComfyUI's model sampling and samplers (sampling/ksampler.py); "diffusers": the
    # diffusers folder's scheduler in the loop of the family's diffusers pipeline
    # (sampling/diffusers_schedulers.py), for families core ComfyUI does not run
    semantics: str = "comfyui"
    pipeline: DiffusersPipeline | None = None  # semantics "diffusers": what the pipeline does around the model
    # model config -> (shift -> model sampling), for a family whose members differ in their schedule (HunyuanDiT)
    sampling_for: Callable[[dict], Callable[[float], object]] | None = None

    def matches(self, keys) -> bool:
        return bool(find_layouts(keys, self.key_signatures))

    def latent_format(self, config) -> LatentFormat:
        return self.latent_for(dict(config)) if self.latent_for is not None else self.latent

    def model_sampling(self, config) -> Callable[[float], object]:
        """shift -> the model sampling of this member of the family."""
        return self.sampling_for(dict(config)) if self.sampling_for is not None else self.sampling


# --- Flux.1 ---------------------------------------------------------------------------------------


def _flux_read_config(path: str) -> dict:
    from ..loading.flux import read_flux_config

    return read_flux_config(path)


def _flux_load(path: str, dtype, device):
    from ..loading.flux import load_flux_transformer

    return load_flux_transformer(path, dtype=dtype, device=device)


def _flux_denoiser(model, mesh, lse_kernel, dtype):
    from . import flux

    forward = flux.install_sequence_parallel(model, mesh, lse_kernel)
    return flux.FluxDenoiser(forward, dtype, has_guidance=bool(model.config.guidance_embeds),
                             controlled=flux.controlled_forward(model, mesh))


def _flux_velocity(denoiser, x, sigma, cond: FluxConditioning, controls=()):
    return denoiser(x, sigma, cond.context, cond.pooled, cond.guidance, controls)


def _flux_default_shift(config) -> float:
    # Flux-schnell (no guidance embedder) was distilled for an unshifted schedule.
    return FLUX_DEV_SHIFT if config.guidance_embeds else FLUX_SCHNELL_SHIFT


FLUX = ModelFamily(
    name="flux",
    display_name="Flux.1 (dev, schnell)",
    formats="single file (BFL layout, ComfyUI's `model.diffusion_model.` prefix or none; diffusers layout), diffusers folder",
    key_signatures={
        "bfl": ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"),
        "diffusers": ("x_embedder.weight", "context_embedder.weight", "time_text_embed.timestep_embedder.linear_1.weight",
                      "time_text_embed.text_embedder.linear_1.weight", "proj_out.weight"),
    },
    diffusers_class="FluxTransformer2DModel",
    read_config=_flux_read_config,
    load=_flux_load,
    latent=LatentFormat(
        channels=16, scale=0.3611, shift=0.1159,
        rgb_factors=tuple(map(tuple, FLUX_LATENT_RGB_FACTORS)), rgb_bias=tuple(FLUX_LATENT_RGB_BIAS),
    ),
    sampling=FlowSampling,
    default_shift=_flux_default_shift,
    sampling_note="ModelSamplingFlux: shift 1.15 (schnell 1.0) or resolution-dependent",
    build_denoiser=_flux_denoiser,
    velocity=_flux_velocity,
    conditioning=FluxConditioning,
    text_encoders="CLIP-L + T5-XXL (DualCLIPLoader, type flux)",
    conditioning_keys=frozenset({"pooled_output", "guidance"}),
    ignored_keys=frozenset(),
    methods=frozenset({"ulysses", "ring", "cfg", "data", "pipefusion", "tensor", "vae", "lora", "controlnet", "compile",
                       "cache", "distrifusion"}),
    resolution_shift=True,
)


# --- Stable Diffusion 3 / 3.5 ---------------------------------------------------------------------

SD3_SHIFT = 3.0  # ComfyUI's SD3 model config (sampling_settings), for SD3 and SD3.5 alike
SD3_TIMESTEP_MULTIPLIER = 1000.0


def _sd3_read_config(path: str) -> dict:
    from ..loading.sd3 import read_sd3_config

    return read_sd3_config(path)


def _sd3_load(path: str, dtype, device):
    from ..loading.sd3 import load_sd3_transformer

    return load_sd3_transformer(path, dtype=dtype, device=device)


def _sd3_denoiser(model, mesh, lse_kernel, dtype):
    from . import sd3

    forward = sd3.install_sequence_parallel(model, mesh, lse_kernel)
    return sd3.SD3Denoiser(forward, dtype, patch_size=model.config.patch_size, timestep_multiplier=SD3_TIMESTEP_MULTIPLIER)


def _sd3_velocity(denoiser, x, sigma, cond: SD3Conditioning, controls=()):
    # ControlNets are refused for SD3 before sampling (its methods have no "controlnet").
    return denoiser(x, sigma, cond.context, cond.pooled)


def _sd3_sampling(shift: float) -> DiscreteFlowSampling:
    return DiscreteFlowSampling(shift, multiplier=SD3_TIMESTEP_MULTIPLIER)


def _sd3_signatures() -> dict[str, tuple[str, ...]]:
    from ..loading.sd3 import SD3_SIGNATURES

    return SD3_SIGNATURES


SD3 = ModelFamily(
    name="sd3",
    display_name="Stable Diffusion 3 / 3.5",
    formats="single file (Stability AI layout: whole checkpoint with `model.diffusion_model.`, or transformer only; diffusers layout), diffusers folder",
    key_signatures=_sd3_signatures(),
    diffusers_class="SD3Transformer2DModel",
    read_config=_sd3_read_config,
    load=_sd3_load,
    latent=LatentFormat(
        channels=16, scale=1.5305, shift=0.0609,
        rgb_factors=(
            (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
            (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
            (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
            (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
        ),
        rgb_bias=(0.2394, 0.2135, 0.1925),
    ),
    sampling=_sd3_sampling,
    default_shift=lambda config: SD3_SHIFT,
    sampling_note="ModelSamplingDiscreteFlow: shift 3.0, timestep = sigma x 1000",
    build_denoiser=_sd3_denoiser,
    velocity=_sd3_velocity,
    conditioning=SD3Conditioning,
    text_encoders="CLIP-L + CLIP-G (+ T5-XXL) (TripleCLIPLoader, or the checkpoint's CLIP)",
    conditioning_keys=frozenset({"pooled_output"}),
    # Stock SD3 ignores a FluxGuidance value too (its model has no guidance input).
    ignored_keys=frozenset({"guidance"}),
    methods=frozenset({"ulysses", "ring", "cfg", "data", "tensor", "vae", "cache", "lora"}),
    resolution_shift=False,
)


# --- PixArt-alpha / PixArt-Sigma ------------------------------------------------------------------

# ComfyUI's PixArt model config (supported_models.py): an EPS model on a DDPM schedule linear in
# beta from 1e-4 to 0.02 over 1,000 steps; no shift.
PIXART_SAMPLING = DiscreteSampling("eps", beta_schedule="sqrt_linear", linear_start=0.0001, linear_end=0.02, timesteps=1000)

# ComfyUI's latent formats: SD15 for PixArt-alpha (the models with micro-conditions), SDXL for the rest.
SD15_LATENT = LatentFormat(
    channels=4, scale=0.18215, shift=0.0,
    rgb_factors=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
    rgb_bias=(0.0, 0.0, 0.0),
)
SDXL_LATENT = LatentFormat(
    channels=4, scale=0.13025, shift=0.0,
    rgb_factors=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    rgb_bias=(0.1084, -0.0175, -0.0011),
)


def _pixart_read_config(path: str) -> dict:
    from ..loading.pixart import read_pixart_config

    return read_pixart_config(path)


def _pixart_load(path: str, dtype, device):
    from ..loading.pixart import load_pixart_transformer

    return load_pixart_transformer(path, dtype=dtype, device=device)


def _pixart_denoiser(model, mesh, lse_kernel, dtype):
    from . import pixart

    forward = pixart.install_sequence_parallel(model, mesh, lse_kernel)
    return pixart.PixArtDenoiser(forward, dtype, model.config, PIXART_SAMPLING)


def _pixart_velocity(denoiser, x, sigma, cond: PixArtConditioning, controls=()):
    # For PixArt this is the noise prediction; PIXART_SAMPLING turns it into x0.
    return denoiser(x, sigma, cond.context, cond.size)


def _pixart_is_alpha(config: dict) -> bool:
    # diffusers' rule for an unset flag (the 1024px models have micro-conditions); the loader sets it from the keys.
    flag = config.get("use_additional_conditions")
    return bool(flag) if flag is not None else config.get("sample_size") == 128


def _pixart_signatures() -> dict[str, tuple[str, ...]]:
    from ..loading.pixart import PIXART_SIGNATURES

    return PIXART_SIGNATURES


PIXART = ModelFamily(
    name="pixart",
    display_name="PixArt-alpha / PixArt-Sigma",
    formats="single file (original PixArt layout, with ComfyUI's `model.diffusion_model.` prefix or none; diffusers layout), diffusers folder",
    key_signatures=_pixart_signatures(),
    diffusers_class="PixArtTransformer2DModel",
    read_config=_pixart_read_config,
    load=_pixart_load,
    latent=SDXL_LATENT,
    latent_for=lambda config: SD15_LATENT if _pixart_is_alpha(config) else SDXL_LATENT,
    sampling=lambda shift: PIXART_SAMPLING,
    default_shift=lambda config: 1.0,
    sampling_note="ModelSamplingDiscrete, eps prediction: betas linear 1e-4 to 0.02 over 1000 steps",
    build_denoiser=_pixart_denoiser,
    velocity=_pixart_velocity,
    conditioning=PixArtConditioning,
    text_encoders="T5-XXL (CLIPLoader, type pixart)",
    conditioning_keys=frozenset({"width", "height"}),
    # Stock PixArt reads neither a pooled output, an attention mask nor a guidance value.
    ignored_keys=frozenset({"pooled_output", "attention_mask", "guidance"}),
    methods=frozenset({"ulysses", "ring", "cfg", "data", "distrifusion", "cache"}),
    resolution_shift=False,
    conditioning_widths=lambda config: {"context": config.caption_channels},
    vae_note="stock VAELoader + VAEDecode (ParallelVAEDecode is not checked against stock on 4-channel VAEs yet)",
)


# --- Wan 2.1 / 2.2 text-to-video ------------------------------------------------------------------

WAN_SHIFT = 8.0  # ComfyUI's WAN21_T2V model config (sampling_settings)
WAN_TIMESTEP_MULTIPLIER = 1000.0


def _wan_read_config(path: str) -> dict:
    from ..loading.wan import read_wan_config

    return read_wan_config(path)


def _wan_load(path: str, dtype, device):
    from ..loading.wan import load_wan_transformer

    return load_wan_transformer(path, dtype=dtype, device=device)


def _wan_denoiser(model, mesh, lse_kernel, dtype):
    from . import wan

    forward = wan.install_sequence_parallel(model, mesh, lse_kernel)
    return wan.WanDenoiser(forward, dtype, patch_size=model.config.patch_size, timestep_multiplier=WAN_TIMESTEP_MULTIPLIER)


def _wan_velocity(denoiser, x, sigma, cond: WanConditioning, controls=()):
    return denoiser(x, sigma, cond.context)


def _wan_sampling(shift: float) -> DiscreteFlowSampling:
    return DiscreteFlowSampling(shift, multiplier=WAN_TIMESTEP_MULTIPLIER)


def _wan_signatures() -> dict[str, tuple[str, ...]]:
    from ..loading.wan import WAN_SIGNATURES

    return WAN_SIGNATURES


WAN = ModelFamily(
    name="wan",
    display_name="Wan 2.1 / 2.2 text-to-video (1.3B, 14B; 2.2 14B: one expert per file)",
    formats="single file (Wan layout, ComfyUI's `model.diffusion_model.` prefix or none; diffusers layout), diffusers folder",
    key_signatures=_wan_signatures(),
    diffusers_class="WanTransformer3DModel",
    read_config=_wan_read_config,
    load=_wan_load,
    # ComfyUI's latent_formats.Wan21: per-channel mean/std of the Wan VAE, scale 1.
    latent=LatentFormat(
        channels=16, scale=1.0, shift=0.0,
        rgb_factors=(
            (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
            (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
            (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
            (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
        ),
        rgb_bias=(-0.1835, -0.0868, -0.3360),
        channel_mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
        channel_std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160),
        dimensions=3,
    ),
    sampling=_wan_sampling,
    default_shift=lambda config: WAN_SHIFT,
    sampling_note="ModelSamplingDiscreteFlow: shift 8.0, timestep = sigma x 1000",
    build_denoiser=_wan_denoiser,
    velocity=_wan_velocity,
    conditioning=WanConditioning,
    text_encoders="umt5-xxl (CLIPLoader, type wan)",
    conditioning_keys=frozenset(),
    # The stock text encoder puts pooled_output None on the conditioning; stock Wan ignores guidance.
    ignored_keys=frozenset({"pooled_output", "guidance"}),
    methods=frozenset({"ulysses", "ring", "cfg", "data", "cache"}),
    resolution_shift=False,
    conditioning_widths=lambda config: {"context": config.text_dim},
    vae_note="the stock VAELoader + VAE Decode nodes (the Wan 3D VAE is not patch-parallel yet; Parallel VAE Decode refuses video latents)",
)


# --- Qwen-Image text-to-image ---------------------------------------------------------------------

QWEN_IMAGE_SHIFT = 1.15  # ComfyUI's QwenImage model config (sampling_settings); a FLUX-type model: ModelSamplingFlux


def _qwen_image_read_config(path: str) -> dict:
    from ..loading.qwen_image import read_qwen_image_config

    return read_qwen_image_config(path)


def _qwen_image_load(path: str, dtype, device):
    from ..loading.qwen_image import load_qwen_image_transformer

    return load_qwen_image_transformer(path, dtype=dtype, device=device)


def _qwen_image_denoiser(model, mesh, lse_kernel, dtype):
    from . import qwen_image

    return qwen_image.QwenImageDenoiser(qwen_image.install_sequence_parallel(model, mesh, lse_kernel), dtype)


def _qwen_image_velocity(denoiser, x, sigma, cond: QwenImageConditioning, controls=()):
    return denoiser(x, sigma, cond.context)


def _qwen_image_signatures() -> dict[str, tuple[str, ...]]:
    from ..loading.qwen_image import QWEN_IMAGE_SIGNATURES

    return QWEN_IMAGE_SIGNATURES


QWEN_IMAGE = ModelFamily(
    name="qwen_image",
    display_name="Qwen-Image text-to-image",
    formats="single file (ComfyUI's, with its `model.diffusion_model.` prefix or none; bf16 or fp8), diffusers folder",
    key_signatures=_qwen_image_signatures(),
    diffusers_class="QwenImageTransformer2DModel",
    read_config=_qwen_image_read_config,
    load=_qwen_image_load,
    # ComfyUI's QwenImage uses latent_formats.Wan21 (the Wan 2.1 VAE): one-frame video latents.
    latent=WAN.latent,
    sampling=FlowSampling,
    default_shift=lambda config: QWEN_IMAGE_SHIFT,
    sampling_note="ModelSamplingFlux: shift 1.15, timestep = sigma",
    build_denoiser=_qwen_image_denoiser,
    velocity=_qwen_image_velocity,
    conditioning=QwenImageConditioning,
    text_encoders="Qwen2.5-VL 7B (CLIPLoader, type qwen_image)",
    conditioning_keys=frozenset(),
    # Stock Qwen-Image passes neither the encoder's pooled output nor its attention mask to its model,
    # and has no guidance input.
    ignored_keys=frozenset({"pooled_output", "attention_mask", "guidance"}),
    methods=frozenset({"ulysses", "ring", "cfg", "data", "cache"}),
    resolution_shift=False,
    conditioning_widths=lambda config: {"context": config.joint_attention_dim},
    vae_note="the stock VAELoader + VAE Decode nodes with the Wan 2.1 VAE (qwen_image_vae.safetensors; "
             "Parallel VAE Decode refuses its 3D VAE)",
    max_frames=1,
)


# --- HunyuanVideo 1.0 text-to-video ---------------------------------------------------------------

HUNYUAN_VIDEO_SHIFT = 7.0  # ComfyUI's HunyuanVideo model config (sampling_settings)
HUNYUAN_VIDEO_TIMESTEP_MULTIPLIER = 1000.0


def _hunyuan_video_read_config(path: str) -> dict:
    from ..loading.hunyuan_video import read_hunyuan_video_config

    return read_hunyuan_video_config(path)


def _hunyuan_video_load(path: str, dtype, device):
    from ..loading.hunyuan_video import load_hunyuan_video_transformer

    return load_hunyuan_video_transformer(path, dtype=dtype, device=device)


def _hunyuan_video_denoiser(model, mesh, lse_kernel, dtype):
    from . import hunyuan_video

    forward = hunyuan_video.install_sequence_parallel(model, mesh, lse_kernel)
    return hunyuan_video.HunyuanVideoDenoiser(forward, dtype, patch_size=(model.config.patch_size_t, model.config.patch_size,
                                                                          model.config.patch_size),
                                              has_guidance=bool(model.config.guidance_embeds),
                                              timestep_multiplier=HUNYUAN_VIDEO_TIMESTEP_MULTIPLIER)


def _hunyuan_video_velocity(denoiser, x, sigma, cond: HunyuanVideoConditioning, controls=()):
    return denoiser(x, sigma, cond.context, cond.pooled, cond.guidance)


def _hunyuan_video_sampling(shift: float) -> DiscreteFlowSampling:
    return DiscreteFlowSampling(shift, multiplier=HUNYUAN_VIDEO_TIMESTEP_MULTIPLIER)


def _hunyuan_video_signatures() -> dict[str, tuple[str, ...]]:
    from ..loading.hunyuan_video import HUNYUAN_VIDEO_SIGNATURES

    return HUNYUAN_VIDEO_SIGNATURES


HUNYUAN_VIDEO = ModelFamily(
    name="hunyuan_video",
    display_name="HunyuanVideo 1.0 text-to-video",
    formats="single file (original HunyuanVideo layout, ComfyUI's `model.diffusion_model.` prefix or none; diffusers layout), diffusers folder",
    key_signatures=_hunyuan_video_signatures(),
    diffusers_class="HunyuanVideoTransformer3DModel",
    read_config=_hunyuan_video_read_config,
    load=_hunyuan_video_load,
    # ComfyUI's latent_formats.HunyuanVideo: scale 0.476986, no shift, 16 channels, 3 latent dimensions.
    latent=LatentFormat(
        channels=16, scale=0.476986, shift=0.0,
        rgb_factors=(
            (-0.0395, -0.0331, 0.0445), (0.0696, 0.0795, 0.0518), (0.0135, -0.0945, -0.0282), (0.0108, -0.0250, -0.0765),
            (-0.0209, 0.0032, 0.0224), (-0.0804, -0.0254, -0.0639), (-0.0991, 0.0271, -0.0669), (-0.0646, -0.0422, -0.0400),
            (-0.0696, -0.0595, -0.0894), (-0.0799, -0.0208, -0.0375), (0.1166, 0.1627, 0.0962), (0.1165, 0.0432, 0.0407),
            (-0.2315, -0.1920, -0.1355), (-0.0270, 0.0401, -0.0821), (-0.0616, -0.0997, -0.0727), (0.0249, -0.0469, -0.1703),
        ),
        rgb_bias=(0.0259, -0.0192, -0.0761),
        dimensions=3,
    ),
    sampling=_hunyuan_video_sampling,
    default_shift=lambda config: HUNYUAN_VIDEO_SHIFT,
    sampling_note="ModelSamplingDiscreteFlow: shift 7.0, timestep = sigma x 1000; distilled guidance (FluxGuidance, default 6.0)",
    build_denoiser=_hunyuan_video_denoiser,
    velocity=_hunyuan_video_velocity,
    conditioning=HunyuanVideoConditioning,
    text_encoders="llava-llama-3-8b + CLIP-L (DualCLIPLoader, type hunyuan_video)",
    # attention_mask: only an all-ones mask is taken (the bridge refuses one that hides tokens).
    conditioning_keys=frozenset({"pooled_output", "guidance", "attention_mask"}),
    ignored_keys=frozenset(),
    methods=frozenset({"ulysses", "ring", "cfg", "data", "cache"}),
    resolution_shift=False,
    conditioning_widths=lambda config: {"context": config.text_embed_dim, "pooled": config.pooled_projection_dim},
    vae_note="the stock VAELoader + VAE Decode nodes (the HunyuanVideo 3D VAE is not patch-parallel yet; Parallel VAE "
             "Decode refuses video latents)",
)


# --- DiT (class-conditional ImageNet DiT-XL-2; no ComfyUI support: diffusers semantics) -------------


def _dit_read_config(path: str) -> dict:
    from ..loading.dit import read_dit_config

    config = read_dit_config(path)
    _dit_scheduler_config(path)  # a folder without a usable scheduler is refused before any weight is read
    return config


def _dit_load(path: str, dtype, device):
    from ..loading.dit import load_dit_transformer

    return load_dit_transformer(path, dtype=dtype, device=device)


def _dit_scheduler_config(path: str) -> dict:
    from ..loading.diffusers_folders import folder_of_weights_file
    from ..loading.dit import DIT_DEFAULT_SCHEDULER
    from ..sampling.diffusers_schedulers import read_scheduler_config

    return read_scheduler_config(folder_of_weights_file(path), "DiT", single_file_default=DIT_DEFAULT_SCHEDULER)


def _dit_denoiser(model, mesh, lse_kernel, dtype):
    from . import dit

    return dit.DiTDenoiser(dit.install_sequence_parallel(model, mesh, lse_kernel), dtype, model.config)


def _dit_model_call(denoiser, x, timestep, cond: DiTConditioning, controls=()):
    return denoiser(x, timestep, cond.class_labels)


def _dit_guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    from .dit import guide

    return guide(cond, uncond, scale, SD15_LATENT.channels)


def _dit_check(request, config) -> None:
    classes = config.num_embeds_ada_norm
    for which, cond in (("positive", request.positive), ("negative", request.negative)):
        labels = cond.class_labels if cond is not None else None
        if labels is not None and (labels.numel() == 0 or labels.min() < 0 or labels.max() > classes):
            raise ValueError(f"the {which} class ids {labels.tolist()} are outside this DiT's 0..{classes - 1} "
                             f"(and {classes}, the null class): pick ImageNet class ids in the Parallel Class Label node")


DIT_PIPELINE = DiffusersPipeline(
    name="DiTPipeline",
    scheduler_config=_dit_scheduler_config,
    guide=_dit_guide,
    # learned sigma: the pipeline passes only the noise prediction (the first 4 channels) to the scheduler
    unguided=lambda out: out[:, :SD15_LATENT.channels],
    check=_dit_check,
)


def _dit_signatures() -> dict[str, tuple[str, ...]]:
    from ..loading.dit import DIT_SIGNATURES

    return DIT_SIGNATURES


DIT = ModelFamily(
    name="dit",
    display_name="DiT-XL-2 (class-conditional ImageNet, 256 / 512 px)",
    formats="diffusers folder (transformer/ + scheduler/); single file in diffusers layout (256 px, default DDIM schedule)",
    key_signatures=_dit_signatures(),
    diffusers_class="DiTTransformer2DModel",
    read_config=_dit_read_config,
    load=_dit_load,
    latent=SD15_LATENT,  # the SD VAE (sd-vae-ft-ema / -mse): 4 channels, scale 0.18215
    sampling=lambda shift: None,  # not ComfyUI sampling: DIT_PIPELINE
    default_shift=lambda config: 1.0,
    sampling_note="diffusers semantics: the folder's scheduler (scheduler/scheduler_config.json) in DiTPipeline's "
                  "loop; class labels from Parallel Class Label",
    build_denoiser=_dit_denoiser,
    velocity=_dit_model_call,
    conditioning=DiTConditioning,
    text_encoders="Parallel Class Label (ImageNet class ids; no text encoder)",
    conditioning_keys=frozenset({"class_label"}),
    # bridge.dit_conditioning reads only the class label and refuses a text encoder's CONDITIONING by name
    ignored_keys=frozenset({"pooled_output"}),
    methods=frozenset({"ulysses", "ring", "cfg", "data", "cache"}),
    resolution_shift=False,
    conditioning_widths=lambda config: {},
    vae_note="the stock VAELoader + VAE Decode nodes with the SD VAE (sd-vae-ft-ema or -mse)",
    semantics="diffusers",
    pipeline=DIT_PIPELINE,
)


# --- CogVideoX text-to-video (no ComfyUI support: diffusers semantics) -------------------------------


def _cogvideox_read_config(path: str) -> dict:
    from ..loading.cogvideox import read_cogvideox_config

    config = read_cogvideox_config(path)
    _cogvideox_scheduler_config(path)  # refused before any weight is read
    return config


def _cogvideox_load(path: str, dtype, device):
    from ..loading.cogvideox import load_cogvideox_transformer

    return load_cogvideox_transformer(path, dtype=dtype, device=device)


def _cogvideox_scheduler_config(path: str) -> dict:
    from ..loading.diffusers_folders import folder_of_weights_file
    from ..sampling.diffusers_schedulers import read_scheduler_config

    return read_scheduler_config(folder_of_weights_file(path), "CogVideoX")


def _cogvideox_denoiser(model, mesh, lse_kernel, dtype):
    from . import cogvideox

    return cogvideox.CogVideoXDenoiser(cogvideox.install_sequence_parallel(model, mesh, lse_kernel), dtype, model.config)


def _cogvideox_model_call(denoiser, x, timestep, cond: CogVideoXConditioning, controls=()):
    return denoiser(x, timestep, cond.context)


def _cogvideox_step(scheduler, output, i, timesteps, x, state, step_kwargs):
    from diffusers import CogVideoXDPMScheduler

    from ..sampling.diffusers_schedulers import scheduler_step

    if not isinstance(scheduler, CogVideoXDPMScheduler):
        return scheduler_step(scheduler, output, i, timesteps, x, state, step_kwargs)
    # CogVideoXPipeline: this DPM step takes the previous x0 prediction and the previous timestep.
    x, old_pred_original = scheduler.step(output, state, timesteps[i], timesteps[i - 1] if i > 0 else None, x,
                                          **step_kwargs, return_dict=False)
    return x, old_pred_original, old_pred_original


def _cogvideox_frame_padding(config, frames: int) -> int:
    from .cogvideox import frame_padding

    return frame_padding(config, frames)


COGVIDEOX_PIPELINE = DiffusersPipeline(
    name="CogVideoXPipeline",
    scheduler_config=_cogvideox_scheduler_config,
    guide=lambda cond, uncond, scale: uncond + scale * (cond - uncond),
    unguided=lambda out: out,
    scale_initial_noise=True,
    # ComfyUI's video LATENT is [B, C, T, H, W]; the pipeline's latents are [B, T, C, H, W]
    to_pipeline=lambda x: x.permute(0, 2, 1, 3, 4),
    from_pipeline=lambda x: x.permute(0, 2, 1, 3, 4),
    step=_cogvideox_step,
    frame_padding=_cogvideox_frame_padding,  # CogVideoX 1.5's latent frames fill whole temporal patches
)


def _cogvideox_latent(scale: float) -> LatentFormat:
    # No published latent -> RGB fit for the CogVideoX VAE: previews are flat grey.
    return LatentFormat(channels=16, scale=scale, shift=0.0, rgb_factors=((0.0, 0.0, 0.0),) * 16,
                        rgb_bias=(0.5, 0.5, 0.5), dimensions=3)


def _cogvideox_signatures() -> dict[str, tuple[str, ...]]:
    from ..loading.cogvideox import COGVIDEOX_SIGNATURES

    return COGVIDEOX_SIGNATURES


COGVIDEOX_5B_LATENT = _cogvideox_latent(0.7)  # the CogVideoX-5b VAE's scaling_factor
COGVIDEOX_2B_LATENT = _cogvideox_latent(1.15258426)  # CogVideoX-2b's

COGVIDEOX = ModelFamily(
    name="cogvideox",
    display_name="CogVideoX 1.0 and 1.5 text-to-video (2b, 5b, 1.5-5b)",
    formats="diffusers folder (transformer/ + scheduler/)",
    key_signatures=_cogvideox_signatures(),
    diffusers_class="CogVideoXTransformer3DModel",
    read_config=_cogvideox_read_config,
    load=_cogvideox_load,
    latent=COGVIDEOX_5B_LATENT,
    # the 5b (rotary) and 2b (sin-cos) VAEs differ in scale; the transformer config tells them apart
    latent_for=lambda config: COGVIDEOX_5B_LATENT if config.get("use_rotary_positional_embeddings") else COGVIDEOX_2B_LATENT,
    sampling=lambda shift: None,  # not ComfyUI sampling: COGVIDEOX_PIPELINE
    default_shift=lambda config: 1.0,
    sampling_note="diffusers semantics: the folder's scheduler (CogVideoXDDIMScheduler / CogVideoXDPMScheduler) in "
                  "CogVideoXPipeline's loop",
    build_denoiser=_cogvideox_denoiser,
    velocity=_cogvideox_model_call,
    conditioning=CogVideoXConditioning,
    text_encoders="T5-XXL (CLIPLoader with t5xxl, e.g. type sd3, then CLIPTextEncode)",
    conditioning_keys=frozenset(),
    ignored_keys=frozenset({"pooled_output", "attention_mask", "guidance"}),
    methods=frozenset({"ulysses", "ring", "cfg", "data", "cache"}),
    resolution_shift=False,
    conditioning_widths=lambda config: {"context": config.text_embed_dim},
    vae_note="Parallel Folder VAE Decode: the folder's own vae/ (AutoencoderKLCogVideoX; core ComfyUI has no "
             "CogVideoX VAE), as CogVideoXPipeline decodes",
    semantics="diffusers",
    pipeline=COGVIDEOX_PIPELINE,
)


# --- Mochi 1 text-to-video (Genmo mochi-1-preview) ------------------------------------------------

MOCHI_SHIFT = 6.0  # ComfyUI's GenmoMochi model config (sampling_settings: shift 6.0, multiplier 1.0)
MOCHI_TIMESTEP_MULTIPLIER = 1.0


def _mochi_read_config(path: str) -> dict:
    from ..loading.mochi import read_mochi_config

    return read_mochi_config(path)


def _mochi_load(path: str, dtype, device):
    from ..loading.mochi import load_mochi_transformer

    return load_mochi_transformer(path, dtype=dtype, device=device)


def _mochi_denoiser(model, mesh, lse_kernel, dtype):
    from . import mochi

    return mochi.MochiDenoiser(mochi.install_sequence_parallel(model, mesh, lse_kernel), dtype, model.config.patch_size)


def _mochi_velocity(denoiser, x, sigma, cond: MochiConditioning, controls=()):
    return denoiser(x, sigma, cond.context)


def _mochi_signatures() -> dict[str, tuple[str, ...]]:
    from ..loading.mochi import MOCHI_SIGNATURES

    return MOCHI_SIGNATURES


MOCHI = ModelFamily(
    name="mochi",
    display_name="Mochi 1 preview text-to-video",
    formats="single file (Genmo layout, ComfyUI's `model.diffusion_model.` prefix or none; diffusers layout), diffusers folder",
    key_signatures=_mochi_signatures(),
    diffusers_class="MochiTransformer3DModel",
    read_config=_mochi_read_config,
    load=_mochi_load,
    # ComfyUI's latent_formats.Mochi: per-channel mean/std of the Mochi VAE, scale 1, 12 channels.
    latent=LatentFormat(
        channels=12, scale=1.0, shift=0.0,
        rgb_factors=(
            (-0.0069, -0.0045, 0.0018), (0.0154, -0.0692, -0.0274), (0.0333, 0.0019, 0.0206), (-0.1390, 0.0628, 0.1678),
            (-0.0725, 0.0134, -0.1898), (0.0074, -0.0270, -0.0209), (-0.0176, -0.0277, -0.0221), (0.5294, 0.5204, 0.3852),
            (-0.0326, -0.0446, -0.0143), (-0.0659, 0.0153, -0.0153), (0.0185, -0.0217, 0.0014), (-0.0396, -0.0495, -0.0281),
        ),
        rgb_bias=(-0.0940, -0.1418, -0.1453),
        channel_mean=(-0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
                      0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
                      -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285),
        channel_std=(0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
                     0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
                     0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041),
        dimensions=3,
    ),
    sampling=lambda shift: DiscreteFlowSampling(shift, multiplier=MOCHI_TIMESTEP_MULTIPLIER),
    default_shift=lambda config: MOCHI_SHIFT,
    sampling_note="ModelSamplingDiscreteFlow: shift 6.0, multiplier 1 (the model embeds (1 - sigma) x 1000)",
    build_denoiser=_mochi_denoiser,
    velocity=_mochi_velocity,
    conditioning=MochiConditioning,
    text_encoders="T5-XXL (CLIPLoader, type mochi)",
    # attention_mask: ComfyUI's padding to 256 tokens, cropped by the bridge (stock Mochi attends to the
    # first sum(mask) tokens); the stock encoder sets pooled_output None; Mochi has no guidance input.
    conditioning_keys=frozenset({"attention_mask"}),
    ignored_keys=frozenset({"pooled_output", "guidance"}),
    methods=frozenset({"ulysses", "ring", "cfg", "data", "cache"}),
    resolution_shift=False,
    conditioning_widths=lambda config: {"context": config.text_embed_dim},
    vae_note="the stock VAELoader + VAE Decode nodes (the Mochi VAE is not patch-parallel yet; Parallel VAE Decode "
             "refuses video latents)",
)


# --- HunyuanDiT v1.0-1.2 text-to-image ---------------------------------------------------------------

# ComfyUI's HunyuanDiT model configs (supported_models.py): v-prediction on a DDPM schedule linear in
# sqrt(beta) from 0.00085; it ends at 0.03 for the models with size and style conditions (v1.0/1.1,
# "hydit1") and at 0.018 for the others (v1.2, "hydit").
HUNYUAN_DIT_SAMPLING = DiscreteSampling("v", beta_schedule="linear", linear_start=0.00085, linear_end=0.018)
HUNYUAN_DIT_1_SAMPLING = DiscreteSampling("v", beta_schedule="linear", linear_start=0.00085, linear_end=0.03)


def _hunyuan_dit_sampling_of(config: dict) -> DiscreteSampling:
    return HUNYUAN_DIT_1_SAMPLING if config.get("use_style_cond_and_image_meta_size", True) else HUNYUAN_DIT_SAMPLING


def _hunyuan_dit_read_config(path: str) -> dict:
    from ..loading.hunyuan_dit import read_hunyuan_dit_config

    return read_hunyuan_dit_config(path)


def _hunyuan_dit_load(path: str, dtype, device):
    from ..loading.hunyuan_dit import load_hunyuan_dit_transformer

    return load_hunyuan_dit_transformer(path, dtype=dtype, device=device)


def _hunyuan_dit_denoiser(model, mesh, lse_kernel, dtype):
    from . import hunyuan_dit

    forward = hunyuan_dit.install_sequence_parallel(model, mesh, lse_kernel)
    return hunyuan_dit.HunyuanDiTDenoiser(forward, dtype, model.config, _hunyuan_dit_sampling_of(dict(model.config)))


def _hunyuan_dit_velocity(denoiser, x, sigma, cond: HunyuanDiTConditioning, controls=()):
    # For HunyuanDiT this is the v prediction; the family's DiscreteSampling("v") turns it into x0.
    return denoiser(x, sigma, cond)


def _hunyuan_dit_signatures() -> dict[str, tuple[str, ...]]:
    from ..loading.hunyuan_dit import HUNYUAN_DIT_SIGNATURES

    return HUNYUAN_DIT_SIGNATURES


HUNYUAN_DIT = ModelFamily(
    name="hunyuan_dit",
    display_name="HunyuanDiT v1.0 / v1.1 / v1.2 text-to-image",
    formats="single file (original HunyuanDiT layout, ComfyUI's `model.diffusion_model.` prefix or none; diffusers layout), diffusers folder",
    key_signatures=_hunyuan_dit_signatures(),
    diffusers_class="HunyuanDiT2DModel",
    read_config=_hunyuan_dit_read_config,
    load=_hunyuan_dit_load,
    latent=SDXL_LATENT,
    sampling=lambda shift: HUNYUAN_DIT_SAMPLING,
    sampling_for=lambda config: (lambda shift: _hunyuan_dit_sampling_of(config)),
    default_shift=lambda config: 1.0,
    sampling_note="ModelSamplingDiscrete, v prediction: betas linear in sqrt from 0.00085 to 0.018 (v1.2) or 0.03 "
                  "(v1.0/1.1, size and style conditions)",
    build_denoiser=_hunyuan_dit_denoiser,
    velocity=_hunyuan_dit_velocity,
    conditioning=HunyuanDiTConditioning,
    text_encoders="HunyuanDiT BERT + mT5-XL (the checkpoint's CLIP, or CLIPLoader type hunyuan_dit)",
    # attention masks: ComfyUI's padding replacement, done exactly; width/height: v1.0/1.1's image meta size
    conditioning_keys=frozenset({"attention_mask", "conditioning_mt5xl", "attention_mask_mt5xl", "width", "height",
                                 "target_width", "target_height"}),
    # Stock HunyuanDiT reads neither the BERT pooled output nor a guidance value.
    ignored_keys=frozenset({"pooled_output", "guidance"}),
    methods=frozenset({"ulysses", "ring", "cfg", "data", "cache"}),
    resolution_shift=False,
    conditioning_widths=lambda config: {"context": config.cross_attention_dim, "context_t5": config.cross_attention_dim_t5},
    vae_note="stock VAELoader + VAEDecode (the SDXL VAE; ParallelVAEDecode is not checked against stock on 4-channel VAEs yet)",
)


# --- ConsisID identity-preserving text-to-video (a CogVideoX-5b derivative; diffusers semantics) -------


def _consisid_read_config(path: str) -> dict:
    from ..loading.consisid import read_consisid_config

    config = read_consisid_config(path)
    _consisid_scheduler_config(path)  # refused before any weight is read
    return config


def _consisid_load(path: str, dtype, device):
    from ..loading.consisid import load_consisid_transformer

    return load_consisid_transformer(path, dtype=dtype, device=device)


def _consisid_scheduler_config(path: str) -> dict:
    from ..loading.diffusers_folders import folder_of_weights_file
    from ..sampling.diffusers_schedulers import read_scheduler_config

    return read_scheduler_config(folder_of_weights_file(path), "ConsisID")


def _consisid_denoiser(model, mesh, lse_kernel, dtype):
    from . import consisid

    return consisid.ConsisIDDenoiser(consisid.install_consisid_sequence_parallel(model, mesh, lse_kernel), dtype, model.config)


def _consisid_model_call(denoiser, x, timestep, cond: ConsisIDConditioning, controls=()):
    return denoiser(x, timestep, cond)


def _consisid_check(request, config) -> None:
    from .consisid import check_request

    check_request(request, config)


def _consisid_prepare(request, generator, batch):
    from .consisid import draw_image_latents

    return draw_image_latents(request, generator, batch)


def _consisid_signatures() -> dict[str, tuple[str, ...]]:
    from ..loading.consisid import CONSISID_SIGNATURES

    return CONSISID_SIGNATURES


CONSISID_PIPELINE = dataclasses.replace(
    COGVIDEOX_PIPELINE,  # the same loop, guidance and DPM step (use_dynamic_cfg off, the pipeline's default)
    name="ConsisIDPipeline",
    scheduler_config=_consisid_scheduler_config,
    check=_consisid_check,
    prepare=_consisid_prepare,
)

CONSISID = ModelFamily(
    name="consisid",
    display_name="ConsisID identity-preserving text-to-video (preview)",
    formats="diffusers folder (transformer/ + scheduler/ + vae/)",
    key_signatures=_consisid_signatures(),
    diffusers_class="ConsisIDTransformer3DModel",
    read_config=_consisid_read_config,
    load=_consisid_load,
    latent=COGVIDEOX_5B_LATENT,  # the CogVideoX-5b VAE
    sampling=lambda shift: None,  # not ComfyUI sampling: CONSISID_PIPELINE
    default_shift=lambda config: 1.0,
    sampling_note="diffusers semantics: the folder's scheduler (CogVideoXDPMScheduler) in ConsisIDPipeline's loop; "
                  "face image and identity embeddings from Parallel ConsisID Identity",
    build_denoiser=_consisid_denoiser,
    velocity=_consisid_model_call,
    conditioning=ConsisIDConditioning,
    text_encoders="T5-XXL (CLIPLoader with t5xxl, e.g. type sd3, then CLIPTextEncode) through Parallel ConsisID Identity",
    conditioning_keys=frozenset({"consisid_identity"}),
    ignored_keys=frozenset({"pooled_output", "attention_mask", "guidance"}),
    methods=frozenset({"ulysses", "ring", "cfg", "data"}),
    resolution_shift=False,
    conditioning_widths=lambda config: {"context": config.text_embed_dim},
    vae_note="Parallel Folder VAE Decode: the folder's own vae/ (AutoencoderKLCogVideoX), as ConsisIDPipeline decodes",
    semantics="diffusers",
    pipeline=CONSISID_PIPELINE,
)


# --- Latte text-to-video (maxin-cn/Latte-1; no ComfyUI support: diffusers semantics) ----------------

LATTE_MAX_TEXT_TOKENS = 120  # LattePipeline's T5 length (encode_prompt's max_length)


def _latte_read_config(path: str) -> dict:
    from ..loading.latte import read_latte_config

    config = read_latte_config(path)
    _latte_scheduler_config(path)  # refused before any weight is read
    return config


def _latte_load(path: str, dtype, device):
    from ..loading.latte import load_latte_transformer

    return load_latte_transformer(path, dtype=dtype, device=device)


def _latte_scheduler_config(path: str) -> dict:
    from ..loading.diffusers_folders import folder_of_weights_file
    from ..sampling.diffusers_schedulers import read_scheduler_config

    return read_scheduler_config(folder_of_weights_file(path), "Latte")


def _latte_denoiser(model, mesh, lse_kernel, dtype):
    from . import latte

    return latte.LatteDenoiser(latte.install_sequence_parallel(model, mesh, lse_kernel), dtype, model.config)


def _latte_model_call(denoiser, x, timestep, cond, controls=()):
    return denoiser(x, timestep, cond.context)


def _latte_check(request, config) -> None:
    for which, cond in (("positive", request.positive), ("negative", request.negative)):
        if cond is not None and cond.context.shape[1] > LATTE_MAX_TEXT_TOKENS:
            raise ValueError(f"the {which} prompt has {cond.context.shape[1]} T5 tokens; Latte takes at most "
                             f"{LATTE_MAX_TEXT_TOKENS} (LattePipeline truncates there): shorten the prompt")


def _latte_step(scheduler, output, i, timesteps, x, state, step_kwargs):
    from ..sampling.diffusers_schedulers import scheduler_step

    # LattePipeline: unless the scheduler reads the learned variance itself, only the noise
    # prediction (the first half of the channels) goes to its step.
    if getattr(scheduler.config, "variance_type", None) not in ("learned", "learned_range"):
        output = output.chunk(2, dim=1)[0]
    return scheduler_step(scheduler, output, i, timesteps, x, state, step_kwargs)


LATTE_PIPELINE = DiffusersPipeline(
    name="LattePipeline",
    scheduler_config=_latte_scheduler_config,
    guide=lambda cond, uncond, scale: uncond + scale * (cond - uncond),
    unguided=lambda out: out,
    scale_initial_noise=True,
    check=_latte_check,
    step=_latte_step,  # the latent layout [B, C, F, H, W] is ComfyUI's already
)


def _latte_signatures() -> dict[str, tuple[str, ...]]:
    from ..loading.latte import LATTE_SIGNATURES

    return LATTE_SIGNATURES


LATTE = ModelFamily(
    name="latte",
    display_name="Latte text-to-video (Latte-1)",
    formats="diffusers folder (transformer/ + scheduler/)",
    key_signatures=_latte_signatures(),
    diffusers_class="LatteTransformer3DModel",
    read_config=_latte_read_config,
    load=_latte_load,
    # the SD VAE, frame by frame: 4 channels, scale 0.18215 (Latte-1's vae/ scaling_factor)
    latent=LatentFormat(channels=4, scale=0.18215, shift=0.0, rgb_factors=SD15_LATENT.rgb_factors,
                        rgb_bias=SD15_LATENT.rgb_bias, dimensions=3),
    sampling=lambda shift: None,  # not ComfyUI sampling: LATTE_PIPELINE
    default_shift=lambda config: 1.0,
    sampling_note="diffusers semantics: the folder's scheduler (DDIMScheduler for Latte-1) in LattePipeline's loop "
                  "(temporal attention on)",
    build_denoiser=_latte_denoiser,
    velocity=_latte_model_call,
    conditioning=LatteConditioning,
    text_encoders="T5-XXL (CLIPLoader with t5xxl, e.g. type sd3, then CLIPTextEncode)",
    # attention_mask: padding cropped by the bridge, as LattePipeline keeps a prompt's real tokens
    conditioning_keys=frozenset({"attention_mask"}),
    ignored_keys=frozenset({"pooled_output", "guidance"}),
    methods=frozenset({"ulysses", "ring", "cfg", "data"}),
    resolution_shift=False,
    conditioning_widths=lambda config: {"context": config.caption_channels},
    vae_note="Parallel Folder VAE Decode: the folder's own vae/ (AutoencoderKL, frame by frame), as LattePipeline decodes",
    semantics="diffusers",
    pipeline=LATTE_PIPELINE,
)


FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (FLUX, SD3, PIXART, WAN, QWEN_IMAGE, HUNYUAN_VIDEO, DIT,
                                                                        COGVIDEOX, MOCHI, HUNYUAN_DIT,
                                                                        CONSISID, LATTE)}


def get(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect(path: str | Path) -> ModelFamily:
    """The family of a checkpoint (single file or diffusers folder), from its headers only."""
    from ..loading.diffusers_folders import folder_of_weights_file

    # A file inside a diffusers folder: its config.json names the class (one shard may lack the signature keys).
    files, config_path = find_weight_files(folder_of_weights_file(path))
    if config_path is not None:
        try:
            class_name = json.loads(Path(config_path).read_text()).get("_class_name")
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{config_path}: unreadable config ({error})") from error
        for family in FAMILIES.values():
            if class_name == family.diffusers_class:
                return family
    with SafetensorsSource(files) as source:
        keys = source.keys()
    matches = [family for family in FAMILIES.values() if family.matches(keys)]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(family.display_name for family in FAMILIES.values())
    if matches:
        raise CheckpointError(f"{path}: holds transformers of several families ({', '.join(f.name for f in matches)}); use a file with one model")
    raise CheckpointError(
        f"{path}: not a checkpoint of a supported model family ({names}): none of their transformer keys were "
        "found. Pick the model's DiT file (a whole SD3 checkpoint or a diffusion model file), not a VAE, text encoder or LoRA"
    )


def markdown_table() -> str:
    """The README's model table, from the registry."""
    lines = [
        "| family | checkpoint formats | sampling | " + " | ".join(METHODS.values()) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in METHODS) + " |",
    ]
    for family in FAMILIES.values():
        marks = " | ".join("yes" if method in family.methods else "-" for method in METHODS)
        lines.append(f"| {family.display_name} | {family.formats} | {family.sampling_note} | {marks} |")
    notes = [f"- {family.display_name}: decode with {family.vae_note}." for family in FAMILIES.values() if family.vae_note]
    return "\n".join(lines + ([""] + notes if notes else []))
