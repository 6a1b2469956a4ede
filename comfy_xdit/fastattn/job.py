"""One sampling job with DiTFastAttn: processors in for the job, the step of each call, the plan store.

The plan is calibrated during the first job of a kind (see calibration.py) and kept for later jobs
with the same settings, schedule, shapes and LoRAs: the calibrating job itself already runs with
the methods it chooses, so its result is what a job with the finished plan gives. Plans are kept
on the model object: they belong to the weights they were measured on and go with them.

Parallelism: data and cfg parallel are exact (N workers give one worker's latents with the same
settings), the plan being chosen on errors reduced over those groups. ASC needs both CFG branches
in one call, so under cfg parallel calibration never chooses it and a fixed plan using it is
refused. Ulysses and Ring split the token sequence, across which the window and the residual
would have to be exchanged; that is not built, so they are refused, as are PipeFusion,
DistriFusion and tensor parallel.
"""

from __future__ import annotations

import contextlib

import torch

from .calibration import GreedyCalibration
from .plan import SHARE_CFG, FastAttnPlan
from .processor import FastAttnFluxProcessor, FastAttnPixArtProcessor, FastAttnRun
from .settings import FastAttnSettings

PLAN_STORE = "_comfy_xdit_fastattn_plans"
# Per family: its processor class, and which attention modules (by processor name) it compresses.
# PixArt's cross-attention (attn2) attends to the text only and is left as it is, as in the paper.
FAMILIES = {
    "flux": (FastAttnFluxProcessor, lambda name: True),
    "pixart": (FastAttnPixArtProcessor, lambda name: ".attn1." in name),
}
SUPPORTED_FAMILIES = tuple(FAMILIES)


def step_of(sigmas: list[float], sigma) -> int:
    """Step i covers sigmas in (sigmas[i+1], sigmas[i]] (all model calls of a step share its index)."""
    sigma = float(sigma)
    step = sum(1 for s in sigmas[1:] if s >= sigma - 1e-7)
    return min(step, len(sigmas) - 2)


class FastAttnJob:
    """The step cache's job interface (enter, exit, ``call``, ``record``) for DiTFastAttn."""

    # The engine may batch the two CFG branches into one call: ASC needs exactly that.
    one_call_for_both_branches = True
    # The processor picks its method in Python at every call, inside the block that regional
    # compile traces whole (fullgraph): dynamo refuses it, so the engine refuses compile.
    works_with_compile = False

    def __init__(self, model: torch.nn.Module, settings: FastAttnSettings, run: FastAttnRun, store: dict, key,
                 family: str = "flux"):
        self.model, self.settings, self.run = model, settings, run
        self.processor_class, self.compresses = FAMILIES[family]
        self._store, self._key = store, key
        self._saved_processors = None
        self._branches: dict[int, tuple[object, str]] = {}
        self.sigmas: list[float] = []

    @property
    def record(self) -> list:
        """Calibration decisions of this job (empty when it ran a stored or fixed plan)."""
        return self.run.calibration.record if self.run.calibration is not None else []

    @property
    def plan(self) -> FastAttnPlan:
        return self.run.plan if self.run.plan is not None else self.run.finished_plan()

    def __enter__(self) -> "FastAttnJob":
        self._saved_processors = self.model.attn_processors
        processors, layer = dict(self._saved_processors), 0
        for name in processors:
            if self.compresses(name):
                processors[name] = self.processor_class(self.run, layer)
                layer += 1
        self.model.set_attn_processor(processors)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.model.set_attn_processor(self._saved_processors)
        if exc_type is None and self.run.plan is None:  # a finished calibration: keep its plan
            self._store[self._key] = self.run.finished_plan()

    def branch_of(self, conditioning) -> str:
        key = id(conditioning)
        if key not in self._branches:  # keep the object so its id is not reused within the job
            self._branches[key] = (conditioning, f"branch{len(self._branches)}")
        return self._branches[key][1]

    @contextlib.contextmanager
    def call(self, conditioning, sigma):
        self.run.step, self.run.branch = step_of(self.sigmas, sigma), self.branch_of(conditioning)
        yield

    def summary(self) -> dict:
        return {"plan": self.plan.counts(), "compressed": self.plan.compressed_fraction()}


def _refuse_unsupported(request, mesh, family: str) -> None:
    from ..config import ConfigError

    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(f"DiTFastAttn is not available for {family} models yet (available for: "
                          f"{', '.join(SUPPORTED_FAMILIES)}); set the sampler's cache to none")
    if mesh.size("ulysses") * mesh.size("ring") > 1:
        raise ConfigError("DiTFastAttn's window attention and residuals need the whole token sequence on one rank: "
                          "set ulysses_degree and ring_degree to 1 (data or cfg parallel work with it), "
                          "or set the sampler's cache to none")
    for dim, flag in (("pipefusion", "pipefusion_parallel_degree"), ("distrifusion", "distrifusion_degree"),
                      ("tensor", "tensor_parallel_degree")):
        if mesh.size(dim) > 1:
            raise ConfigError(f"DiTFastAttn does not work with {dim} parallelism: set {flag} to 1 "
                              "(data or cfg parallel work with it), or set the sampler's cache to none")
    if request.controlnets:
        raise ConfigError("DiTFastAttn does not work with ControlNets yet: set the sampler's cache to none, "
                          "or remove the ControlNet")


def plan_key(request, settings: FastAttnSettings, sigmas) -> tuple:
    """What a calibrated plan depends on: settings, schedule, shapes, CFG and LoRAs (not seed or prompt values)."""
    def text(cond):
        return None if cond is None else tuple(cond.context.shape)

    return (settings.threshold, settings.window, settings.share_cfg, tuple(float(s) for s in sigmas),
            tuple(request.latent.shape), text(request.positive), text(request.negative), request.cfg != 1.0,
            tuple(request.loras))


def fastattn_job_for(request, model: torch.nn.Module, mesh, default_shift: float, family: str) -> FastAttnJob:
    """The request's DiTFastAttn job on this rank; refuses what it cannot keep exact across ranks."""
    from ..config import ConfigError
    from ..models.families import get as get_family
    from ..sampling.ksampler import flow_sampling_for, rows_for_rank
    from ..sampling.schedules import sigmas_for

    settings: FastAttnSettings = request.cache
    _refuse_unsupported(request, mesh, family)
    cfg_parallel = mesh.size("cfg") > 1
    layers = sum(1 for name in model.attn_processors if FAMILIES[family][1](name))
    height, width = request.latent.shape[-2:]
    sampling = flow_sampling_for(request, default_shift, height, width, get_family(family).sampling)
    sigmas = sigmas_for(sampling, request.scheduler, request.steps, request.denoise, request.sampler_name)
    steps = len(sigmas) - 1
    fixed = settings.plan
    if fixed is not None:
        if (fixed.layers, fixed.steps) != (layers, steps):
            raise ConfigError(f"the DiTFastAttn plan covers {fixed.layers} layers x {fixed.steps} steps, but this job "
                              f"has {layers} attention layers x {steps} steps")
        if cfg_parallel and fixed.uses(SHARE_CFG):
            raise ConfigError("a DiTFastAttn plan with share_cfg needs both CFG branches on one rank: turn "
                              "use_cfg_parallel off, or use a plan without share_cfg")
    store = model.__dict__.setdefault(PLAN_STORE, {})
    key = plan_key(request, settings, sigmas)
    plan = fixed if fixed is not None else store.get(key)
    groups = [g for g in (mesh.group("data"), mesh.group("cfg")) if g is not None]
    rows = rows_for_rank(request.latent.shape[0], mesh)
    run = FastAttnRun(
        layers=layers, steps=steps, window=settings.window, plan=plan,
        calibration=None if plan is not None else GreedyCalibration(settings.effective_threshold, groups),
        share_cfg_allowed=settings.share_cfg and not cfg_parallel, rows=rows.stop - rows.start,
    )
    job = FastAttnJob(model, settings, run, store, key, family)
    job.sigmas = [float(s) for s in sigmas]
    return job
