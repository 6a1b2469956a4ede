"""ConsisID adapter: diffusers' ConsisIDTransformer3DModel, sampled with ConsisIDPipeline's loop.

ConsisID is CogVideoX-5b's transformer (joint text + video attention, 3-D rotary) with 32 input
channels (the noisy latent and the face image's latent, concatenated per frame) and identity
inputs: a local facial extractor turns the face embedding (``id_cond``) and the EVA-CLIP hidden
states (``id_vit_hidden``) into a few identity tokens, and after every ``cross_attn_interval``-th
block a perceiver cross-attention adds, to each video token, its attention over those identity
tokens. That cross-attention is per video token (its LayerNorms, queries and softmax see one
token; keys and values come from the identity tokens only), so it runs unchanged on a rank's shard
of the video tokens: no communication. The extractor's input is replicated on every rank.

So CogVideoX's plan applies as it is (models/cogvideox.py): video tokens split at the first block
with their rotary rows, gathered after ``proj_out``, joint attention through USP. ConsisID's blocks
pass no attention kwargs down, so the processors read the layout from the sharded forward.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from ..requests import ConsisIDConditioning, SampleRequest
from .cogvideox import VAE_SPATIAL, CogVideoXDenoiser, ParallelCogVideoXAttnProcessor, install_sequence_parallel
from .module_sharding import ModuleSequencePlan, ModuleShardedForward

CONSISID_SEQUENCE_PLAN = ModuleSequencePlan(
    split_output_of=None,  # the first block's hidden_states keyword (cogvideox.install_sequence_parallel)
    gather_output_of="proj_out",
    attention_kwargs_name=None,  # ConsisIDBlock calls its attention without attention kwargs
)


class ParallelConsisIDAttnProcessor(ParallelCogVideoXAttnProcessor):
    """CogVideoX's parallel joint attention, with the layout of the sharded forward in progress."""

    def __init__(self, attention, forward: ModuleShardedForward):
        super().__init__(attention)
        self.forward = forward

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                layout=self.forward.current_layout())


def install_consisid_sequence_parallel(model: torch.nn.Module, mesh, lse_kernel) -> ModuleShardedForward:
    return install_sequence_parallel(model, mesh, lse_kernel, CONSISID_SEQUENCE_PLAN, ParallelConsisIDAttnProcessor)


def consisid_rotary_tables(model, frames: int, height: int, width: int, device):
    """ConsisIDPipeline's own 3-D rotary tables for a latent of ``frames`` x ``height`` x ``width``."""
    if not model.config.use_rotary_positional_embeddings:
        return None
    # from its module: diffusers' top-level name is a dummy without opencv, which only the keypoint drawing needs
    from diffusers.pipelines.consisid.pipeline_consisid import ConsisIDPipeline

    pipeline_view = SimpleNamespace(vae_scale_factor_spatial=VAE_SPATIAL, transformer=model)
    return ConsisIDPipeline._prepare_rotary_positional_embeddings(
        pipeline_view, height * VAE_SPATIAL, width * VAE_SPATIAL, frames, device)


class ConsisIDDenoiser(CogVideoXDenoiser):
    """ConsisID's noise (v) prediction for pipeline-layout latents x [b, T, C, H, W], a scheduler
    timestep and a ConsisIDConditioning whose image latents the sampler has drawn."""

    def _rotary_tables(self, frames: int, height: int, width: int, device):
        return consisid_rotary_tables(self.forward.model, frames, height, width, device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, cond: ConsisIDConditioning) -> torch.Tensor:
        if cond.image_latents is None:
            raise RuntimeError("ConsisID was called without its face image latents (the sampler's prepare step draws them)")
        device = x.device
        image = cond.image_latents.to(device, x.dtype)
        # ConsisIDPipeline: torch.cat([latent_model_input, latent_image_input], dim=2)
        inputs = self.model_inputs(torch.cat([x, image.expand(x.shape[0], *image.shape[1:])], dim=2), timestep, cond.context)
        if self.config.is_train_face:
            inputs["id_cond"] = cond.id_cond.to(device, self.dtype)
            inputs["id_vit_hidden"] = list(cond.id_vit_hidden.to(device, self.dtype).unbind(1))
        return self.forward(**inputs).float()


def draw_image_latents(request: SampleRequest, generator: torch.Generator, batch: int) -> SampleRequest:
    """ConsisIDPipeline.prepare_latents before its noise: one sample of the face image's VAE posterior
    per video (``latent_dist.sample(generator)``, in batch order), times the VAE's scaling factor, as
    the first latent frame, then zero frames; set on both branches (the pipeline's identity and
    image latents are the same for the conditional and the unconditional call)."""
    positive = request.positive
    frames = request.latent.shape[2] if request.latent.ndim == 5 else 1
    rows = []
    for row in range(batch):
        pick = row if positive.face_mean.shape[0] > 1 else 0
        mean, std = positive.face_mean[pick:pick + 1].float(), positive.face_std[pick:pick + 1].float()
        rows.append(mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype))
    first = (positive.face_scale * torch.cat(rows)).permute(0, 2, 1, 3, 4)  # [B, 1, C, h, w]
    padding = first.new_zeros(batch, frames - 1, *first.shape[2:])
    image_latents = torch.cat([first, padding], dim=1)

    def with_image(cond):
        return None if cond is None else dataclasses.replace(cond, image_latents=image_latents)

    return dataclasses.replace(request, positive=with_image(request.positive), negative=with_image(request.negative))


IDENTITY_FIELDS = ("id_cond", "id_vit_hidden", "face_mean", "face_std")


def check_request(request: SampleRequest, config) -> None:
    """Refuse identity inputs this model cannot take, before any work, naming what to change."""
    positive, negative = request.positive, request.negative
    latent = request.latent
    if latent.ndim != 5:
        raise ValueError(f"ConsisID makes videos: use the Parallel ConsisID Identity node's latent [B, 16, T, h, w], "
                         f"got shape {list(latent.shape)}")
    batch, _, _, h, w = latent.shape
    channels = config.in_channels // 2
    mean = positive.face_mean
    if mean.ndim != 5 or mean.shape[1] != channels or mean.shape[2] != 1 or tuple(mean.shape[-2:]) != (h, w):
        raise ValueError(f"the face image latent is {list(mean.shape)} but this ConsisID takes [1, {channels}, 1, {h}, {w}] "
                         "for this video latent: make the latent and the face latent with one Parallel ConsisID Identity "
                         "node (same width and height)")
    if mean.shape[0] not in (1, batch):
        raise ValueError(f"{mean.shape[0]} face images for a batch of {batch} videos: give one face image, or one per video")
    if config.is_train_face:
        scales, vit, ids = config.LFE_num_scale, config.LFE_vit_dim, config.LFE_id_dim
        if positive.id_cond.ndim != 2 or positive.id_cond.shape[-1] != ids:
            raise ValueError(f"the identity file's id_cond is {list(positive.id_cond.shape)} but this ConsisID takes "
                             f"[1, {ids}] (the face embedding of process_face_embeddings_infer)")
        hidden = positive.id_vit_hidden
        if hidden.ndim != 4 or hidden.shape[1] != scales or hidden.shape[-1] != vit:
            raise ValueError(f"the identity file's id_vit_hidden holds {hidden.shape[1] if hidden.ndim == 4 else '?'} "
                             f"hidden states {list(hidden.shape[2:])} but this ConsisID takes {scales} of [1, tokens, {vit}] "
                             "(the EVA-CLIP hidden states of process_face_embeddings_infer)")
    if negative is not None and not all(torch.equal(getattr(positive, f), getattr(negative, f)) for f in IDENTITY_FIELDS):
        raise ValueError("the positive and negative conditionings carry different identities; ConsisIDPipeline uses one "
                         "face for both: take both from the same Parallel ConsisID Identity node")
