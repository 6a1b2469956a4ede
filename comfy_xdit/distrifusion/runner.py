"""The family's denoiser on a DistriFusion mesh: the same model call, image tokens split into patches.

Every rank holds the whole model and runs the same ComfyUI sampler (so samplers, noise and CFG
stay exact). A model evaluation splits the image tokens over the distrifusion group exactly as
sequence parallelism does (the family's sequence plan, padded at the end to divide), routes each
self-attention layer through its own DisplacedPatchAttention, and gathers the patches' outputs
back, so every rank steps the whole latent.

Warmup: an evaluation is synchronous (exact) while fewer than ``warmup_steps`` sampler steps have
completed, and for the first evaluation of each conditioning branch in a job, which has no stale
K/V yet. Sampler steps are counted by the sampler's per-step callback, as for PipeFusion, so a
step of a two-evaluation sampler counts once. Each branch keeps its own K/V state, keyed by the
conditioning's text tensor (the sampler passes the same one at every evaluation of a branch);
start_job forgets it all.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..pipefusion.runner import StepCounter
from .attention import DisplacedPatchAttention, ExchangeMode

MESH_DIM = "distrifusion"


def _route_flux(model, mesh, make_attention):
    from ..models.flux import FLUX_SEQUENCE_PLAN, ParallelFluxAttnProcessor
    from ..models.sharding import SequenceShardedForward

    # Every joint attention (double and single blocks) mixes image tokens.
    model.set_attn_processor({name: ParallelFluxAttnProcessor(make_attention()) for name in model.attn_processors})
    return SequenceShardedForward(model, FLUX_SEQUENCE_PLAN, mesh, split_over=MESH_DIM)


def _route_pixart(model, mesh, make_attention):
    from ..models.module_sharding import ModuleShardedForward
    from ..models.pixart import PIXART_SEQUENCE_PLAN, LocalCrossAttnProcessor, ParallelSelfAttnProcessor

    # Only the self-attention mixes image tokens; the cross-attention to the (replicated) text is local.
    model.set_attn_processor({
        name: ParallelSelfAttnProcessor(make_attention()) if ".attn1." in name else LocalCrossAttnProcessor()
        for name in model.attn_processors
    })
    return ModuleShardedForward(model, PIXART_SEQUENCE_PLAN, mesh, split_over=MESH_DIM)


# family name -> (model, mesh, attention factory) -> the patch-split forward of the family's denoiser
ROUTES = {"flux": _route_flux, "pixart": _route_pixart}


class DistriFusionDenoiser:
    """Wraps the family's single-worker denoiser; called exactly like it."""

    def __init__(self, family, model: torch.nn.Module, mesh, dtype: torch.dtype):
        if family.name not in ROUTES:
            raise ConfigError(f"DistriFusion is not supported for {family.display_name} models yet; "
                              "set distrifusion_degree to 1")
        self.warmup_steps = mesh.config.warmup_steps
        self.mode = ExchangeMode()
        self.attentions: list[DisplacedPatchAttention] = []
        group = mesh.group(MESH_DIM)

        def make_attention() -> DisplacedPatchAttention:
            attention = DisplacedPatchAttention(self.mode, group)
            self.attentions.append(attention)
            return attention

        # The family's own denoiser on one worker (positional embeddings, conditioning, output
        # layout), then its attention and forward swapped for the patch-parallel ones.
        # (The config refuses sequence/tensor/pipeline degrees beside DistriFusion, so on this mesh
        # that denoiser splits nothing by itself.)
        self.inner = family.build_denoiser(model, mesh, None, dtype)
        self.inner.forward = ROUTES[family.name](model, mesh, make_attention)
        self.dtype = dtype
        self.start_job()

    def start_job(self) -> None:
        """Forget the previous job's K/V state and step count."""
        for attention in self.attentions:
            attention.clear()
        self.completed_steps = 0
        self._filled: set[int] = set()

    def count_steps(self, hooks) -> StepCounter:
        return StepCounter(hooks, self)

    @property
    def exchange(self) -> bool:
        return self.mode.exchange

    @exchange.setter
    def exchange(self, on: bool) -> None:
        """Diagnostic switch: False attends only to each patch's own image tokens after warmup."""
        self.mode.exchange = on

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        branch = id(context)
        self.mode.branch = branch
        self.mode.synchronous = self.completed_steps < self.warmup_steps or branch not in self._filled
        out = self.inner(x, sigma, context, *args, **kwargs)
        self._filled.add(branch)
        return out

