"""Bad generation requests are refused by name before any worker runs; denoise 0 is stock's no-op."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_xdit.config import ConfigError
from comfy_xdit.request_checks import all_finite, check_sample_request
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
        check_sample_request(dataclasses.replace(request(), **change))


@pytest.mark.parametrize("where", ["latent", "positive context", "positive pooled", "negative context"])
def test_nan_or_inf_inputs_are_refused(where):
    r = request()
    if where == "latent":
        r = dataclasses.replace(r, latent=nan_at(torch.randn_like(r.latent)))
    else:
        branch, field = where.split()
        cond = getattr(r, branch)
        r = dataclasses.replace(r, **{branch: dataclasses.replace(cond, **{field: nan_at(getattr(cond, field))})})
    with pytest.raises(ConfigError, match="NaN or infinite"):
        check_sample_request(r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_finite_check_finds_any_nan_or_infinity_and_passes_the_largest_finite_values(dtype):
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
    check_sample_request(request())


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
