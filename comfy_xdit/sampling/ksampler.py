"""KSampler on a parallel mesh: ComfyUI's semantics, CFG and data parallel.

The model sampling carries the prediction type's arithmetic (flow velocity, eps or v: how noise
enters, the model input's scale, how the output becomes the x0 prediction), as in ComfyUI.

Every rank runs this function with the same request. The batch is split over the data group,
the conditional and unconditional branches over the cfg group (when enabled), and the image
tokens inside the model over the sequence-parallel groups. Every rank returns the whole result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ..even_split import even_bands
from ..mesh import ParallelMesh
from ..models.sharding import gather_along
from ..requests import FluxConditioning, SampleRequest, SamplingCancelled, StepHooks
from .cfg_batch import stack_branches
from .noise import comfy_noise
from .samplers import NoiseSource, get_sampler
from .schedules import FlowSampling, ModelSampling, resolution_shift, sigmas_for

# velocity(x_model_space, sigma, conditioning) -> v; the conditioning is the family's type
Velocity = Callable[[torch.Tensor, torch.Tensor, FluxConditioning], torch.Tensor]


def widen_empty_latent(latent: torch.Tensor, channels: int, dimensions: int = 2) -> torch.Tensor:
    """ComfyUI turns an all-zero latent of another channel count (EmptyLatentImage's 4) into the model's,
    and an image latent [B, C, H, W] given to a video model into one frame [B, C, 1, H, W]."""
    if latent.shape[1] != channels and not latent.any():
        latent = latent.new_zeros((latent.shape[0], channels, *latent.shape[2:]))
    if latent.shape[1] != channels:
        raise ValueError(f"the latent has {latent.shape[1]} channels but this model takes {channels}; use a latent made for it")
    if dimensions == 3 and latent.ndim == 4:
        latent = latent.unsqueeze(2)
    if latent.ndim != 2 + dimensions:
        kind = "a video latent [B, C, T, H, W]" if dimensions == 3 else "an image latent [B, C, H, W]"
        raise ValueError(f"the latent has shape {list(latent.shape)} but this model takes {kind}; use a latent made for it")
    return latent


def batch_split(batch: int, ranks: int) -> list[int]:
    """Rows per data-parallel rank: as even as possible, the first ranks taking one more."""
    return [size for _, size in even_bands(batch, ranks)]


def _rows_for_rank(batch: int, mesh: ParallelMesh) -> slice:
    sizes = batch_split(batch, mesh.size("data"))
    rank = mesh.local_rank("data")
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


rows_for_rank = _rows_for_rank  # the engine slices per-row job inputs (ControlNet hints) the same way


def flow_sampling_for(request: SampleRequest, default_shift: float, height: int, width: int,
                      make_sampling: Callable[[float], ModelSampling] = FlowSampling) -> ModelSampling:
    """The job's model sampling: the model's constant shift, or ModelSamplingFlux's by resolution."""
    shift = default_shift
    if request.max_shift is not None:
        shift = resolution_shift(height, width, request.max_shift, request.base_shift if request.base_shift is not None else 0.5)
    return make_sampling(shift)


def _gather_batch(out: torch.Tensor, batch: int, mesh: ParallelMesh) -> torch.Tensor:
    """Every data-parallel rank's rows, in order; uneven shares are padded for the all-gather."""
    group = mesh.group("data")
    if group is None:
        return out
    sizes = batch_split(batch, mesh.size("data"))
    padded = torch.cat([out, out.new_zeros((sizes[0] - out.shape[0], *out.shape[1:]))]) if out.shape[0] < sizes[0] else out
    gathered = gather_along(padded, 0, group).split(sizes[0])
    return torch.cat([part[:n] for part, n in zip(gathered, sizes)])


gather_batch = _gather_batch  # the diffusers-scheduler loop (diffusers_schedulers.py) gathers the same way


def _slice_conditioning(cond, rows: slice, batch: int, device: torch.device):
    # Moved to the device once per job: a host-to-device copy inside the step would make the
    # host wait for the GPU every step.
    def pick(t: torch.Tensor) -> torch.Tensor:
        return (t[rows] if t.shape[0] == batch and batch > 1 else t[:1]).to(device)

    tensors = {f.name: getattr(cond, f.name) for f in dataclasses.fields(cond)}
    return dataclasses.replace(cond, **{name: pick(t) for name, t in tensors.items() if isinstance(t, torch.Tensor)})


slice_conditioning = _slice_conditioning


def _max_denoise(sampling: ModelSampling, sigmas: torch.Tensor) -> bool:
    """KSampler's test for a schedule that starts at the top (an EPS model then scales noise by sqrt(1 + sigma^2))."""
    sigma_max, first = float(sampling.sigma_max), float(sigmas[0])
    return math.isclose(sigma_max, first, rel_tol=1e-05) or first > sigma_max


def run_ksampler(
    request: SampleRequest,
    velocity: Velocity,
    mesh: ParallelMesh,
    *,
    latent_channels: int,
    latent_dimensions: int = 2,
    default_shift: float,
    to_model_space: Callable[[torch.Tensor], torch.Tensor],
    from_model_space: Callable[[torch.Tensor], torch.Tensor],
    hooks: StepHooks,
    device: torch.device,
    make_sampling: Callable[[float], ModelSampling] = FlowSampling,
    batch_cfg: bool = False,
) -> torch.Tensor:
    """batch_cfg: without cfg parallel, evaluate the two CFG branches as one call of twice the
    batch where their conditionings allow it (cfg_batch.py); the caller turns it off where a
    call must see one branch (per-branch caches and pipelines)."""
    latent = widen_empty_latent(request.latent.float(), latent_channels, latent_dimensions)
    if request.denoise == 0:  # stock KSampler: no sigmas, the (widened) latent comes back unchanged
        return latent.clone()
    batch, (height, width) = latent.shape[0], latent.shape[-2:]
    uses_cfg = request.cfg != 1.0 and request.negative is not None  # cfg 1 skips the negative, as ComfyUI does
    mesh.config.check_request(batch_size=batch, uses_cfg=uses_cfg)

    noise = comfy_noise(tuple(latent.shape), request.seed, request.batch_index)
    sampling = flow_sampling_for(request, default_shift, height, width, make_sampling)
    sigmas = sigmas_for(sampling, request.scheduler, request.steps, request.denoise, request.sampler_name).to(device)
    sampler = get_sampler(request.sampler_name, sampling)

    rows = _rows_for_rank(batch, mesh)
    positive = _slice_conditioning(request.positive, rows, batch, device)
    negative = _slice_conditioning(request.negative, rows, batch, device) if uses_cfg else None
    x = sampling.noise_scaling(sigmas[0], noise[rows].to(device), to_model_space(latent[rows].to(device)),
                               max_denoise=_max_denoise(sampling, sigmas))

    cfg_group = mesh.group("cfg")
    cfg_rank = mesh.local_rank("cfg")
    both_branches = None
    if uses_cfg and cfg_group is None and batch_cfg:
        both_branches = stack_branches(positive, negative, rows.stop - rows.start)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        model_input = sampling.calculate_input(sigma, x)
        if not uses_cfg:
            return sampling.calculate_denoised(sigma, velocity(model_input, sigma, positive), x)
        if cfg_group is not None:
            mine = velocity(model_input, sigma, positive if cfg_rank == 0 else negative)
            v_cond, v_uncond = gather_along(mine, 0, cfg_group).chunk(2, dim=0)
        elif both_branches is not None:
            v_cond, v_uncond = velocity(torch.cat([model_input, model_input]), sigma, both_branches).chunk(2, dim=0)
        else:
            v_cond, v_uncond = velocity(model_input, sigma, positive), velocity(model_input, sigma, negative)
        cond, uncond = sampling.calculate_denoised(sigma, v_cond, x), sampling.calculate_denoised(sigma, v_uncond, x)
        return uncond + (cond - uncond) * request.cfg

    total = len(sigmas) - 1

    def after_step(i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        preview = None
        if request.preview_every and (i + 1) % request.preview_every == 0:
            preview = from_model_space(denoised[:1]).float().cpu()
        hooks.on_step(i + 1, total, preview)
        # One vote per step on every rank, so all ranks stop after the same step.
        if i + 1 < total and mesh.any_rank(hooks.cancel_requested()):
            raise SamplingCancelled(i + 1)

    # Ancestral and SDE noise is drawn for the whole batch on every rank, then sliced to our rows.
    extra_noise = NoiseSource(request.seed, tuple(latent.shape), rows, device, x.dtype)
    x = sampling.inverse_noise_scaling(sigmas[-1], sampler(denoise, x, sigmas, after_step, extra_noise))
    out = from_model_space(x).float()
    return _gather_batch(out, batch, mesh).cpu()
