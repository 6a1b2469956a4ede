"""The second sampling path: a diffusers scheduler and the loop of the family's diffusers pipeline.

For the families core ComfyUI does not run (DiT-XL-2, CogVideoX) there are no ComfyUI semantics to
match: the diffusers folder is the format and its ``scheduler/scheduler_config.json`` defines the
sampling. The loop below is the pipeline's (DiTPipeline's for DiT, CogVideoXPipeline's for
CogVideoX, each family's differences in its ``DiffusersPipeline`` record): the scheduler's
``set_timesteps``, ``scale_model_input``, one model call with classifier-free guidance,
``scheduler.step``. Only the model call is ours: it goes through the family's parallel denoiser,
so sequence parallel (inside the model), CFG parallel and data parallel apply.

Every rank holds the whole batch's latents and runs the scheduler on all of them; a rank only
evaluates the model for its own rows (data parallel) and branch (CFG parallel), and the model
outputs are all-gathered before the step. So a scheduler that draws noise in its step (DDPM,
ancestral, SDE) draws it for the whole batch from one generator on every rank, never per shard,
and every rank keeps the same scheduler state.

Randomness is the pipelines': one ``torch.Generator`` on the CPU seeded with the job's seed draws
the initial latents (diffusers' ``randn_tensor`` with a CPU generator) and then the step noise,
so a seed means the same result on any device and any mesh.

Nothing here reaches a hub: the scheduler is built from the config dict alone.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..loading.safetensors_files import CheckpointError
from ..mesh import ParallelMesh
from ..models.sharding import gather_along
from ..requests import SampleRequest, SamplingCancelled, StepHooks
from .cfg_batch import stack_branches
from .ksampler import gather_batch, rows_for_rank, slice_conditioning, widen_empty_latent

SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"

# model_call(x [b, C, ...] in model space, timestep (a 0-d tensor), conditioning) -> model output [b, C', ...]
ModelCall = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class DiffusersPipeline:
    """What a family's diffusers pipeline does around the model call (families.py holds one per family)."""

    name: str  # the diffusers pipeline this follows, for messages and the README
    # checkpoint path -> scheduler config dict (the folder's; a single file's family default)
    scheduler_config: Callable[[str], dict]
    # (conditional output, unconditional output, guidance scale) -> the scheduler's model_output
    guide: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    # model output without guidance -> the scheduler's model_output
    unguided: Callable[[torch.Tensor], torch.Tensor]
    # whether the initial noise is multiplied by scheduler.init_noise_sigma (DiTPipeline does not)
    scale_initial_noise: bool = False
    # (request, model config) -> None, refusing what the model cannot take (class ids out of range, ...)
    check: Callable[[SampleRequest, object], None] = lambda request, config: None
    # ComfyUI's LATENT layout -> the pipeline's latent layout, and back (CogVideoX: [B, T, C, H, W]);
    # the initial noise is drawn in the pipeline's layout, as the pipeline draws it
    to_pipeline: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    from_pipeline: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    # (scheduler, model_output, step index, timesteps, x, state, step kwargs) -> (x, state, x0 for previews or None)
    step: Callable = None  # None: scheduler_step
    # (request, generator, batch) -> request: what the pipeline draws from its generator before the
    # initial noise (ConsisID: the face image's latent sample), filled into the request
    prepare: Callable | None = None
    # (model config, latent frames) -> frames the pipeline samples in front of them and drops at the end
    # (CogVideoX 1.5 pads its latent frames to a multiple of its temporal patch); in the pipeline
    # layout's dim 1
    frame_padding: Callable[[object, int], int] = lambda config, frames: 0

    @staticmethod
    def uses_guidance(scale: float) -> bool:
        # diffusers' pipelines guide only above 1 (``do_classifier_free_guidance``).
        return scale > 1.0


def scheduler_classes() -> dict[str, type]:
    """Every scheduler class diffusers exports, by name."""
    import diffusers
    from diffusers import SchedulerMixin

    classes = {}
    for name in dir(diffusers):
        if not name.endswith("Scheduler"):
            continue
        try:
            value = getattr(diffusers, name)
        except (ImportError, AttributeError):  # optional backends (flax, onnx) missing
            continue
        if isinstance(value, type) and issubclass(value, SchedulerMixin):
            classes[name] = value
    return classes


def build_scheduler(config: dict, where: str = "the scheduler config"):
    """The diffusers scheduler the config names, built from the dict alone (offline)."""
    name = config.get("_class_name")
    if not name:
        raise CheckpointError(f"{where}: no _class_name; expected a diffusers scheduler_config.json")
    classes = scheduler_classes()
    if name not in classes:
        examples = ", ".join(n for n in ("DDIMScheduler", "DPMSolverMultistepScheduler", "DDPMScheduler",
                                         "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler") if n in classes)
        raise CheckpointError(f"{where}: unknown scheduler class {name!r} (not in diffusers "
                              f"{_diffusers_version()}); use a diffusers scheduler such as {examples}")
    return classes[name].from_config(config)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def read_scheduler_config(path: str | Path, family: str, single_file_default: dict | None = None) -> dict:
    """The scheduler config of a checkpoint: ``scheduler/scheduler_config.json`` of its diffusers
    folder (``path`` may be the folder or its ``transformer/``); a single file gets the family's
    default, if it has one. The config is checked by building the scheduler."""
    path = Path(path).expanduser()
    if path.is_file():
        if single_file_default is None:
            raise CheckpointError(f"{path}: {family} samples with its diffusers folder's scheduler; point the loader "
                                  f"at the diffusers folder (with transformer/ and scheduler/), not a single file")
        config = dict(single_file_default)
        build_scheduler(config, f"{family}'s default scheduler")
        return config
    candidates = [path / SCHEDULER_CONFIG, path.parent / SCHEDULER_CONFIG]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CheckpointError(f"{path}: no {SCHEDULER_CONFIG.as_posix()}; {family} samples with the diffusers folder's "
                              "scheduler: point the loader at the whole diffusers folder (with transformer/ and "
                              "scheduler/), or add the scheduler folder the model was released with")
    try:
        config = json.loads(found.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{found}: unreadable scheduler config ({error})") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{found}: not a scheduler config (expected a JSON object)")
    build_scheduler(config, str(found))
    return config


def _step_kwargs(scheduler, generator: torch.Generator) -> dict:
    # Pipelines hand their generator (and DDIM's eta, 0) to schedulers that take them
    # (diffusers' prepare_extra_step_kwargs).
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generator} if "generator" in accepted else {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    return kwargs


def scheduler_step(scheduler, output: torch.Tensor, i: int, timesteps, x: torch.Tensor, state, step_kwargs: dict):
    """The plain ``scheduler.step``: most schedulers keep their multistep state themselves."""
    result = scheduler.step(output, timesteps[i], x, **step_kwargs)
    return result.prev_sample, state, getattr(result, "pred_original_sample", None)


def scheduler_timesteps(scheduler_config: dict, steps: int) -> torch.Tensor:
    """The timesteps the loop below calls the model with (a step cache keys its steps on them)."""
    scheduler = build_scheduler(scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def run_diffusers_sampler(
    request: SampleRequest,
    model_call: ModelCall,
    mesh: ParallelMesh,
    *,
    pipeline: DiffusersPipeline,
    scheduler_config: dict,
    latent_channels: int,
    latent_dimensions: int,
    from_model_space: Callable[[torch.Tensor], torch.Tensor],
    hooks: StepHooks,
    device: torch.device,
    batch_cfg: bool = True,
    model_config=None,
) -> torch.Tensor:
    """Sample like the family's diffusers pipeline; every rank returns the whole batch's raw latents.

    The request's latent gives the batch and size (its content is not used: text/class to image
    only); ``steps`` and ``cfg`` are the pipeline's num_inference_steps and guidance_scale.
    """
    latent = widen_empty_latent(request.latent.float(), latent_channels, latent_dimensions)
    if request.denoise != 1.0:
        raise ValueError(f"denoise {request.denoise} is not supported with {pipeline.name}'s sampling "
                         "(the diffusers scheduler starts from noise); set denoise to 1.0")
    if request.batch_index is not None:
        raise ValueError(f"latents with a batch_index (Latent From Batch) are not supported with {pipeline.name}'s "
                         "sampling; use a fresh empty latent")
    batch = latent.shape[0]
    uses_cfg = pipeline.uses_guidance(request.cfg) and request.negative is not None
    mesh.config.check_request(batch_size=batch, uses_cfg=uses_cfg)

    scheduler = build_scheduler(scheduler_config)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    if pipeline.prepare is not None:
        request = pipeline.prepare(request, generator, batch)
    shape = list(pipeline.to_pipeline(latent).shape)
    padding = pipeline.frame_padding(model_config, shape[1]) if latent_dimensions == 3 else 0
    shape[1] += padding

    def to_comfyui(x: torch.Tensor) -> torch.Tensor:  # the pipeline's latents -> ComfyUI's, padding frames dropped
        return pipeline.from_pipeline(x[:, padding:])

    x = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)  # randn_tensor with a CPU generator
    if pipeline.scale_initial_noise:
        x = x * scheduler.init_noise_sigma
    x = x.to(device)
    scheduler.set_timesteps(request.steps)
    step_kwargs = _step_kwargs(scheduler, generator)

    rows = rows_for_rank(batch, mesh)
    positive = slice_conditioning(request.positive, rows, batch, device)
    negative = slice_conditioning(request.negative, rows, batch, device) if uses_cfg else None
    cfg_group, cfg_rank = mesh.group("cfg"), mesh.local_rank("cfg")
    both_branches = None
    if uses_cfg and cfg_group is None and batch_cfg:  # the pipeline's own batch of [conditional, unconditional]
        both_branches = stack_branches(positive, negative, rows.stop - rows.start)

    def model_output(x_rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not uses_cfg:
            return pipeline.unguided(model_call(x_rows, t, positive))
        if cfg_group is not None:
            mine = model_call(x_rows, t, positive if cfg_rank == 0 else negative)
            cond, uncond = gather_along(mine, 0, cfg_group).chunk(2, dim=0)
        elif both_branches is not None:
            cond, uncond = model_call(torch.cat([x_rows, x_rows]), t, both_branches).chunk(2, dim=0)
        else:
            cond, uncond = model_call(x_rows, t, positive), model_call(x_rows, t, negative)
        return pipeline.guide(cond, uncond, request.cfg)

    step = pipeline.step or scheduler_step
    state = None  # what a pipeline carries between steps for its scheduler (CogVideoXDPMScheduler)
    timesteps = scheduler.timesteps
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(x, t)
        mine = model_output(model_input[rows], t).float()
        output = gather_batch(mine, batch, mesh)  # the whole batch: the step runs on every row
        x, state, x0 = step(scheduler, output, i, timesteps, x, state, step_kwargs)
        preview = None
        if request.preview_every and (i + 1) % request.preview_every == 0:
            shown = to_comfyui(x0 if x0 is not None else x)
            preview = from_model_space(shown[:1]).float().cpu()
        hooks.on_step(i + 1, total, preview)
        # One vote per step on every rank, so all ranks stop after the same step.
        if i + 1 < total and mesh.any_rank(hooks.cancel_requested()):
            raise SamplingCancelled(i + 1)
    return from_model_space(to_comfyui(x)).float().cpu()
