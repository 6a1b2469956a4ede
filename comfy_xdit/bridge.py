"""The one module that turns ComfyUI's objects into engine inputs and back.

It holds the process's only state: the pool registry (one warm pool per device set) and the
memo of VAE fingerprints. ComfyUI modules are imported inside functions, so the engine stays
importable (and testable) without ComfyUI. The entry points the nodes call are ``page_safe``:
their errors reach the page with file names only, never a folder of this machine (page_errors.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import weakref
from dataclasses import dataclass

import torch

from .config import ConfigError, ParallelConfig, default_devices
from .pool import PoolRegistry, WorkerPool
from .models import families
from .page_errors import page_safe
from .pool.backends import LOCAL, Backend
from .requests import (ControlNetRequest, FluxConditioning, HunyuanDiTConditioning, HunyuanVideoConditioning, ModelSpec, PixArtConditioning,
                       SampleRequest, SD3Conditioning, QwenImageConditioning, VaeDecodeRequest, VaeWeights, WanConditioning)

log = logging.getLogger("comfy_xdit")

REGISTRY = PoolRegistry()
_VAE_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
_STATUS_LOCK = threading.Lock()
_LAST_RUN: dict = {}

# Conditioning keys the parallel sampler understands are each family's (models/families.py); any
# other key names a ComfyUI feature it does not implement, which is refused rather than ignored.
CONDITIONING_FEATURES = {
    "area": "ConditioningSetArea",
    "strength": "ConditioningSetAreaStrength",
    "mask": "ConditioningSetMask",
    "start_percent": "ConditioningSetTimestepRange",
    "end_percent": "ConditioningSetTimestepRange",
    "set_area_to_bounds": "ConditioningSetMask",
    "mask_strength": "ConditioningSetMask",
    "control": "a stock ControlNet apply node; apply it with ParallelControlNetApply on the model instead",
    "reference_latents": "ReferenceLatent (Kontext)",
    "attention_mask": "an attention mask",
    "gligen": "GLIGEN",
    "hooks": "hook nodes",
}


@dataclass(frozen=True)
class XditModel:
    """ComfyUI's XDIT_MODEL value: what to load and where, not a live object.

    Cached by ComfyUI across prompts; stays valid after a pool restart, which reloads lazily.
    """

    spec: ModelSpec
    config: ParallelConfig
    loras: tuple[tuple[str, float], ...] = ()
    # Applied ControlNets in order; they hold images, so they take no part in comparisons.
    controlnets: tuple["ControlNetUse", ...] = dataclasses.field(default=(), compare=False)
    backend: Backend = LOCAL  # where the pool's workers run

    def __str__(self) -> str:
        # ComfyUI shows a failed node's inputs as str() in the page: file names only, no folders.
        loras = "".join(f", LoRA {os.path.basename(path)} x{strength:g}" for path, strength in self.loras)
        return (f"XditModel({os.path.basename(self.spec.path)}, {self.spec.family}, {self.config.describe_degrees()} "
                f"on {','.join(self.config.devices)}{loras}, {len(self.controlnets)} ControlNet(s))")

    def with_lora(self, path: str, strength: float) -> "XditModel":
        return dataclasses.replace(self, loras=(*self.loras, (path, float(strength))))

    def with_controlnet(self, use: "ControlNetUse") -> "XditModel":
        return dataclasses.replace(self, controlnets=(*self.controlnets, use))


@dataclass(frozen=True)
class XditControlNet:
    """ParallelControlNetLoader's value: a checked Flux ControlNet file (weights load in the pool)."""

    path: str
    kind: str  # "instantx" or "xlabs"
    needs_vae: bool
    mask_channel: bool
    num_modes: int

    def __str__(self) -> str:
        return f"XditControlNet({os.path.basename(self.path)}, {self.kind})"


@dataclass(frozen=True, eq=False)
class ControlNetUse:
    """One ParallelControlNetApply: what ControlNetApplyAdvanced keeps on the conditioning."""

    controlnet: XditControlNet
    image: torch.Tensor  # stock IMAGE [B, H, W, C] in [0, 1]
    strength: float
    start_percent: float
    end_percent: float
    vae: object | None = None  # stock VAE, for ControlNets that take a VAE-encoded image
    mode: int | None = None  # union control type; None is ComfyUI's "auto"


@page_safe
def open_controlnet(path: str) -> XditControlNet:
    """Check the file's headers (a non-Flux ControlNet is refused by name); no weight is read."""
    from .loading.flux_controlnet import read_controlnet_info

    info = read_controlnet_info(path)
    return XditControlNet(path, info["kind"], info["needs_vae"], info["mask_channel"], info["num_modes"])


def controlnet_hint(use: ControlNetUse, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The control image at this latent's size, as ComfyUI's ControlNet.get_control makes it.

    Resized (nearest-exact, centre crop) to the latent's pixel size; an InstantX ControlNet's is
    then encoded with the stock VAE into Flux's latent space (and given the ones-mask channel of
    the inpainting variant); an XLabs ControlNet takes the pixels.
    """
    import comfy.latent_formats
    import comfy.utils

    height, width = latent_hw
    image = use.image.movedim(-1, 1)
    if use.controlnet.needs_vae:
        if use.vae is None:
            raise ValueError(f"ControlNet {os.path.basename(use.controlnet.path)} takes a VAE-encoded control image: "
                             "connect the Flux VAE (VAELoader) to ParallelControlNetApply's vae input")
        scale = use.vae.spacial_compression_encode()
        hint = comfy.utils.common_upscale(image, width * scale, height * scale, "nearest-exact", "center")
        hint = comfy.latent_formats.Flux().process_in(use.vae.encode(hint.movedim(1, -1)))
        if use.controlnet.mask_channel:
            hint = torch.cat([hint, torch.ones_like(hint[:, :1])], dim=1)
        return hint.float().cpu()
    return comfy.utils.common_upscale(image, width * 8, height * 8, "nearest-exact", "center").float().cpu()


def resolve_devices(devices: str, degrees_product: int) -> tuple[tuple[str, ...], str | None]:
    """The devices for a loader's 'devices' input; returns (devices, note for the log or None).

    'auto' takes the first N visible GPUs the degrees need (two CPU workers without a GPU), and
    falls back to one worker where only one device exists, so a workflow made on a bigger
    machine still runs. An explicit list is used as given.
    """
    if devices.strip().lower() != "auto":
        return tuple(d.strip() for d in devices.split(",") if d.strip()), None
    available = default_devices() if torch.cuda.is_available() else ("cpu",) * max(2, degrees_product)
    if degrees_product <= len(available):
        return tuple(available[:degrees_product]), None
    if len(available) == 1:
        return available, (f"comfy_xdit: the degrees ask for {degrees_product} workers but only one device "
                           f"({available[0]}) is visible; running on one worker")
    raise ConfigError(
        f"the degrees ask for {degrees_product} workers but only {len(available)} devices are visible "
        f"({', '.join(available)}); lower the degrees or set devices"
    )


def make_backend(backend: str, address: str) -> Backend:
    """ParallelLoader's backend and address inputs: Ray's address, or a multi-node pool's HOST:PORT."""
    address = address.strip()
    if backend == "ray":
        return Backend("ray", ray_address=address or "auto")
    if address and address.lower() != "auto":
        from .pool.multinode import Cluster

        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"address {address!r}: the local backend takes HOST:PORT (this machine's address as the "
                              "other nodes reach it, and the rendezvous port), or auto for one machine")
        return Backend("local", cluster=Cluster(host, int(port)))
    return LOCAL


def ray_devices(devices: str, count: int | None, backend: Backend) -> str:
    """'auto' on Ray: one GPU actor per worker when the cluster has GPUs, else CPU actors (count: 0 = all GPUs)."""
    if devices.strip().lower() != "auto":
        return devices
    from .pool.ray_pool import connect

    ray, _ = connect(backend.ray_address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if count is None:
        count = gpus or 2
    return ",".join([f"cuda:{i}" for i in range(count)] if gpus else ["cpu"] * count)


def make_config(*, ulysses_degree: int, ring_degree: int, use_cfg_parallel: bool, data_parallel_degree: int,
                pipefusion_parallel_degree: int, attention_backend: str, devices: str,
                num_pipeline_patches: int | None = None, warmup_steps: int = 1,
                backend: Backend = LOCAL, tensor_parallel_degree: int = 1, distrifusion_degree: int = 1,
                pipefusion_split: str = "auto") -> ParallelConfig:
    others = ring_degree * data_parallel_degree * pipefusion_parallel_degree * (2 if use_cfg_parallel else 1)
    others *= tensor_parallel_degree * distrifusion_degree
    if backend.kind == "ray":  # Ray places the workers: the devices only say how many and of which kind
        devices = ray_devices(devices, None if ulysses_degree == 0 else ulysses_degree * others, backend)
    if ulysses_degree == 0:  # 0: whatever the other degrees leave over of the devices
        count = len(resolve_devices(devices, others)[0]) if devices.strip().lower() != "auto" else None
        if count is None:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 2
        ulysses_degree = max(1, count // others)
    degrees = dict(
        ulysses_degree=ulysses_degree, ring_degree=ring_degree, use_cfg_parallel=use_cfg_parallel,
        data_parallel_degree=data_parallel_degree, pipefusion_parallel_degree=pipefusion_parallel_degree,
        tensor_parallel_degree=tensor_parallel_degree, distrifusion_degree=distrifusion_degree,
    )
    resolved, note = resolve_devices(devices, ulysses_degree * others)
    if note:
        log.warning(note)
        degrees = dict(ulysses_degree=1, ring_degree=1, use_cfg_parallel=False, data_parallel_degree=1,
                       pipefusion_parallel_degree=1, tensor_parallel_degree=1, distrifusion_degree=1)
    return ParallelConfig(attention_backend=attention_backend, devices=resolved, num_pipeline_patches=num_pipeline_patches,
                          warmup_steps=warmup_steps, pipefusion_split=pipefusion_split, **degrees)


def pool_for(config: ParallelConfig, backend: Backend = LOCAL) -> WorkerPool:
    if backend.shares_local_devices:
        _free_comfy_memory_on(config)
    return REGISTRY.get(config, backend)


def _free_comfy_memory_on(config: ParallelConfig) -> None:
    """ComfyUI does not see the pool's memory: let it unload its own models from the pool's GPUs."""
    if config.device_type != "cuda":
        return
    import comfy.model_management as mm

    for name in config.node_devices(0):
        device = torch.device(name)
        free = torch.cuda.mem_get_info(device)[0]
        total = torch.cuda.get_device_properties(device).total_memory
        if free < 0.5 * total:
            mm.free_memory(total, device)


@page_safe
def load(model: XditModel) -> WorkerPool:
    """Start or reuse the pool, have the model (and its LoRAs) checked and loaded; returns the pool.

    Everything that can be refused from the file headers is refused here, before any GPU work.
    """
    from .lora import check_loras

    family = families.get(model.spec.family)
    model_config = family.read_config(model.spec.path)
    model.config.check_model(num_heads=model_config["num_attention_heads"], family=family.display_name)
    if model.loras:
        _check_family_takes_loras(family)
        check_loras(model.loras, model_config)
    if model.controlnets:
        from .loading.flux_controlnet import check_controlnet_fits, read_controlnet_info

        if "controlnet" not in family.methods:
            raise ValueError(f"Parallel ControlNet does not support {family.display_name} models yet; "
                             "remove the ControlNet nodes or use the stock ones with KSampler")

        for use in model.controlnets:
            check_controlnet_fits(use.controlnet.path, model_config)
            heads = read_controlnet_info(use.controlnet.path)["config"]["num_attention_heads"]
            model.config.check_model(num_heads=heads, family="Flux ControlNet")
    pool = pool_for(model.config, model.backend)
    pool.load(model.spec)
    return pool


@page_safe
def detect_family(path: str) -> str:
    """The model family of a checkpoint file or folder, from its headers (refuses other files clearly)."""
    return families.detect(path).name


def _check_family_takes_loras(family: families.ModelFamily) -> None:
    if "lora" not in family.methods:
        raise ValueError(f"Parallel LoRA Loader does not support {family.display_name} models yet; "
                         "remove the LoRA node or use the stock loader and KSampler")


@page_safe
def check_lora(model: XditModel, path: str, strength: float) -> None:
    """Refuse a LoRA that does not fit the model (another architecture, or a family without LoRA support)."""
    from .lora import check_loras

    family = families.get(model.spec.family)
    _check_family_takes_loras(family)
    check_loras([(path, strength)], family.read_config(model.spec.path))


# --- conditioning and latents ----------------------------------------------------------------


def _conditioning_entry(conditioning, which: str, family: families.ModelFamily):
    """The one (tokens, extras) entry of a CONDITIONING, checked for what the family's sampler can use."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{which}: expected CONDITIONING from a text encoder node")
    if len(conditioning) > 1:
        raise ValueError(
            f"{which}: {len(conditioning)} conditioning entries (from Conditioning Combine or similar) are not "
            "supported by ParallelSampler yet; use one text encoder output"
        )
    tensor, extras = conditioning[0]
    unsupported = sorted(set(extras) - family.conditioning_keys - family.ignored_keys)
    if unsupported:
        names = ", ".join(f"'{k}' ({CONDITIONING_FEATURES.get(k, 'unknown feature')})" for k in unsupported)
        raise ValueError(f"{which}: ParallelSampler does not implement conditioning feature(s) {names}; "
                         "remove those nodes or use the stock KSampler")
    pooled = extras.get("pooled_output")
    takes_pooled = "pooled_output" in family.conditioning_keys
    if pooled is None and takes_pooled:
        raise ValueError(f"{which}: the conditioning has no pooled output; {family.display_name} needs the "
                         f"{family.text_encoders} text encoders")
    pooled = pooled if takes_pooled else None  # Wan takes none (its stock encoder sets pooled_output None)
    for name, value in (("text tokens", tensor), ("pooled output", pooled)):
        if value is not None and not torch.isfinite(value).all():
            raise ValueError(f"{which}: the {name} contain NaN or infinity")
    return tensor.float().cpu(), None if pooled is None else pooled.float().cpu(), extras


def flux_conditioning(conditioning, which: str) -> FluxConditioning:
    tokens, pooled, extras = _conditioning_entry(conditioning, which, families.FLUX)
    return FluxConditioning(tokens, pooled, extras.get("guidance"))


def sd3_conditioning(conditioning, which: str) -> SD3Conditioning:
    tokens, pooled, _ = _conditioning_entry(conditioning, which, families.SD3)
    return SD3Conditioning(tokens, pooled)


def pixart_conditioning(conditioning, which: str) -> PixArtConditioning:
    tokens, _, extras = _conditioning_entry(conditioning, which, families.PIXART)
    # CLIPTextEncodePixArtAlpha's resolution micro-condition; ComfyUI uses the latent's size without it.
    size = (float(extras["height"]), float(extras["width"])) if "width" in extras and "height" in extras else None
    return PixArtConditioning(tokens, size)


def wan_conditioning(conditioning, which: str) -> WanConditioning:
    tokens, _, _ = _conditioning_entry(conditioning, which, families.WAN)
    return WanConditioning(tokens)


def qwen_image_conditioning(conditioning, which: str) -> QwenImageConditioning:
    # A prompt with padding carries an attention mask, which stock Qwen-Image does not use either.
    tokens, _, _ = _conditioning_entry(conditioning, which, families.QWEN_IMAGE)
    return QwenImageConditioning(tokens)


def hunyuan_video_conditioning(conditioning, which: str) -> HunyuanVideoConditioning:
    tokens, pooled, extras = _conditioning_entry(conditioning, which, families.HUNYUAN_VIDEO)
    # The stock encoder drops its mask when no token is padded (always, for one prompt). A mask that
    # hides tokens is refused: stock ComfyUI averages the hidden tokens into the token refiner's
    # pooled vector, which diffusers' model does not, so the result would differ.
    mask = extras.get("attention_mask")
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise ValueError(f"{which}: the conditioning's attention mask hides {int((~torch.as_tensor(mask).bool()).sum())} "
                         "padded text tokens, which ParallelSampler does not implement for HunyuanVideo; encode one "
                         "prompt with the stock TextEncodeHunyuanVideo / CLIPTextEncode node (it pads nothing)")
    # ComfyUI's HunyuanVideo uses 6.0 when no FluxGuidance set one.
    return HunyuanVideoConditioning(tokens, pooled, extras.get("guidance", 6.0))


DIT_NULL_CLASS = 1000  # DiT's unconditional class, DiTPipeline's negative


def class_label_conditioning(class_id: int) -> list:
    """The Parallel Class Label node's CONDITIONING: one entry whose extras carry the class id (the
    tensor is a placeholder: ComfyUI's CONDITIONING is a list of [tensor, extras])."""
    return [[torch.zeros(1, 1, 1), {"class_label": int(class_id)}]]


def cogvideox_conditioning(conditioning, which: str):
    from .requests import CogVideoXConditioning

    tokens, _, _ = _conditioning_entry(conditioning, which, families.COGVIDEOX)
    return CogVideoXConditioning(tokens)


CONSISID_IDENTITY = "consisid_identity"  # the CONDITIONING extra Parallel ConsisID Identity adds


def consisid_conditioning(conditioning, which: str):
    from .requests import ConsisIDConditioning

    entries = conditioning if isinstance(conditioning, list) else []
    if len(entries) != 1 or CONSISID_IDENTITY not in entries[0][1]:
        raise ValueError(f"{which}: ConsisID needs the face identity: connect the Parallel ConsisID Identity node's "
                         f"{which} output (the T5 prompt goes into that node)")
    tokens, _, extras = _conditioning_entry(conditioning, which, families.CONSISID)
    return ConsisIDConditioning(tokens, **extras[CONSISID_IDENTITY])


@page_safe
def consisid_identity(model: XditModel, positive, negative, face_image: torch.Tensor, identity_path: str, *,
                      width: int, height: int, length: int, batch_size: int) -> tuple[list, list, dict]:
    """Parallel ConsisID Identity: the prompts with the face identity attached, and the empty video latent.

    The identity file gives id_cond / id_vit_hidden; the face image is encoded with the VAE of the
    model's own diffusers folder (in this process, on ComfyUI's VAE device), as ConsisIDPipeline does."""
    import comfy.model_management

    from .consisid_identity import face_latent_distribution, read_identity_file
    from .folder_vae import load_folder_vae, vae_folder_of

    family = families.get(model.spec.family)
    if family is not families.CONSISID:
        raise ValueError(f"Parallel ConsisID Identity takes a ConsisID model; the loader holds {family.display_name}")
    config = family.read_config(model.spec.path)
    spatial = 8 * config["patch_size"]
    if width % spatial or height % spatial:
        raise ValueError(f"ConsisID takes videos whose sides are multiples of {spatial} px; got {width}x{height}")
    id_cond, id_vit_hidden = read_identity_file(identity_path)
    folder = vae_folder_of(model.spec.path)  # refused by name before any weight is read
    device = comfy.model_management.vae_device()
    dtype = comfy.model_management.vae_dtype(device, [torch.bfloat16, torch.float32])
    vae = load_folder_vae(folder, dtype=dtype, device=device, tiled=False)  # the pipeline encodes untiled
    try:
        mean, std = face_latent_distribution(vae, face_image, height, width)
        scale = float(vae.config.scaling_factor)
    finally:
        del vae
        comfy.model_management.soft_empty_cache()
    identity = {"id_cond": id_cond, "id_vit_hidden": id_vit_hidden, "face_mean": mean, "face_std": std, "face_scale": scale}

    def attach(conditioning, which: str) -> list:
        _conditioning_entry(conditioning, which, families.CONSISID)  # one T5 prompt (other features refused by name)
        return [[tokens, {**extras, CONSISID_IDENTITY: identity}] for tokens, extras in conditioning]

    frames = (length - 1) // 4 + 1  # the CogVideoX VAE's temporal compression, as the pipeline counts
    latent = torch.zeros(batch_size, mean.shape[1], frames, height // 8, width // 8)
    return attach(positive, "positive"), attach(negative, "negative"), {"samples": latent}


def dit_conditioning(conditioning, which: str):
    from .requests import DiTConditioning

    entries = conditioning if isinstance(conditioning, list) else []
    if len(entries) != 1 or "class_label" not in entries[0][1]:
        raise ValueError(f"{which}: DiT is class-conditional: connect the Parallel Class Label node's {which} output "
                         "(not a text encoder's CONDITIONING)")
    return DiTConditioning(torch.tensor([entries[0][1]["class_label"]], dtype=torch.long))


def mochi_conditioning(conditioning, which: str):
    from .requests import MochiConditioning

    tokens, _, extras = _conditioning_entry(conditioning, which, families.MOCHI)
    mask = extras.get("attention_mask")
    if mask is None:  # every token is a prompt token (stock Mochi needs the mask and would fail without it)
        return MochiConditioning(tokens)
    # ComfyUI's Mochi encoder pads T5 to 256 tokens and passes a mask; stock Mochi attends to (and pools)
    # the first sum(mask) tokens only, so cropping the padding away gives the model exactly those.
    mask = torch.as_tensor(mask).bool().cpu()
    count = int(mask.sum())
    if mask.ndim != 2 or mask.shape[0] != 1 or mask.shape[1] != tokens.shape[1] or count == 0 or not mask[0, :count].all():
        raise ValueError(f"{which}: the conditioning's attention mask (shape {list(mask.shape)}, {count} tokens kept) is "
                         "not one prompt's padding at the end; stock Mochi would read it differently. Encode one prompt "
                         "with the stock CLIPTextEncode node and a CLIPLoader of type mochi")
    return MochiConditioning(tokens[:, :count])


def hunyuan_dit_conditioning(conditioning, which: str) -> HunyuanDiTConditioning:
    """ComfyUI's HunyuanDiT CONDITIONING: BERT tokens, their mask and the mT5 tokens and mask in the extras."""
    tokens, _, extras = _conditioning_entry(conditioning, which, families.HUNYUAN_DIT)
    t5 = extras.get("conditioning_mt5xl")
    if t5 is None:
        raise ValueError(f"{which}: the conditioning has no mT5 tokens ('conditioning_mt5xl'); encode the prompt with "
                         f"the HunyuanDiT text encoders ({families.HUNYUAN_DIT.text_encoders})")
    t5 = torch.as_tensor(t5).float().cpu()
    if not torch.isfinite(t5).all():
        raise ValueError(f"{which}: the mT5 tokens contain NaN or infinity")

    def mask_of(key: str, like: torch.Tensor) -> torch.Tensor:
        # Stock ComfyUI needs both masks (its encoders always return them); none means no padding.
        mask = extras.get(key)
        mask = torch.ones(like.shape[:2]) if mask is None else torch.as_tensor(mask).float().cpu()
        if mask.shape[-1] != like.shape[1]:
            raise ValueError(f"{which}: '{key}' covers {mask.shape[-1]} tokens but there are {like.shape[1]}")
        return mask.view(-1, like.shape[1])

    # v1.0/1.1's image meta size: what the conditioning names; the rest follows the latent (models/hunyuan_dit.py).
    size = tuple(float(extras[k]) if extras.get(k) is not None else None
                 for k in ("height", "width", "target_height", "target_width"))
    return HunyuanDiTConditioning(tokens, mask_of("attention_mask", tokens), t5, mask_of("attention_mask_mt5xl", t5), size)


def latte_conditioning(conditioning, which: str):
    """T5 tokens for Latte; padding marked by an attention mask is cropped, as LattePipeline keeps only
    a prompt's real tokens (its ``mask_feature``)."""
    from .requests import LatteConditioning

    tokens, _, extras = _conditioning_entry(conditioning, which, families.LATTE)
    mask = extras.get("attention_mask")
    if mask is None:
        return LatteConditioning(tokens)
    mask = torch.as_tensor(mask).bool().cpu()
    count = int(mask.sum())
    if mask.ndim != 2 or mask.shape[0] != 1 or mask.shape[1] != tokens.shape[1] or count == 0 or not mask[0, :count].all():
        raise ValueError(f"{which}: the conditioning's attention mask (shape {list(mask.shape)}, {count} tokens kept) is "
                         "not one prompt's padding at the end; encode one prompt with the stock CLIPTextEncode node and "
                         "a T5-XXL CLIP")
    return LatteConditioning(tokens[:, :count])


CONDITIONING_READERS = {"flux": flux_conditioning, "sd3": sd3_conditioning, "pixart": pixart_conditioning,
                        "wan": wan_conditioning, "qwen_image": qwen_image_conditioning,
                        "hunyuan_video": hunyuan_video_conditioning, "dit": dit_conditioning,
                        "cogvideox": cogvideox_conditioning, "mochi": mochi_conditioning,
                        "hunyuan_dit": hunyuan_dit_conditioning, "consisid": consisid_conditioning,
                        "latte": latte_conditioning}


def check_latent(latent: dict, family: families.ModelFamily = families.FLUX) -> None:
    if "noise_mask" in latent:
        raise ValueError("the latent has a noise mask (inpainting); ParallelSampler does not implement it yet, "
                         "use the stock KSampler for inpainting")
    samples = latent["samples"]
    # A video model also takes an image latent (one frame), as stock ComfyUI does.
    allowed = (4, 5) if family.latent.dimensions == 3 else (4,)
    if samples.ndim not in allowed:
        kind = "a video latent [B, C, T, H, W] (e.g. EmptyHunyuanLatentVideo)" if family.latent.dimensions == 3 else "an image latent [B, C, H, W]"
        raise ValueError(f"{family.display_name} takes {kind}, got shape {list(samples.shape)}")
    check_frames(samples.shape, family)


def check_frames(shape, family: families.ModelFamily) -> None:
    if family.max_frames is not None and len(shape) == 5 and shape[2] > family.max_frames:
        raise ValueError(f"{family.display_name} makes single images, but the latent has {shape[2]} frames; "
                         "use an image latent (EmptySD3LatentImage)")


# --- jobs ------------------------------------------------------------------------------------


@page_safe
def sample(model: XditModel, *, positive, negative, latent: dict, seed: int, steps: int, cfg: float,
           sampler_name: str, scheduler: str, denoise: float, max_shift: float | None, base_shift: float | None,
           node_id: str | None = None, cache=None) -> dict:
    import comfy.model_management
    import comfy.utils

    family = families.get(model.spec.family)
    check_latent(latent, family)
    if max_shift is not None and not family.resolution_shift:
        raise ValueError(f"the resolution shift (ModelSamplingFlux) does not apply to {family.display_name}; "
                         "set the sampler's shift to 'model default'")
    read = CONDITIONING_READERS[family.name]
    request = SampleRequest(
        latent=latent["samples"].float().cpu(),
        positive=read(positive, "positive"),
        negative=read(negative, "negative") if cfg != 1.0 else None,
        seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
        batch_index=latent.get("batch_index"), max_shift=max_shift, base_shift=base_shift,
        preview_every=1, loras=model.loras, cache=cache,
        controlnets=tuple(
            ControlNetRequest(use.controlnet.path, controlnet_hint(use, tuple(latent["samples"].shape[-2:])),
                              use.strength, use.start_percent, use.end_percent, use.mode)
            for use in model.controlnets
        ),
    )
    pool = load(model)
    progress = comfy.utils.ProgressBar(steps, node_id=node_id)

    def on_step(step: int, total: int, preview) -> None:
        image = _preview_image(preview, family) if preview is not None else None
        progress.update_absolute(step, total, image)
        _publish_progress(pool, step, total)
        # Raising here makes the pool stop every rank after this step before re-raising.
        comfy.model_management.throw_exception_if_processing_interrupted()

    samples = pool.sample(request, on_step=on_step)
    _publish_status()
    out = dict(latent)
    out["samples"] = samples
    return out


def _preview_image(latent: torch.Tensor, family: families.ModelFamily):
    from PIL import Image

    from .preview import latent_to_rgb

    frame = latent[0] if latent.ndim == 4 else latent[0, :, 0]  # a video's first frame
    rgb = latent_to_rgb(frame, family.latent.rgb_factors, family.latent.rgb_bias)
    return ("JPEG", Image.fromarray(rgb.numpy()), 512)


@page_safe
def vae_decode(vae, latent: dict) -> torch.Tensor:
    """Decode with ComfyUI's stock VAE object on the warm pool's workers; returns an IMAGE [B, H, W, 3].

    The decode runs on whichever pool sampled last (its degrees do not matter: the image rows are
    split over all its workers), or on a default pool when none is running.
    """
    from .vae import decoder_state_dict, infer_vae_config, state_dict_fingerprint

    samples = latent["samples"]
    if samples.ndim != 4:
        raise ValueError(f"Parallel VAE Decode decodes image latents [B, C, H, W], got shape {list(samples.shape)}: "
                         "for a video latent use the stock VAE Decode node (Wan, HunyuanVideo) or Parallel Folder VAE "
                         "Decode (CogVideoX, ConsisID, Latte)")
    module = vae.first_stage_model
    fingerprint = _VAE_FINGERPRINTS.get(module)
    state = None
    if fingerprint is None:
        state = {k: v.detach().cpu() for k, v in decoder_state_dict(module.state_dict()).items()}
        config = infer_vae_config(state)
        fingerprint = _VAE_FINGERPRINTS[module] = state_dict_fingerprint(state)
        channels = config.latent_channels
    else:
        channels = samples.shape[1]
    if samples.ndim != 4 or samples.shape[1] != channels:
        raise ValueError(f"this VAE decodes latents with {channels} channels, got shape {list(samples.shape)}")
    pool = REGISTRY.latest() or pool_for(make_config(
        ulysses_degree=0, ring_degree=1, use_cfg_parallel=False, data_parallel_degree=1,
        pipefusion_parallel_degree=1, attention_backend="auto", devices="auto"))
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(vae.vae_dtype, "float32")
    if not pool.has_vae(fingerprint):
        if state is None:
            state = {k: v.detach().cpu() for k, v in decoder_state_dict(module.state_dict()).items()}
        pool.load_vae(VaeWeights(fingerprint, state, dtype))
    return pool.decode(VaeDecodeRequest(fingerprint, samples.float().cpu()))


@page_safe
def folder_vae_decode(model: XditModel, latent: dict, tiled: bool = True) -> torch.Tensor:
    """Decode a video LATENT with the VAE of the model's own diffusers folder (CogVideoX, ConsisID, Latte), in this
    process on ComfyUI's VAE device and dtype; returns IMAGE frames [B x F, H, W, 3]."""
    import comfy.model_management

    from .folder_vae import decode_video_latent, load_folder_vae, vae_folder_of

    family = families.get(model.spec.family)
    samples = latent["samples"]
    if family.semantics != "diffusers" or samples.ndim != 5:
        raise ValueError(f"Parallel Folder VAE Decode decodes the video latents of models loaded from a diffusers folder "
                         f"(CogVideoX, ConsisID, Latte); for {family.display_name} (latent {list(samples.shape)}) use the stock VAE Decode")
    folder = vae_folder_of(model.spec.path)  # refused by name before any weight is read
    model_space = family.latent_format(family.read_config(model.spec.path)).to_model_space(samples.float().cpu())
    device = comfy.model_management.vae_device()
    dtype = comfy.model_management.vae_dtype(device, [torch.bfloat16, torch.float32])
    vae = load_folder_vae(folder, dtype=dtype, device=device, tiled=tiled)
    try:
        return decode_video_latent(vae, model_space)
    finally:
        del vae
        comfy.model_management.soft_empty_cache()


# --- status ----------------------------------------------------------------------------------


def status() -> dict:
    """What the status route and panel show: pools, workers, devices, memory, model, last job."""
    pools = REGISTRY.status()
    for pool in pools:
        for worker in pool.get("workers", []):
            worker.pop("log", None)  # no file paths leave the server
        pool.pop("log_dir", None)
        model = pool.get("model")
        if model:
            model["path"] = os.path.basename(model["path"])
    with _STATUS_LOCK:
        last = dict(_LAST_RUN)
    return {"pools": pools, "last_run": last}


def _publish_progress(pool: WorkerPool, step: int, total: int) -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_sync("comfy_xdit.progress", {"step": step, "total": total,
                                                                "devices": list(pool.config.devices)})
    except Exception:  # a progress message must never fail a job
        pass


def _publish_status() -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_sync("comfy_xdit.status", status())
    except Exception:
        pass
