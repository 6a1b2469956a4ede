"""Tensor parallelism on Flux and SD3 / SD3.5 gives the same latents as one worker, on about 1/N of the weights.

Tiny models (random weights, fixed seed), float32, gloo processes on the CPU. All cases of one
world size run in one process start (the machine has two cores): every rank returns its
latents, how many block parameters it holds, and what it read from the file.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_xdit.config import ConfigError, ParallelConfig
from comfy_xdit.engine import RankEngine
from comfy_xdit.loading.safetensors_files import SafetensorsSource
from comfy_xdit.mesh import ParallelMesh
from comfy_xdit.models.tensor_parallel import FLUX_PLAN, SD3_PLAN, param_shards
from comfy_xdit.requests import FluxConditioning, ModelSpec, SampleRequest, SD3Conditioning
from checkpoints import make_flux_diffusers_model, make_sd3_diffusers_model, write_bfl_file, write_diffusers_file, write_sd3_file
from distributed import cpu_engine, relative_error, run_on_ranks
from lora_files import random_flux_lora, write_bfl_lora
from test_step_cache import CACHES, sample_with_caches, skipped

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32

MODELS = {
    "flux": lambda: make_flux_diffusers_model(num_layers=2, num_single_layers=2, heads=4, head_dim=16, seed=0),
    "sd3": lambda: make_sd3_diffusers_model(num_layers=2, heads=4, head_dim=8, seed=0),
    "sd3.5-dual": lambda: make_sd3_diffusers_model(num_layers=2, heads=4, head_dim=8, dual_attention_layers=(0,),
                                                   qk_norm="rms_norm", seed=0),
}
FAMILY = {"flux": "flux", "sd3": "sd3", "sd3.5-dual": "sd3"}
PLAN = {"flux": FLUX_PLAN, "sd3": SD3_PLAN}


def request(arch: str, batch: int = 1) -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    if FAMILY[arch] == "flux":
        positive = FluxConditioning(torch.randn(1, 7, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
        negative = FluxConditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
        latent = torch.zeros(batch, 4, 10, 14)
    else:
        positive = SD3Conditioning(torch.randn(1, 9, 32, generator=g), torch.randn(1, 24, generator=g))
        negative = SD3Conditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g))
        latent = torch.zeros(batch, 16, 10, 14)
    return SampleRequest(latent, positive, negative, seed=42, steps=3, cfg=3.0)


def block_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "transformer_blocks." in n)


def generate(arch: str, config_kwargs: dict, batch: int, path: str | None = None) -> dict:
    """Latents of one case; the model comes from ``path`` (the loader) or is built whole and split."""
    engine = cpu_engine(config_kwargs)
    if path is None:
        engine.set_model(MODELS[arch](), ModelSpec("tiny", family=FAMILY[arch], dtype="float32"))
    else:
        engine.load(ModelSpec(path, family=FAMILY[arch], dtype="float32"))
    return {"latent": engine.sample(request(arch, batch)), "block_parameters": block_parameters(engine.model)}


def load_recording_reads(arch: str, path: str, degree: int) -> dict:
    """Load this rank's split model from the file, recording whole-tensor reads and the bytes of partial ones."""
    whole, part_bytes = [], {}
    original_get, original_part = SafetensorsSource.get, SafetensorsSource.get_part

    def get(self, key):
        whole.append(key)
        return original_get(self, key)

    def get_part(self, key, rows, cols=None):
        tensor = original_part(self, key, rows, cols)
        part_bytes[key] = part_bytes.get(key, 0) + tensor.numel() * tensor.element_size()
        return tensor

    SafetensorsSource.get, SafetensorsSource.get_part = get, get_part
    try:
        result = generate(arch, dict(tensor_parallel_degree=degree), 1, path)
    finally:
        SafetensorsSource.get, SafetensorsSource.get_part = original_get, original_part
    return {**result, "whole_reads": whole, "part_bytes": part_bytes}


def files(tmp_path) -> dict:
    return {
        "flux": str(write_bfl_file(MODELS["flux"](), tmp_path / "flux-bfl.safetensors")),
        "lora": str(write_bfl_lora(random_flux_lora(MODELS["flux"](), seed=3), tmp_path / "lora.safetensors")),
        "flux-diffusers": str(write_diffusers_file(MODELS["flux"](), tmp_path / "flux-diffusers.safetensors")),
        "sd3.5-dual": str(write_sd3_file(MODELS["sd3.5-dual"](), tmp_path / "sd35-sai.safetensors")),
    }


# world size -> case name -> (architecture, config, batch, file key or None)
CASES = {
    2: {
        "flux tp=2 (from a BFL file)": ("flux", dict(tensor_parallel_degree=2), 1, "flux"),
        "flux tp=2 (from a diffusers file)": ("flux", dict(tensor_parallel_degree=2), 1, "flux-diffusers"),
        "sd3 tp=2": ("sd3", dict(tensor_parallel_degree=2), 1, None),
        "sd3.5-dual tp=2 (from an SAI file)": ("sd3.5-dual", dict(tensor_parallel_degree=2), 1, "sd3.5-dual"),
    },
    4: {
        "flux tp=4": ("flux", dict(tensor_parallel_degree=4), 1, None),
        "flux tp=2 x cfg": ("flux", dict(tensor_parallel_degree=2, use_cfg_parallel=True), 1, None),
        "flux tp=2 x data=2": ("flux", dict(tensor_parallel_degree=2, data_parallel_degree=2), 2, None),
        "sd3.5-dual tp=4 (from an SAI file)": ("sd3.5-dual", dict(tensor_parallel_degree=4), 1, "sd3.5-dual"),
        "sd3 tp=2 x cfg": ("sd3", dict(tensor_parallel_degree=2, use_cfg_parallel=True), 1, None),
        "sd3.5-dual tp=2 x data=2": ("sd3.5-dual", dict(tensor_parallel_degree=2, data_parallel_degree=2), 2, None),
    },
}


def run_cases(world: int, paths: dict) -> dict:
    results = {name: generate(arch, config, batch, paths[key] if key else None)
               for name, (arch, config, batch, key) in CASES[world].items()}
    if world == 2:
        results["reads flux"] = load_recording_reads("flux", paths["flux"], 2)
        results["reads sd3.5-dual"] = load_recording_reads("sd3.5-dual", paths["sd3.5-dual"], 2)
        results["lora"] = with_lora_then_without(paths["flux"], paths["lora"])
        results["naive single-block proj_out"] = with_naive_single_block_split()
        results["step caches"] = sample_with_caches(dict(tensor_parallel_degree=2), 1, CACHES)
    return results


def with_lora_then_without(path: str | None, lora: str) -> list[torch.Tensor]:
    """Latents with a LoRA (Flux), then with it removed again, on one engine."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    degrees = dict(tensor_parallel_degree=world) if world > 1 else {}
    engine = RankEngine(ParallelMesh.build(ParallelConfig(devices=("cpu",) * world, **degrees), torch.device("cpu")))
    engine.load(ModelSpec(path, dtype="float32"))
    with_lora = engine.sample(dataclasses.replace(request("flux"), loras=((lora, 0.8),)))
    return [with_lora, engine.sample(request("flux"))]


def with_naive_single_block_split() -> torch.Tensor:
    """Flux at tp=2 with the single blocks' proj_out split as one plain block of inputs (a plausible bug:
    its input is cat(attention, MLP), each column-split on its own); the comparison must catch it."""
    from comfy_xdit.models import tensor_parallel

    naive = dataclasses.replace(FLUX_PLAN, packed_rowwise={},
                                rowwise=FLUX_PLAN.rowwise + ("single_transformer_blocks.*.proj_out",))
    tensor_parallel.PLANS["flux"] = naive
    try:
        return generate("flux", dict(tensor_parallel_degree=2), 1)["latent"]
    finally:
        tensor_parallel.PLANS["flux"] = FLUX_PLAN


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(arch: str, batch: int) -> torch.Tensor:
        if (arch, batch) not in cache:
            cache[(arch, batch)] = generate(arch, {}, batch)["latent"]
        return cache[(arch, batch)]

    return get


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return files(tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def results(paths):
    return {world: run_on_ranks(world, run_cases, world, paths) for world in CASES}


@pytest.mark.parametrize("world,name", [(w, n) for w in CASES for n in CASES[w]])
def test_tensor_parallel_equals_one_worker(world, name, results, reference):
    arch, _, batch, _ = CASES[world][name]
    expected = reference(arch, batch)
    for rank, rank_results in enumerate(results[world]):
        latent = rank_results[name]["latent"]
        assert latent.shape == expected.shape
        error = relative_error(latent, expected)
        print(f"{name}: rank {rank} relative error {error:.2e}")
        assert error < TOLERANCE, f"{name}: rank {rank} differs from one worker by {error:.2e}"


def replicated_block_parameters(model: torch.nn.Module, plan) -> int:
    """Block parameters tensor parallelism keeps whole: modulation linears, norms, row-parallel biases."""
    split = param_shards(model, plan, 1)
    return sum(p.numel() for n, p in model.named_parameters() if "transformer_blocks." in n and n not in split)


@pytest.mark.parametrize("world,name", [(w, n) for w in CASES for n in CASES[w] if "x" not in n.split("(")[0]])
def test_each_rank_holds_about_one_nth_of_the_block_weights(world, name, results):
    arch, config, _, _ = CASES[world][name]
    degree = config["tensor_parallel_degree"]
    whole = MODELS[arch]()
    total, replicated = block_parameters(whole), replicated_block_parameters(whole, PLAN[FAMILY[arch]])
    for rank_results in results[world]:
        held = rank_results[name]["block_parameters"]
        # exactly the split part's share plus what stays whole
        assert held == (total - replicated) // degree + replicated
        assert held <= total / degree + replicated


@pytest.mark.parametrize("arch", ["flux", "sd3.5-dual"])
def test_loading_reads_only_this_ranks_slices_of_the_split_weights(arch, results):
    whole = MODELS[arch]()
    split = param_shards(whole, PLAN[FAMILY[arch]], 1)
    split_bytes = sum(whole.state_dict()[n].numel() * 4 for n in split)
    for rank_results in results[2]:
        reads = rank_results[f"reads {arch}"]
        # The split weights were read in parts only (never a whole fused qkv / linear1 / MLP tensor) ...
        assert not set(reads["whole_reads"]) & set(reads["part_bytes"])
        fused = ("qkv.weight", "linear1.weight", "linear2.weight", "mlp.fc1.weight", "mlp.fc2.weight", "mlp.0.weight")
        assert not [k for k in reads["whole_reads"] if "blocks." in k and k.endswith(fused)]
        # ... and those parts add up to half of the split weights.
        assert sum(reads["part_bytes"].values()) == split_bytes // 2


def test_a_wrong_split_of_the_single_blocks_is_caught(results, reference):
    assert relative_error(results[2][0]["naive single-block proj_out"], reference("flux", 1)) > 100 * TOLERANCE


def test_step_caches_skip_the_same_steps_and_equal_one_worker_with_the_same_cache(results):
    # The hidden states are whole on every rank (all-reduced), so the cache decides on what one worker sees.
    expected = sample_with_caches({}, 1, CACHES)
    for rank_results in results[2]:
        for cache in CACHES:
            latents, decisions = rank_results["step caches"][cache.kind]
            want_latents, want_decisions = expected[cache.kind]
            assert skipped(decisions) == skipped(want_decisions) > 0
            assert [d[2] for d in decisions] == [d[2] for d in want_decisions]
            assert relative_error(latents, want_latents) < TOLERANCE


def test_a_lora_applies_to_the_slices_and_is_removed_again(results, paths, reference):
    expected_with, expected_without = with_lora_then_without(paths["flux"], paths["lora"])
    assert relative_error(expected_with, expected_without) > 1e-2  # the LoRA does change the result
    for rank_results in results[2]:
        with_lora, without = rank_results["lora"]
        assert relative_error(with_lora, expected_with) < TOLERANCE
        assert relative_error(without, reference("flux", 1)) < TOLERANCE


def test_invalid_tensor_parallel_settings_are_refused_with_what_to_change():
    with pytest.raises(ConfigError, match="tensor_parallel_degree=2 with ulysses_degree=2 is not supported; .*set ulysses_degree to 1"):
        ParallelConfig(tensor_parallel_degree=2, ulysses_degree=2, devices=("cpu",) * 4)
    with pytest.raises(ConfigError, match="with ulysses_degree=2 and pipefusion_parallel_degree=2 .*set ulysses_degree and "
                                          "pipefusion_parallel_degree to 1"):
        ParallelConfig(tensor_parallel_degree=2, ulysses_degree=2, pipefusion_parallel_degree=2, devices=("cpu",) * 8)
    with pytest.raises(ConfigError, match="tensor_parallel_degree=2 with ring_degree=2"):
        ParallelConfig(tensor_parallel_degree=2, ring_degree=2, devices=("cpu",) * 4)
    with pytest.raises(ConfigError, match="multiply to 4 workers .* x tensor=2"):
        ParallelConfig(tensor_parallel_degree=2, data_parallel_degree=2, devices=("cpu",) * 2)
    with pytest.raises(ConfigError, match="tensor_parallel_degree must be a whole number"):
        ParallelConfig(tensor_parallel_degree=0)
    config = ParallelConfig(tensor_parallel_degree=4, devices=("cpu",) * 4)
    with pytest.raises(ConfigError, match=r"tensor_parallel_degree=4 does not divide the 6 attention heads .*\[1, 2, 3, 6\]"):
        config.check_model(num_heads=6, family="Flux", num_blocks=2)
    assert ParallelConfig(tensor_parallel_degree=2, use_cfg_parallel=True, devices=("cpu",) * 4).mesh_shape == (1, 2, 1, 1, 1, 2, 1)


# --- through the worker pool and the command line -------------------------------------------------


@pytest.mark.timeout(180)
def test_pool_with_tensor_parallel_loads_slices_from_the_file_and_equals_one_worker(paths, reference):
    from comfy_xdit.pool import WorkerPool

    config = ParallelConfig(tensor_parallel_degree=2, devices=("cpu", "cpu"))
    with WorkerPool(config, job_timeout_s=60, start_timeout_s=120) as pool:
        pool.load(ModelSpec(paths["flux"], dtype="float32"))
        result = pool.sample(request("flux"))
    assert relative_error(result, reference("flux", 1)) < TOLERANCE


def test_command_line_tensor_parallel_flag():
    import argparse

    from comfy_xdit.cli import add_parallel_flags, config_from_flags

    parser = argparse.ArgumentParser()
    add_parallel_flags(parser)
    config = config_from_flags(parser.parse_args(["--tp", "2", "--use-cfg-parallel", "--devices", "cpu,cpu,cpu,cpu"]))
    assert (config.tensor_parallel_degree, config.cfg_degree, config.ulysses_degree) == (2, 2, 1)
    config = config_from_flags(parser.parse_args(["--tensor-parallel-degree", "2", "--devices", "cpu,cpu"]))
    assert (config.tensor_parallel_degree, config.ulysses_degree) == (2, 1)
    with pytest.raises(ConfigError, match="tensor_parallel_degree=2 with ulysses_degree=2 is not supported"):
        config_from_flags(parser.parse_args(["--tp", "2", "--ulysses-degree", "2", "--devices", "cpu,cpu,cpu,cpu"]))


def test_loader_node_degrees_include_tensor_parallel():
    from comfy_xdit.bridge import make_config

    config = make_config(ulysses_degree=0, ring_degree=1, use_cfg_parallel=False, data_parallel_degree=1,
                         pipefusion_parallel_degree=1, attention_backend="auto", devices="cpu,cpu",
                         tensor_parallel_degree=2)
    assert (config.tensor_parallel_degree, config.ulysses_degree, config.world_size) == (2, 1, 2)


def test_bench_has_a_tensor_parallel_group():
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench"
    modules = {}
    for name in ("run", "flux_loop"):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    launches = {name: (nproc, args) for name, nproc, args in modules["run"].launches("flux-tp")}
    assert launches["ours-t2"] == (2, ["--impl", "ours", "--degrees", "t2"])
    assert {"1gpu", "ours-u2", "ours-p2"} <= set(launches)
    assert launches["diffusers-t2"][1][:4] == ["--impl", "diffusers-tp", "--degrees", "t2"]
    assert modules["flux_loop"].parse_degrees("t2") == (1, 1, 1, 2, 1)
    assert modules["flux_loop"].parse_degrees("u2") == (2, 1, 1, 1, 1)
