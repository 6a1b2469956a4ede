"""PipeFusion keeps its K/V caches (and the CUDA graphs captured against them) from job to job.

The caches are named by branch slot and kept while their shape holds, so that a pass captured as
a CUDA graph in one job replays in the next. These tests check that keeping them changes nothing:
a run of different jobs on one engine gives exactly what a fresh engine gives for each job (the
first evaluation of each branch in a job overwrites the whole cache before anything reads it),
through a new latent size (the cache is reallocated) and a CFG job after a no-CFG one (a second
slot). Tiny Flux, float32, gloo processes on the CPU, where cuda_graphs is accepted and a no-op.
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.config import ConfigError
from comfy_xdit.engine import RankEngine
from comfy_xdit.pipefusion.attention import KVCacheStore
from comfy_xdit.requests import FluxConditioning, ModelSpec, SampleRequest
from distributed import cpu_engine, relative_error, run_on_ranks
from test_pipefusion import pipefusion_flux

# No warmup step, 2 patches: only the rule "each branch's first evaluation in a job is a
# whole-image pass" stands between a job and the previous job's cached K/V, and every later
# evaluation reads stale K/V from the cache.
CONFIG = dict(pipefusion_parallel_degree=2, num_pipeline_patches=2, warmup_steps=0)

# (latent height, width, noise seed, prompt seed, prompt tokens, cfg) of each job, in order.
JOBS = [
    (12, 14, 42, 1, 7, 1.0),
    (12, 14, 7, 2, 6, 1.0),  # same size: the cache is kept; new noise and a prompt of another length
    (16, 14, 3, 3, 7, 1.0),  # another size: the cache is reallocated
    (16, 14, 5, 4, 7, 2.0),  # CFG: the first branch keeps slot 0's cache, the second gets slot 1
]


def job_request(height: int, width: int, seed: int, prompt_seed: int, tokens: int, cfg: float) -> SampleRequest:
    g = torch.Generator().manual_seed(prompt_seed)
    positive = FluxConditioning(torch.randn(1, tokens, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    negative = FluxConditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    return SampleRequest(torch.zeros(1, 4, height, width), positive, negative if cfg != 1.0 else None,
                         seed=seed, steps=3, cfg=cfg)


def pipefusion_engine(**spec) -> RankEngine:
    engine = cpu_engine(CONFIG)
    engine.set_model(pipefusion_flux(), ModelSpec("tiny", dtype="float32", **spec))
    return engine


def jobs_on_one_engine_and_on_fresh_ones() -> dict:
    kept = pipefusion_engine(cuda_graphs=True)  # accepted with PipeFusion; on the CPU it changes nothing
    store = kept._denoiser.kv_store
    results, caches = [], []
    for job in JOBS:
        request = job_request(*job)
        shared = kept.sample(request)
        fresh = pipefusion_engine().sample(request)
        results.append((shared, fresh))
        caches.append(dict(store.caches))
    try:
        pipefusion_engine(compile=True)
        refusal = None
    except ConfigError as error:
        refusal = str(error)
    return dict(
        results=results,
        graphs_on=kept._denoiser.use_cuda_graphs,
        # Which cache tensors are the same objects as after the job before (kept, not reallocated).
        kept_after=[{slot: before.get(slot) is cache for slot, cache in after.items()}
                    for before, after in zip(caches, caches[1:])],
        refusal=refusal,
    )


@pytest.fixture(scope="module")
def jobs():
    return run_on_ranks(2, jobs_on_one_engine_and_on_fresh_ones)


def test_consecutive_jobs_on_one_pipefusion_engine_equal_fresh_engines(jobs):
    for rank, outcome in enumerate(jobs):
        for job, (shared, fresh) in zip(JOBS, outcome["results"]):
            print(f"rank {rank}, job {job}: {relative_error(shared, fresh):.2e} from a fresh engine")
            assert torch.equal(shared, fresh), f"rank {rank}, job {job}: kept caches changed the result"
        # The caches really were kept across jobs of one shape and reallocated on a new one, so
        # the equality above covers kept caches holding the previous job's values.
        assert outcome["kept_after"] == [{0: True}, {0: False}, {0: True, 1: False}]
    assert torch.equal(jobs[0]["results"][-1][0], jobs[1]["results"][-1][0]), "both stages return the same latents"


def test_cuda_graphs_are_accepted_with_pipefusion_and_a_no_op_on_the_cpu_but_compile_is_refused(jobs):
    for outcome in jobs:
        assert outcome["graphs_on"] is False
        assert "compile with pipefusion_parallel_degree > 1 is not supported" in outcome["refusal"]
        assert "turn the loader's compile off" in outcome["refusal"]


def test_cache_store_keeps_a_slot_while_its_shape_holds_and_drops_its_graphs_when_it_reallocates():
    store = KVCacheStore(layers=3)
    with pytest.raises(RuntimeError, match="before its K/V cache was allocated"):
        store.graph_for((0, 0, 21, 42, True), object)
    assert store.ensure(0, (1, 42, 2, 8), torch.float32, torch.device("cpu"))
    assert store.ensure(1, (1, 42, 2, 8), torch.float32, torch.device("cpu"))
    keys, values = store.layer(0, 2)
    assert keys.shape == values.shape == (1, 42, 2, 8)
    keys.fill_(1.0)
    assert store.caches[0][2, 0].eq(1.0).all() and store.caches[0][2, 1].data_ptr() == values.data_ptr()

    patch = store.graph_for((0, 0, 21, 42, True), object)
    assert store.graph_for((0, 0, 21, 42, True), object) is patch  # made once, then reused
    other_slot = store.graph_for((1, 0, 21, 42, True), object)
    cache = store.caches[0]
    assert not store.ensure(0, (1, 42, 2, 8), torch.float32, torch.device("cpu"))  # same shape: kept
    assert store.caches[0] is cache and store.graphs[(0, 0, 21, 42, True)] is patch

    # A new shape (or dtype) reallocates slot 0 and drops exactly slot 0's graphs.
    assert store.ensure(0, (1, 56, 2, 8), torch.float32, torch.device("cpu"))
    assert store.caches[0].shape == (3, 2, 1, 56, 2, 8)
    assert list(store.graphs) == [(1, 0, 21, 42, True)] and store.graphs[(1, 0, 21, 42, True)] is other_slot
    assert store.ensure(1, (1, 42, 2, 8), torch.float64, torch.device("cpu"))
    assert store.graphs == {}


def test_bench_has_a_pipefusion_graphs_group_with_its_baselines():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    spec = importlib.util.spec_from_file_location("bench_run", path)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    launches = {name: (nproc, args) for name, nproc, args in run.launches("flux-pipefusion-graphs")}
    assert launches["1gpu"] == (1, ["--impl", "diffusers,ours", "--runs", "3"])
    # measured with the parameter split (runs O, P), before "auto" made Flux-dev's default interleaved
    parameters = ["--pipefusion-split", "parameters"]
    assert launches["ours-p2"] == (2, ["--impl", "ours", "--degrees", "p2", *parameters, "--runs", "3"])
    assert launches["ours-p2-graphs"] == (2, ["--impl", "ours", "--degrees", "p2", *parameters, "--cuda-graphs", "--runs", "3"])
    assert "--pipeline-patches" in launches["ours-p2-graphs-4patches"][1]
    assert launches["ours-1gpu-graphs"][0] == 1 and "--cuda-graphs" in launches["ours-1gpu-graphs"][1]
    assert launches["ours-p2-graphs-compute-split"] == (2, ["--impl", "ours", "--degrees", "p2", "--cuda-graphs",
                                                            "--pipefusion-split", "compute", "--runs", "3"])
    # The table names the split, except the parameter split (rows recorded before the split existed).
    row = dict(impl="ours", gpus=2, ulysses=1, ring=1, pipefusion=2, pipefusion_warmup=1, pipeline_patches=2, cuda_graphs=True)
    assert "pipefusion=2 (warmup 1, 2 patches)" in run.row_name(row)
    assert "pipefusion=2 (warmup 1, 2 patches, compute split)" in run.row_name(dict(row, pipefusion_split="compute"))
    assert run.row_name(dict(row, pipefusion_split="parameters")) == run.row_name(row)
    assert "pipefusion=2 (warmup 1, 2 patches, interleaved split)" in run.row_name(dict(row, pipefusion_split="interleaved"))
    interleaved = {name: (nproc, args) for name, nproc, args in run.launches("flux-pipefusion-interleaved")}
    assert interleaved["1gpu"] == launches["1gpu"]
    assert interleaved["ours-p2-graphs-compute-split"] == launches["ours-p2-graphs-compute-split"]
    assert interleaved["ours-p2-graphs-interleaved"] == (2, ["--impl", "ours", "--degrees", "p2", "--cuda-graphs",
                                                             "--pipefusion-split", "interleaved", "--runs", "3"])
    assert interleaved["ours-p2-graphs-interleaved-4patches"][1][-2:] == ["--pipeline-patches", "4"]
