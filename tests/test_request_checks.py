"""Bad generation requests are refused by name: settings before any worker runs, NaN or infinite
inputs by every rank on its device; denoise 0 is stock's no-op."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_xdit.config import ConfigError
from comfy_xdit.request_checks import check_inputs_finite, check_sample_settings, finite_flag
from comfy_xdit.requests import ModelSpec
from test_parallel_flux import request, tiny_flux
from distributed import cpu_engine


def nan_at(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


BAD = {
    "steps 0": (dict(steps=0), "steps"),
    "steps not whole": (dict(steps=2.5), "steps"),
    "denoise above 1": (dict(denoise=1.5), "denoise"),
    "denoise below 0": (dict(denoise=-0.1), "denoise"),
    "cfg inf": (dict(cfg=float("inf")), "cfg"),
    "seed negative": (dict(seed=-1), "seed"),
    "seed too large": (dict(seed=2**64), "seed"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_settings_are_refused_naming_the_input(name):
    change, word = BAD[name]
    with pytest.raises(ConfigError, match=word):
        check_sample_settings(dataclasses.replace(request(), **change))


def with_nan_in(r, where: str):
    if where == "latent":
        return dataclasses.replace(r, latent=nan_at(torch.randn_like(r.latent)))
    branch, field = where.split()
    cond = getattr(r, branch)
    return dataclasses.replace(r, **{branch: dataclasses.replace(cond, **{field: nan_at(getattr(cond, field))})})


WHERE = ["latent", "positive context", "positive pooled", "negative context"]


@pytest.mark.parametrize("where", WHERE)
def test_nan_or_inf_inputs_are_refused_by_the_engine(where):
    engine = cpu_engine()
    engine.set_model(tiny_flux(), ModelSpec("tiny", dtype="float32"))
    label = "the latent" if where == "latent" else f"the {where.split()[0]} conditioning"
    with pytest.raises(ConfigError, match=f"{label}.* 1 NaN or infinite"):
        engine.sample(with_nan_in(request(), where))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the device machines)")
@pytest.mark.parametrize("where", WHERE)
def test_inputs_are_checked_on_the_gpu(where):
    check_inputs_finite(request(), torch.device("cuda"))
    with pytest.raises(ConfigError, match="1 NaN or infinite"):
        check_inputs_finite(with_nan_in(request(), where), torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_finite_check_finds_any_nan_or_infinity_and_passes_the_largest_finite_values(dtype):
    def all_finite(t: torch.Tensor) -> bool:
        return bool(finite_flag(t))

    largest = torch.finfo(dtype).max
    assert all_finite(torch.full((512, 4096), largest, dtype=dtype))  # a float64 sum of these does not overflow
    assert all_finite(torch.full((512, 4096), -largest, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = torch.zeros(512, 4096, dtype=dtype)
        values[311, 1017] = bad
        assert not all_finite(values), bad
    both = torch.zeros(8, dtype=dtype)
    both[2], both[5] = float("inf"), float("-inf")  # they would cancel in a sum, but inf - inf is NaN
    assert not all_finite(both)
    if dtype == torch.float64:  # where the sum could overflow, the mask decides
        assert all_finite(torch.full((4,), torch.finfo(torch.float64).max, dtype=dtype))


def test_a_good_request_passes():
    check_sample_settings(request())
    check_inputs_finite(request(), torch.device("cpu"))


def test_denoise_zero_returns_the_latent_unchanged_as_stock_does():
    engine = cpu_engine()
    engine.set_model(tiny_flux(), ModelSpec("tiny", dtype="float32"))
    latent = torch.randn(1, 16, 10, 14)
    out = engine.sample(dataclasses.replace(request(), latent=latent, denoise=0.0))
    assert torch.equal(out, latent)


def test_gpus_that_do_not_exist_are_refused_and_other_nodes_are_left_to_their_agents():
    from comfy_xdit.config import check_local_devices_exist

    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    with pytest.raises(ConfigError, match="does not exist on this machine"):
        check_local_devices_exist(("cpu", missing))
    with pytest.raises(ConfigError, match="does not exist on this machine"):
        check_local_devices_exist(("cuda:x",))
    check_local_devices_exist(("cpu", "cpu", f"1/{missing}"))  # node 1's GPUs are checked on node 1
