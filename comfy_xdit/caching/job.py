"""One sampling job's step cache: hooks in for the job, a cache state per branch, the skip record.

A branch is one conditioning the sampler calls the model with (positive, negative): with one
worker both are called every step and each keeps its own cache; with cfg parallel each cfg rank
only ever calls one of them. Branches are told apart by the conditioning object the sampler
passes (the same object every step of a job) and named in the order they first appear, so
"branch0" is the positive on one worker and each cfg rank's own branch under cfg parallel.

The step of a call comes from its sigma and the job's schedule: step i covers sigmas in
(sigmas[i+1], sigmas[i]], so samplers with several model calls per step (heun, dpm_2) give all
of them the same step index.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.hooks.hooks import CacheContext

from . import hooks
from .decision import ReducedRelativeL1
from .families import FAMILY_CACHES, NO_CACHE_BECAUSE, layout_reader
from .settings import DEFAULT_THRESHOLDS, FBCACHE, CacheSettings


class CacheJob:
    def __init__(self, model: torch.nn.Module, settings: CacheSettings, metric: ReducedRelativeL1, sigmas: torch.Tensor,
                 threshold: float, layout_of=lambda arguments: None, teacache=None):
        self.model, self.settings, self.metric = model, settings, metric
        self.sigmas = [float(s) for s in sigmas]
        self.steps = len(self.sigmas) - 1
        self.threshold, self.layout_of, self.teacache = threshold, layout_of, teacache
        self.record: list[hooks.CacheDecision] = []
        self._branches: dict[int, tuple[object, str]] = {}
        self._state_manager = None  # set while the hooks are in

    def __enter__(self) -> "CacheJob":
        self._state_manager = hooks.install(self.model, self.settings, self.threshold, self.metric, self.record,
                                            self.layout_of, self.teacache)
        return self

    def __exit__(self, *exc) -> None:
        hooks.remove(self.model)

    def step_of(self, sigma) -> int:
        sigma = float(sigma)
        # A small tolerance: a sampler may hand back a schedule sigma through float arithmetic.
        step = sum(1 for s in self.sigmas[1:] if s >= sigma - 1e-7)
        return min(step, self.steps - 1)

    def branch_of(self, conditioning) -> str:
        key = id(conditioning)
        if key not in self._branches:  # keep the object so its id is not reused within the job
            self._branches[key] = (conditioning, f"branch{len(self._branches)}")
        return self._branches[key][1]

    @contextlib.contextmanager
    def call(self, conditioning, sigma):
        """Around one model call: selects the branch's cache state and tells the hooks the step."""
        self._state_manager.set_context(CacheContext(self.branch_of(conditioning), step_index=self.step_of(sigma),
                                                     num_inference_steps=self.steps))
        try:
            yield
        finally:
            self._state_manager.set_context(None)

    def summary(self) -> dict:
        """Per branch: the steps whose blocks ran and the steps that reused the cache."""
        out: dict[str, dict[str, list[int]]] = {}
        for d in self.record:
            entry = out.setdefault(d.branch, {"computed": [], "skipped": []})
            entry["computed" if d.computed else "skipped"].append(d.step)
        return out


# The caches each model family has been built and tested for (caching/families.py says why).
SUPPORTED = {family: caches.kinds for family, caches in FAMILY_CACHES.items()}
# Why a cache is missing for a family, where the reason is not "not wired yet".
UNAVAILABLE_BECAUSE = {(family, "teacache"): caches.no_teacache_because
                       for family, caches in FAMILY_CACHES.items() if caches.no_teacache_because}


def _refuse_what_it_cannot_keep_exact(settings: CacheSettings, request, mesh, family: str) -> None:
    from ..config import ConfigError

    if settings.kind not in SUPPORTED.get(family, ()):
        offered = SUPPORTED.get(family, ())
        why = UNAVAILABLE_BECAUSE.get((family, settings.kind)) or NO_CACHE_BECAUSE.get(family)
        raise ConfigError(f"the {settings.kind} step cache is not available for {family} models"
                          f"{f' ({why})' if why else ''} (available: {', '.join(offered) or 'none yet'}); "
                          f"set the sampler's cache to {' or '.join((*offered, 'none'))}")
    if request.controlnets:
        # diffusers adds each ControlNet residual after its block even when the block is skipped,
        # so a skipped step would add them on top of a cached residual that already holds them.
        raise ConfigError("the step cache does not work with ControlNets yet: set the sampler's cache to none, "
                         "or remove the ControlNet")
    if mesh.size("pipefusion") > 1:
        raise ConfigError("the step cache does not work with PipeFusion: set the sampler's cache to none, or use "
                          "Ulysses/Ring sequence parallelism (pipefusion_parallel_degree 1)")
    if mesh.size("distrifusion") > 1:
        raise ConfigError("the step cache does not work with DistriFusion: set the sampler's cache to none, or use "
                          "Ulysses/Ring sequence parallelism (distrifusion_degree 1)")


def _job(settings: CacheSettings, model, mesh, steps_by: list[float], family: str, sharded_forward) -> CacheJob:
    caches = FAMILY_CACHES[family]
    teacache = None if settings.kind == FBCACHE else caches.teacache(model.config)
    threshold = settings.threshold_or(DEFAULT_THRESHOLDS[FBCACHE] if teacache is None else teacache.default_threshold)
    return CacheJob(model, settings, ReducedRelativeL1.for_mesh(mesh), steps_by, threshold,
                    layout_reader(caches, sharded_forward), teacache)


def cache_job_for(request, model: torch.nn.Module, mesh, default_shift: float, family: str = "flux",
                  sharded_forward=None) -> CacheJob | None:
    """The request's cache for this rank, or None; refuses combinations it cannot keep exact.

    sharded_forward: the model's ModuleShardedForward, for families whose blocks get no attention
    kwargs (Wan): the metric asks it for the sequence layout of the call in progress.
    """
    settings: CacheSettings | None = getattr(request, "cache", None)
    if settings is None:
        return None
    if settings.kind == "ditfastattn":  # DiTFastAttn compresses attention instead of skipping blocks
        from ..fastattn.job import fastattn_job_for

        return fastattn_job_for(request, model, mesh, default_shift, family)
    _refuse_what_it_cannot_keep_exact(settings, request, mesh, family)
    from ..models.families import get as get_family
    from ..sampling.ksampler import flow_sampling_for
    from ..sampling.schedules import sigmas_for

    height, width = request.latent.shape[-2:]
    # The family's own model sampling (SD3: discrete flow), so the step of a sigma is the sampler's.
    sampling = flow_sampling_for(request, default_shift, height, width, get_family(family).sampling)
    sigmas = sigmas_for(sampling, request.scheduler, request.steps, request.denoise, request.sampler_name)
    return _job(settings, model, mesh, sigmas, family, sharded_forward)


def diffusers_cache_job_for(request, model: torch.nn.Module, mesh, family: str, timesteps,
                            sharded_forward=None) -> CacheJob | None:
    """The cache of a diffusers-semantics family (its pipeline's loop; sampling/diffusers_schedulers.py).

    The loop calls the model with the scheduler's timesteps, one per step and strictly decreasing,
    so they stand in for the sigmas: step i covers (timesteps[i+1], timesteps[i]], the last step
    everything below.
    """
    settings: CacheSettings | None = getattr(request, "cache", None)
    if settings is None:
        return None
    _refuse_what_it_cannot_keep_exact(settings, request, mesh, family)
    return _job(settings, model, mesh, [*(float(t) for t in timesteps), float("-inf")], family, sharded_forward)
