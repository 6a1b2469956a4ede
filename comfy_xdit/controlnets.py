"""A rank's ControlNets: loaded once and kept across jobs, prepared per job, picked per step.

Weights are cached by (file fingerprint, dtype): a new strength, image or percent range is a new
request, never a new load. A job's ControlNets become ``JobControl``s: this rank's rows of the
control tokens (computed once per job) and the sigma range in which ComfyUI applies them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .loading.flux_controlnet import controlnet_fingerprint, load_flux_controlnet
from .models.flux_controlnet import ActiveControl, FluxControlNetRunner
from .requests import ControlNetRequest
from .sampling.schedules import FlowSampling


@dataclass
class JobControl:
    control: ActiveControl
    tokens: torch.Tensor  # this rank's rows, packed, on the device
    sigma_start: float  # applied while sigma_end <= sigma <= sigma_start (ComfyUI's timestep_range)
    sigma_end: float

    def active_at(self, sigma: torch.Tensor) -> bool:
        # The same float32-tensor-against-Python-float comparison ComfyUI's get_control makes.
        t = sigma.reshape(-1)[0]
        return not (bool(t > self.sigma_start) or bool(t < self.sigma_end))


class ControlNetCache:
    """ControlNet runners of one rank, most recently used last."""

    # A few: a workflow may chain several ControlNets, and switch between a few more.
    MAX_LOADED = 3

    def __init__(self, device: torch.device, attention_factory):
        self.device = device
        self._attention_factory = attention_factory  # () -> SequenceParallelAttention | None
        self._runners: OrderedDict = OrderedDict()
        self.load_count = 0

    def runner(self, path: str, dtype: torch.dtype) -> FluxControlNetRunner:
        key = (controlnet_fingerprint(path), dtype)
        if key in self._runners:
            self._runners.move_to_end(key)
            return self._runners[key]
        loaded = load_flux_controlnet(path, dtype=dtype, device=self.device)
        runner = FluxControlNetRunner(loaded, self._attention_factory())
        self._runners[key] = runner
        self.load_count += 1
        while len(self._runners) > self.MAX_LOADED:
            self._runners.popitem(last=False)
        return runner

    def forget(self) -> None:
        self._runners.clear()


def check_fits_model(runner: FluxControlNetRunner, model_config, path: str) -> None:
    width = runner.config["num_attention_heads"] * runner.config["attention_head_dim"]
    theirs = model_config.num_attention_heads * model_config.attention_head_dim
    if width != theirs or runner.config["joint_attention_dim"] != model_config.joint_attention_dim:
        raise ValueError(f"ControlNet {path} was made for another model (width {width}, text width "
                         f"{runner.config['joint_attention_dim']}; the model has {theirs}, {model_config.joint_attention_dim})")


def prepare(requests: tuple[ControlNetRequest, ...], cache: ControlNetCache, *, dtype: torch.dtype, batch: int,
            rows: slice, latent_hw: tuple[int, int], sampling: FlowSampling, model_config=None) -> list[JobControl]:
    """This job's ControlNets on this rank (strength 0 is left out, as ComfyUI leaves it out)."""
    prepared = []
    for request in requests:
        if float(request.strength) == 0.0:
            continue
        runner = cache.runner(request.path, dtype)
        if model_config is not None:
            check_fits_model(runner, model_config, request.path)
        modes = runner.config.get("num_mode") or 0
        if request.mode is not None and modes and not 0 <= request.mode < modes:
            raise ValueError(f"ControlNet {request.path} has {modes} union modes; mode {request.mode} does not exist")
        hint = request.hint
        # ComfyUI's broadcast_image_to: latent row j gets hint row j % len(hint).
        hint = hint[torch.arange(batch) % hint.shape[0]][rows].to(cache.device)
        with torch.inference_mode():
            tokens = runner.control_tokens(hint, latent_hw)
        mode = request.mode if modes else None
        prepared.append(JobControl(ActiveControl(runner, float(request.strength), mode), tokens,
                                   sampling.percent_to_sigma(request.start_percent), sampling.percent_to_sigma(request.end_percent)))
    return prepared
