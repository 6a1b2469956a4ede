"""The flux-2gpu-peers bench group: diffusers' own context parallelism (bench/flux_loop.py's
diffusers-cp rows) gives the one-GPU loop's latents on the tiny Flux over two gloo ranks, the
launch writes rows that say so, and the table names the peer rows and their xDiT ratios."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import torch

from distributed import free_port, relative_error, run_on_ranks

BENCH = Path(__file__).resolve().parent.parent / "bench"
TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args() -> Namespace:
    # What flux_loop.main sets for --tiny: a 64x64 image (16 image tokens), 8 text tokens.
    return Namespace(height=64, width=64, text_len=8, seed=0)


def one_gpu_latents(steps: int) -> torch.Tensor:
    from diffusers import FluxTransformer2DModel

    loop = bench_module("flux_loop")
    args, device = tiny_args(), torch.device("cpu")
    model = loop.build_model(FluxTransformer2DModel, loop.TINY_CONFIG, device, torch.float32, args.seed)
    inputs = loop.make_inputs(args, loop.TINY_CONFIG, device, torch.float32)
    return loop.DiffusersLoop(model, args, inputs, device, torch.float32)(steps)


def context_parallel_latents(steps: int) -> tuple[torch.Tensor, list[int]]:
    """On this rank: the tiny Flux with diffusers' context parallelism at ulysses=2, as the bench
    enables it; the final latents and the token counts its first block saw (the split's evidence)."""
    from diffusers import FluxTransformer2DModel

    loop = bench_module("flux_loop")
    args, device = tiny_args(), torch.device("cpu")
    model = loop.build_model(FluxTransformer2DModel, loop.TINY_CONFIG, device, torch.float32, args.seed)
    model.set_attention_backend(loop.DIFFUSERS_CP_BACKENDS["cpu"])
    loop.enable_diffusers_context_parallel(model, (2, 1, 1, 1, 1), device)
    seen = []
    model.transformer_blocks[0].register_forward_pre_hook(
        lambda module, a, kw: seen.append(kw["hidden_states"].shape[1]), with_kwargs=True)
    inputs = loop.make_inputs(args, loop.TINY_CONFIG, device, torch.float32)
    latents = loop.DiffusersLoop(model, args, inputs, device, torch.float32)(steps)
    return latents, seen


def test_diffusers_context_parallel_ulysses_matches_one_gpu():
    results = run_on_ranks(2, context_parallel_latents, 2)
    reference = one_gpu_latents(2)
    for latents, seen in results:
        # Each rank's blocks saw half of the 16 image tokens: the model really ran split.
        assert seen == [8, 8]
        assert latents.shape == reference.shape
        assert relative_error(latents, reference) < TOLERANCE
    assert torch.equal(results[0][0], results[1][0])


def test_diffusers_cp_launch_writes_rows_checked_against_one_gpu(tmp_path):
    """torchrun of the bench's diffusers-cp launch at ulysses=2, eager, on the CPU: one row with the
    impl, degrees, backend and the final latents' relative difference from the same model on 1 GPU."""
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(BENCH / "flux_loop.py"), "--device", "cpu", "--tiny", "--impl", "diffusers-cp", "--degrees", "u2",
           "--steps", "2", "--runs", "1", "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["impl"], row["ulysses"], row["ring"], row["gpus"], row["compiled"]) == ("diffusers-cp", 2, 1, 2, False)
    assert row["attention_backend"] == "native"
    assert row["vs_1gpu_rel"] < TOLERANCE


def test_diffusers_cp_refuses_ring_on_cpu_and_runs_alone():
    import pytest

    loop = bench_module("flux_loop")
    with pytest.raises(SystemExit, match="ring degrees need GPUs"):
        loop.enable_diffusers_context_parallel(torch.nn.Linear(1, 1), (1, 2, 1, 1, 1), torch.device("cpu"))
    with pytest.raises(SystemExit, match="diffusers-cp: run it alone"):
        loop.main(["--device", "cpu", "--tiny", "--impl", "diffusers-cp,ours"])


def test_peers_group_launches_and_table():
    run = bench_module("run")
    launches = {name: (nproc, args) for name, nproc, args in run.launches("flux-2gpu-peers")}
    assert launches["1gpu"] == (1, ["--impl", "diffusers,ours", "--compile", "--eager-baseline", "--interleave", "--runs", "3"])
    assert launches["diffusers-cp-u2"][0] == 2 and launches["xdit-u2"][0] == 2
    for name in ("diffusers-cp-u2", "xdit-u2"):
        assert {"--compile", "--eager-baseline"} <= set(launches[name][1])
    assert "--compile" in launches["ours-u2-compiled-graphs"][1]
    assert "--compile" not in launches["ours-u2-graphs"][1] and "--cuda-graphs" in launches["ours-u2-graphs"][1]
    assert all(args[args.index("--runs") + 1] == "3" for _, args in launches.values())

    def row(impl, median, compiled=False, gpus=2, **extra):
        return dict(impl=impl, median_s=median, times=[median], compiled=compiled, gpus=gpus, ulysses=gpus, ring=1,
                    tflops_per_gpu=1.0, peak_gib_per_rank=[1.0] * gpus, **extra)

    rows = [row("diffusers", 5.0, gpus=1), row("xdit", 4.0), row("xdit", 2.5, compiled=True,
            xfuser_compile_mode="reduce-overhead"), row("diffusers-cp", 4.0, attention_backend="_native_cudnn",
            vs_1gpu_rel=3e-3), row("diffusers-cp", 2.0, compiled=True, attention_backend="_native_cudnn"),
            row("ours", 2.0, compiled=True, cuda_graphs=True, ulysses_overlaps="head-chunks=2 overlap-mlp")]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in run.table(rows).splitlines()[2:]}
    name = "diffusers context parallel, 2 GPUs, ulysses=2, compiled, attention _native_cudnn"
    assert name in lines and lines[name].split(" | ")[4] == "0.800"  # against xDiT compiled
    ours = "ours (RankEngine), 2 GPUs, ulysses=2, compiled + CUDA graphs, overlaps: 2 head chunks + MLP"
    assert lines[ours].split(" | ")[4] == "0.800"
    eager_cp = "diffusers context parallel, 2 GPUs, ulysses=2, eager, attention _native_cudnn, latents vs 1 GPU rel. diff. 3.0e-03"
    assert lines[eager_cp].split(" | ")[4] == "1.000"  # against xDiT eager
    assert "xDiT (xfuser), 2 GPUs, ulysses=2, compiled (xfuser's compile: whole transformer, mode reduce-overhead)" in lines


def test_table_names_the_ulysses_overlaps():
    run = bench_module("run")
    base = dict(impl="ours", gpus=2, ulysses=2, ring=1)
    assert run.ulysses_overlaps({**base, "ulysses_overlaps": "head-chunks=3 overlap-mlp"}) == "overlaps: 3 head chunks + MLP"
    assert run.ulysses_overlaps({**base, "ulysses_overlaps": ""}) == "no overlaps"
    # rows written before the label (runs P and Q) carry the two settings instead
    assert run.ulysses_overlaps({**base, "ulysses_overlap_mlp": True}) == "overlaps: MLP"
    assert run.ulysses_overlaps({**base, "ulysses_head_chunks": 2}) == "overlaps: 2 head chunks"
    assert run.ulysses_overlaps(base) == "no overlaps"
