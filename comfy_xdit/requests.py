"""Plain data that crosses from the host to the workers: which model, and what to generate.

Everything here is picklable and free of process groups, so the pool can ship it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .caching.settings import CacheSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """What to load; two equal specs mean the loaded model can be reused as it is."""

    path: str
    family: str = "flux"
    dtype: str = "bfloat16"
    # torch.compile the model's repeated blocks (diffusers' regional compile). Part of the spec
    # because switching it rebuilds the model; the first job of each shape pays the compile.
    compile: bool = False
    # Replay each step's forward as a captured CUDA graph (GPU workers only; ignored on CPU):
    # removes the host's kernel-launch time, which dominates a step sharded over several GPUs.
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class FluxConditioning:
    """One prompt's conditioning in ComfyUI's Flux layout.

    context: T5 tokens [B or 1, T, 4096]; pooled: CLIP-L pooled output [B or 1, 768];
    guidance: the distilled guidance of Flux-dev (ignored by models without a guidance embedder).
    """

    context: torch.Tensor
    pooled: torch.Tensor
    guidance: float | None = 3.5


@dataclass(eq=False)
class ControlNetRequest:
    """One applied ControlNet, by file: the pool keeps its weights loaded across jobs.

    hint: what the bridge made from the control image at this job's latent size, as ComfyUI's
    ControlNet does: the processed control latent [B, 16 (+1 mask), h, w] for InstantX files,
    pixels [B, 3, 8h, 8w] in [0, 1] for XLabs files. start/end_percent: ComfyUI's percents of
    the schedule, turned into a sigma range with the job's shift. mode: a union ControlNet's
    control type (None: no mode token, ComfyUI's "auto").
    """

    path: str
    hint: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    mode: int | None = None


@dataclass
class SD3Conditioning:
    """One prompt's conditioning in ComfyUI's SD3 / SD3.5 layout.

    context: CLIP-L/G tokens (padded to 4096 wide) followed by T5 tokens [B or 1, T, 4096]
    (77 + 256 = 333 for the stock encoders, any length works); pooled: CLIP-L + CLIP-G pooled
    outputs [B or 1, 2048].
    """

    context: torch.Tensor
    pooled: torch.Tensor


@dataclass
class PixArtConditioning:
    """One prompt's conditioning in ComfyUI's PixArt layout (CLIPLoader type pixart: T5-XXL).

    context: T5 tokens [B or 1, T, 4096] (no pooled output, no attention mask: ComfyUI's PixArt
    attends to every token it is given); size: (height, width) in pixels for PixArt-alpha's
    micro-conditions, from CLIPTextEncodePixArtAlpha (None: the latent's size, as in ComfyUI).
    """

    context: torch.Tensor
    size: tuple[float, float] | None = None


@dataclass
class WanConditioning:
    """One prompt's conditioning in ComfyUI's Wan 2.1 / 2.2 layout.

    context: umt5-xxl tokens [B or 1, T, 4096] (512 for the stock encoder, any length works).
    Wan takes no pooled vector; ``pooled`` is always None (the field keeps the families' shape).
    """

    context: torch.Tensor
    pooled: None = None


@dataclass
class QwenImageConditioning:
    """One prompt's conditioning in ComfyUI's Qwen-Image layout (CLIPLoader type qwen_image).

    context: Qwen2.5-VL-7B hidden states of the prompt's tokens (the chat template stripped, as
    ComfyUI's encoder does) [B or 1, T, 3584]. No pooled vector and no attention mask: ComfyUI's
    Qwen-Image model attends to every token it is given.
    """

    context: torch.Tensor
    pooled: None = None


@dataclass
class HunyuanVideoConditioning:
    """One prompt's conditioning in ComfyUI's HunyuanVideo 1.0 layout (DualCLIPLoader type hunyuan_video).

    context: llava-llama-3-8b hidden states of the prompt's tokens (the template stripped, as
    ComfyUI's encoder does) [B or 1, T, 4096]; pooled: CLIP-L pooled output [B or 1, 768];
    guidance: the distilled guidance (FluxGuidance; ComfyUI's default is 6.0). Every text token
    is attended (a conditioning whose attention mask hides tokens is refused by the bridge).
    """

    context: torch.Tensor
    pooled: torch.Tensor
    guidance: float | None = 6.0


@dataclass
class CogVideoXConditioning:
    """One prompt's conditioning for CogVideoX: T5-XXL hidden states [B or 1, T, 4096] from stock
    CLIPTextEncode with a T5 CLIP (CogVideoX-2b: exactly 226 tokens; 5b: any length)."""

    context: torch.Tensor
    pooled: None = None


@dataclass(eq=False)
class ConsisIDConditioning:
    """One prompt's conditioning for ConsisID (the Parallel ConsisID Identity node's outputs).

    context: T5-XXL hidden states [B or 1, T, 4096]; id_cond: the face embedding [1, 1280] and
    id_vit_hidden: the EVA-CLIP hidden states, their scales stacked [1, 5, 577, 1024] (diffusers'
    ``process_face_embeddings_infer``); face_mean / face_std: the face image's VAE posterior
    [1 or B, 16, 1, h, w] and face_scale the VAE's scaling factor. image_latents (pipeline layout
    [B, T, C, h, w]: the face's latent sample, then zero frames) is drawn by the sampler from the
    job's generator before the noise, as ConsisIDPipeline.prepare_latents does.
    """

    context: torch.Tensor
    id_cond: torch.Tensor
    id_vit_hidden: torch.Tensor
    face_mean: torch.Tensor
    face_std: torch.Tensor
    face_scale: float
    image_latents: torch.Tensor | None = None
    pooled: None = None


@dataclass
class DiTConditioning:
    """Class conditioning of DiT (the Parallel Class Label node): ImageNet class ids [B or 1], long;
    the negative is DiT's null class 1000, as in diffusers' DiTPipeline."""

    class_labels: torch.Tensor


@dataclass
class MochiConditioning:
    """One prompt's conditioning for Mochi 1 (CLIPLoader type mochi with t5xxl): T5-XXL hidden states
    of the prompt's real tokens [B or 1, T, 4096]; the bridge crops ComfyUI's padding to 256 tokens
    (stock Mochi attends to the first sum(attention_mask) tokens only), so every token is attended."""

    context: torch.Tensor
    pooled: None = None


@dataclass
class HunyuanDiTConditioning:
    """One prompt's conditioning in ComfyUI's HunyuanDiT layout (CLIPLoader / checkpoint type hydit).

    context: BERT (chinese-roberta) tokens [B or 1, 77, 1024]; mask: their attention mask [B or 1, 77]
    (1 kept, 0 replaced by the model's learned padding, as ComfyUI does); context_t5 / mask_t5: the
    mT5-XL tokens [B or 1, 256, 2048] and mask ("conditioning_mt5xl", "attention_mask_mt5xl");
    size: v1.0/1.1's size condition (height, width, target height, target width) in pixels from the
    conditioning's extras; a None is the latent's pixel size (target: the size), as ComfyUI's sampler
    fills in what the conditioning does not name. The crop coordinates are 0, as in ComfyUI.
    """

    context: torch.Tensor
    mask: torch.Tensor
    context_t5: torch.Tensor
    mask_t5: torch.Tensor
    size: tuple[float | None, float | None, float | None, float | None] = (None, None, None, None)
    pooled: None = None  # HunyuanDiT pools the mT5 tokens itself


@dataclass
class LatteConditioning:
    """One prompt's conditioning for Latte: T5-XXL hidden states of the prompt's tokens [B or 1, T, 4096],
    T at most 120 (LattePipeline's T5 length); the bridge crops padding marked by an attention mask,
    as the pipeline keeps only a prompt's real tokens (``mask_feature``)."""

    context: torch.Tensor
    pooled: None = None


@dataclass
class SampleRequest:
    """One KSampler-equivalent call. Latents are ComfyUI's raw VAE latents [B, 16, H/8, W/8]
    (video families: [B, 16, T, H/8, W/8])."""

    latent: torch.Tensor
    # the loaded model family's type
    positive: (FluxConditioning | SD3Conditioning | PixArtConditioning | WanConditioning | QwenImageConditioning
               | HunyuanVideoConditioning)
    negative: (FluxConditioning | SD3Conditioning | PixArtConditioning | WanConditioning | QwenImageConditioning
               | HunyuanVideoConditioning | None)
    seed: int
    steps: int
    cfg: float = 1.0
    sampler_name: str = "euler"
    scheduler: str = "simple"
    denoise: float = 1.0
    batch_index: list[int] | None = None
    # ModelSamplingFlux's resolution-dependent shift; None keeps the model's constant default.
    max_shift: float | None = None
    base_shift: float | None = None
    preview_every: int = 0  # 0: no per-step previews
    # LoRAs to have applied for this job, in order: (safetensors path, strength). They travel
    # with the request, not the ModelSpec, so a new strength never reloads the base model.
    loras: tuple[tuple[str, float], ...] = ()
    # ControlNets for this job, in the order they were applied (for positive and negative alike,
    # as ComfyUI's ControlNetApplyAdvanced does).
    controlnets: tuple[ControlNetRequest, ...] = ()
    # First-Block-Cache, TeaCache (CacheSettings) or DiTFastAttn (fastattn.settings.FastAttnSettings)
    # for this job (None: every step runs the whole model).
    cache: CacheSettings | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class VaeDecodeRequest:
    """Decode raw VAE latents [B, C, h, w] with the VAE whose decoder weights have this fingerprint."""

    fingerprint: str
    latent: torch.Tensor


@dataclass
class VaeWeights:
    """A VAE's decoder weights, sent to the workers once and kept under their fingerprint."""

    fingerprint: str
    state_dict: dict[str, torch.Tensor]
    dtype: str = "float32"


class StepHooks(Protocol):
    """What the sampler tells its caller after each step, and asks it before the next."""

    def on_step(self, step: int, total: int, preview: torch.Tensor | None) -> None: ...

    def cancel_requested(self) -> bool: ...


class NoHooks:
    def on_step(self, step: int, total: int, preview: torch.Tensor | None) -> None:
        pass

    def cancel_requested(self) -> bool:
        return False


class SamplingCancelled(RuntimeError):
    """Raised on every rank at the same step when a cancel was requested."""

    def __init__(self, step: int):
        super().__init__(f"sampling cancelled after step {step}")
        self.step = step
