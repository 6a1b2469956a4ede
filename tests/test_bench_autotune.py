"""bench/flux_loop.py --compile-autotune and the flux-autotune group: inductor's GEMM autotuning
joins the engine's compile options instead of replacing them, every compiled row of a launch gets
it, the group times the same row with and without, and the table says which rows were autotuned."""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.models.flux_overlap import SINK_WAITS
from test_bench_peers import bench_module


def test_autotuning_joins_the_overlaps_options():
    loop = bench_module("flux_loop")
    plain, tuned_args = (loop.build_parser().parse_args(["--compile", *extra]) for extra in ([], ["--compile-autotune"]))
    cpu = torch.device("cpu")
    u2 = [(2, 1, 1, 1, 1)]
    assert loop.repeated_block_compile_options(plain, ["ours"], u2, cpu) == {"options": SINK_WAITS}
    tuned = loop.repeated_block_compile_options(tuned_args, ["ours"], u2, cpu)
    # a mode (max-autotune-no-cudagraphs) could not be passed beside the options the overlaps need
    assert tuned == {"options": {**SINK_WAITS, "max_autotune": True, "coordinate_descent_tuning": True}}
    one_gpu = loop.repeated_block_compile_options(tuned_args, ["diffusers", "ours"], [(1, 1, 1, 1, 1)], cpu)
    assert one_gpu == {"options": loop.AUTOTUNE_OPTIONS}  # diffusers and ours alike
    assert loop.repeated_block_compile_options(plain, ["diffusers"], [(1, 1, 1, 1, 1)], cpu) == {}


@pytest.mark.parametrize("argv", [
    ["--compile-autotune", "--impl", "ours"],  # nothing compiled
    ["--compile", "--compile-autotune", "--impl", "xdit"],  # xfuser compiles its own way
])
def test_autotuning_is_refused_where_it_would_not_apply(argv):
    loop = bench_module("flux_loop")
    with pytest.raises(SystemExit, match="--compile-autotune: with --compile"):
        loop.main(["--device", "cpu", "--tiny", *argv])


def test_autotune_group_pairs_each_row_and_the_table_says_so():
    run = bench_module("run")
    launches = {name: (nproc, args) for name, nproc, args in run.launches("flux-autotune")}
    assert set(launches) == {"ours-u2-compiled-graphs", "ours-u2-compiled-graphs-autotune"}
    nproc, args = launches["ours-u2-compiled-graphs"]
    assert nproc == 2 and "--compile" in args and "--compile-autotune" not in args
    assert launches["ours-u2-compiled-graphs-autotune"] == (2, [*args, "--compile-autotune"])
    row = dict(impl="ours", median_s=2.0, times=[2.0], compiled=True, compile_autotune=True, cuda_graphs=True, gpus=2,
               ulysses=2, ring=1, tflops_per_gpu=1.0, peak_gib_per_rank=[1.0, 1.0],
               ulysses_overlaps="head-chunks=2 overlap-mlp")
    assert "ulysses=2, compiled (GEMMs autotuned) + CUDA graphs, overlaps" in run.table([row])
    assert "autotuned" not in run.table([{**row, "compile_autotune": False}])
