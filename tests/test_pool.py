"""The persistent worker pool keeps its reliability contract (DESIGN.md) with the real engine.

Two CPU workers joined by gloo (ulysses=2) share one warm pool across the tests that allow it;
tests that break the pool rely on it restarting by itself on the next job. Every result is
compared with the engine run in this process on one rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import psutil
import pytest
import torch

from comfy_xdit.config import ConfigError, ParallelConfig
from comfy_xdit.loading import CheckpointError
from comfy_xdit.pool import PoolError, PoolRegistry, WorkerPool
from comfy_xdit.pool import protocol, shm
from comfy_xdit.pool.host import log_dir_owner
from comfy_xdit.requests import FluxConditioning, ModelSpec, SampleRequest, SamplingCancelled
from checkpoints import make_flux_diffusers_model, write_diffusers_folder
from distributed import cpu_engine, relative_error

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
CONFIG = ParallelConfig(ulysses_degree=2, devices=("cpu", "cpu"))
REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


def make_request(steps: int = 4, size: int = 16, seed: int = 7) -> SampleRequest:
    # 256 text tokens, as Flux's T5 gives: large enough to travel through shared memory.
    g = torch.Generator().manual_seed(3)
    positive = FluxConditioning(torch.randn(1, 256, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    return SampleRequest(torch.zeros(1, 16, size, size), positive, None, seed=seed, steps=steps)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> ModelSpec:
    path = write_diffusers_folder(make_flux_diffusers_model(), tmp_path_factory.mktemp("pool") / "flux")
    return ModelSpec(str(path), family="flux", dtype="float32")


@pytest.fixture(scope="module")
def reference(spec):
    """The engine on one rank in this process: what every pool job must reproduce."""
    engine = cpu_engine()
    engine.load(spec)
    cache: dict = {}

    def run(steps: int = 4, size: int = 16) -> torch.Tensor:
        if (steps, size) not in cache:
            cache[(steps, size)] = engine.sample(make_request(steps, size))
        return cache[(steps, size)]

    return run


@pytest.fixture(scope="module")
def pool(spec):
    with WorkerPool(CONFIG, job_timeout_s=60, start_timeout_s=120) as pool:
        pool.load(spec)
        yield pool
        log_dir = Path(pool.status()["log_dir"])
        pids = pool.status()["pids"]
    # named after its host, so a folder a killed host left behind says whose logs it holds
    assert log_dir_owner(log_dir) == os.getpid(), log_dir.name
    assert not any(alive(pid) for pid in pids), "close() left workers running"
    assert not log_dir.exists(), "close() left the temporary log folder"
    assert shm.our_segments(os.getpid()) == [], "shared memory segments leaked"


def test_bad_config_is_refused_before_any_process_starts():
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ConfigError, match="multiply to 2 workers"):
        ParallelConfig(ulysses_degree=2, devices=("cpu",))
    with pytest.raises(ConfigError, match="cuda:99"):
        WorkerPool(ParallelConfig(ulysses_degree=2, devices=("cuda:98", "cuda:99")))
    with pytest.raises(ConfigError, match="ParallelConfig"):
        WorkerPool({"ulysses_degree": 2})
    assert {p.pid for p in psutil.Process().children(recursive=True)} == children


def test_warm_pool_loads_once_and_samples_repeatedly(pool, spec, reference):
    pids = pool.status()["pids"]
    assert pool.load(spec) is False  # the fixture loaded it already
    first = pool.sample(make_request())
    second = pool.sample(make_request())
    status = pool.status()
    assert status["load_count"] == 1 and status["model_loaded"]
    assert status["pids"] == pids and all(w["alive"] for w in status["workers"])
    assert status["last_job"]["steps"] == 4 and status["last_job"]["seconds_per_step"] > 0
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.equal(first, second)
    assert relative_error(first, reference()) <= TOLERANCE


def only_the_arenas_remain(pool) -> bool:
    """No segment of a single job is left: only the pool's two reused arenas (input, output)."""
    arenas = pool.status()["shared_memory"]
    return len(arenas) <= 2 and set(shm.our_segments(os.getpid())) == set(arenas)


def spy_on_results(monkeypatch) -> list:
    results = []
    take = shm.HostArenas.take
    monkeypatch.setattr(shm.HostArenas, "take", lambda self, value: results.append(value) or take(self, value))
    return results


def test_inputs_and_result_travel_through_shared_memory_arenas_reused_across_jobs(pool, reference, monkeypatch):
    during, progress = [], []

    def on_step(step, total, preview):
        progress.append((step, total, None if preview is None else tuple(preview.shape)))
        during.extend(shm.our_segments(os.getpid()))

    results = spy_on_results(monkeypatch)
    request = make_request()
    request.preview_every = 2
    out = pool.sample(request, on_step=on_step)
    assert progress == [(1, 4, None), (2, 4, (1, 16, 16, 16)), (3, 4, None), (4, 4, (1, 16, 16, 16))]
    assert any(name.endswith("i") for name in during), "the request's tensors were pickled, not shared"
    assert isinstance(results[0], shm.TensorRef), "the result was pickled, not shared"
    arenas = pool.status()["shared_memory"]
    assert results[0].segment in arenas, "the result did not come through the output arena"
    assert only_the_arenas_remain(pool)
    assert relative_error(out, reference()) <= TOLERANCE

    # The next job reuses both arenas: no new segment, and the result is the caller's own.
    again = pool.sample(make_request())
    assert pool.status()["shared_memory"] == arenas and results[1].segment == results[0].segment
    assert torch.equal(again, out) and again.data_ptr() != out.data_ptr()
    again.fill_(0)  # must not touch the next job's result
    assert relative_error(pool.sample(make_request()), reference()) <= TOLERANCE

    # A request that needs more room gets a bigger input arena under a new name; the old one goes.
    big = make_request()
    big.extra["ballast"] = torch.randn((shm.Arena.GRANULE * 3) // 4)  # 3 MiB, ignored by the engine
    assert relative_error(pool.sample(big), reference()) <= TOLERANCE
    grown = pool.status()["shared_memory"]
    assert grown[0] != arenas[0] and grown[1] == arenas[1], (arenas, grown)
    assert only_the_arenas_remain(pool)
    assert relative_error(pool.sample(make_request()), reference()) <= TOLERANCE
    assert pool.status()["shared_memory"] == grown


def test_a_result_too_big_for_the_output_arena_spills_and_the_arena_grows(pool, reference, monkeypatch):
    from comfy_xdit.pool import host

    results = spy_on_results(monkeypatch)
    monkeypatch.setattr(shm.Arena, "GRANULE", 4096)
    monkeypatch.setattr(host, "_result_bytes_estimate", lambda kind, request: 0)
    pool._arenas.output.release()  # the next job gets a 4 KiB output arena: too small
    pool._arenas._result_bytes = 0
    assert relative_error(pool.sample(make_request()), reference()) <= TOLERANCE
    assert results[0].segment.endswith("r"), results[0]  # a one-off segment...
    assert only_the_arenas_remain(pool)  # ...that the host unlinked
    assert relative_error(pool.sample(make_request()), reference()) <= TOLERANCE
    assert results[1].segment == pool.status()["shared_memory"][1]  # the arena grew to fit it
    assert only_the_arenas_remain(pool)


def test_a_warm_job_adds_little_over_the_sampling(pool):
    overheads, breakdowns = [], []
    for _ in range(5):
        pool.sample(make_request(steps=2))
        overheads.append(pool.status()["last_job"]["overhead_seconds"])
        breakdowns.append(pool.status()["last_job"]["overhead_ms"])
    print(f"pool overhead per job (s): {overheads}; the quickest's breakdown (ms): {breakdowns[overheads.index(min(overheads))]}")
    assert min(overheads) < 0.05


def test_bad_input_comes_back_as_its_own_error_and_the_pool_stays_warm(pool, spec, tmp_path, reference):
    pids = pool.status()["pids"]
    with pytest.raises(CheckpointError) as error:
        pool.load(ModelSpec(str(tmp_path / "missing.safetensors"), dtype="float32"))
    assert "missing.safetensors" in str(error.value)
    bad = make_request()
    bad.latent = torch.ones(1, 7, 16, 16)  # neither the model's channels nor an empty latent
    with pytest.raises(ValueError, match="7 channels"):
        pool.sample(bad)
    bad.latent = torch.zeros(1, 16, 16, 16)
    bad.latent[0, 3, 5, 7] = float("inf")  # refused by every rank on its device, not on the host
    with pytest.raises(ConfigError, match="the latent contains 1 NaN or infinite"):
        pool.sample(bad)
    assert pool.status()["state"] == "running" and pool.status()["pids"] == pids
    assert relative_error(pool.sample(make_request()), reference()) <= TOLERANCE


def test_cancel_stops_every_rank_after_the_same_step_and_keeps_the_pool_warm(pool, reference):
    pids = pool.status()["pids"]
    cancel = threading.Event()

    def on_step(step, total, preview):
        if step == 3:
            cancel.set()

    with pytest.raises(SamplingCancelled) as stopped:
        pool.sample(make_request(steps=20, size=64), on_step=on_step, cancel_event=cancel)
    steps = stopped.value.rank_steps
    assert set(steps) == {0, 1} and len(set(steps.values())) == 1, steps
    # The request reaches the workers asynchronously (progress to the host, the host's cancel
    # back to every rank, one vote per step), so on a loaded 2-core machine a step or two more
    # may finish first (CI once stopped after step 5 with 48x48 latents); all ranks stop after
    # the same step, long before the 20th.
    assert 3 <= stopped.value.step <= 6
    assert pool.status()["last_job"]["outcome"] == "cancelled"
    assert pool.status()["pids"] == pids
    assert relative_error(pool.sample(make_request()), reference()) <= TOLERANCE
    assert only_the_arenas_remain(pool)


def test_an_exception_in_on_step_cancels_the_job_and_propagates(pool, reference):
    class Interrupted(Exception):
        pass

    def on_step(step, total, preview):
        if step == 2:
            raise Interrupted()

    with pytest.raises(Interrupted):
        pool.sample(make_request(steps=20, size=48), on_step=on_step)
    assert pool.status()["state"] == "running"
    assert relative_error(pool.sample(make_request()), reference()) <= TOLERANCE


def test_a_worker_killed_mid_job_fails_fast_and_the_next_job_gets_a_fresh_pool(pool, reference):
    old_pids = pool.status()["pids"]
    started = []

    def on_step(step, total, preview):
        if step == 2 and not started:
            started.append(time.monotonic())
            os.kill(old_pids[1], signal.SIGKILL)

    with pytest.raises(PoolError) as error:
        pool.sample(make_request(steps=20, size=48), on_step=on_step)
    assert time.monotonic() - started[0] < 10
    message = str(error.value)
    assert "rank 1" in message and "SIGKILL" in message and "worker-1" in message, message
    assert pool.status()["state"] == "broken"
    assert not any(alive(pid) for pid in old_pids)
    assert only_the_arenas_remain(pool)

    out = pool.sample(make_request())  # restarts the workers and reloads the model by itself
    status = pool.status()
    assert status["state"] == "running" and set(status["pids"]).isdisjoint(old_pids)
    assert relative_error(out, reference()) <= TOLERANCE


def test_a_hung_worker_is_reported_after_the_job_timeout(pool, reference):
    old_pids = pool.status()["pids"]
    frozen = []

    def on_step(step, total, preview):
        if step == 2 and not frozen:
            frozen.append(time.monotonic())
            os.kill(old_pids[1], signal.SIGSTOP)  # alive but silent: a hang, not a death

    pool.job_timeout_s = 2.0
    try:
        with pytest.raises(PoolError, match="no progress for 2 s") as error:
            pool.sample(make_request(steps=20, size=48), on_step=on_step)
    finally:
        pool.job_timeout_s = 60.0
    assert time.monotonic() - frozen[0] < 10
    assert "worker-1" in str(error.value)
    assert not any(alive(pid) for pid in old_pids)
    assert relative_error(pool.sample(make_request()), reference()) <= TOLERANCE


def test_registry_keeps_one_warm_pool_per_device_set(spec):
    registry = PoolRegistry(job_timeout_s=60)
    try:
        one = ParallelConfig(devices=("cpu",))
        pool = registry.get(one)
        assert registry.get(one) is pool
        pool.load(spec)
        pid = pool.status()["pids"][0]
        os.kill(pid, signal.SIGKILL)  # dies between jobs, as under the OOM killer
        assert wait_until(lambda: not pool.status()["workers"][0]["alive"], 10)
        again = registry.get(one)  # the same pool, restarted; the model reloads by itself
        assert again is pool and again.status()["state"] == "running" and again.status()["pids"] != [pid]
        assert again.sample(make_request(steps=1)).shape == (1, 16, 16, 16)
        other = registry.get(ParallelConfig(devices=("cpu",), attention_backend="sdpa"))
        assert other is not pool and pool.status()["state"] == "closed"  # same device: replaced
    finally:
        registry.close_all()


@pytest.fixture
def in_process_worker(monkeypatch):
    """Host and worker sides in one process: the worker must not untrack the host's segments."""
    if not shm.SHM_SUPPORTED:
        pytest.skip("no POSIX shared memory")
    monkeypatch.setattr(shm, "_untrack", lambda segment: None)


@pytest.mark.parametrize("copy_inputs", [True, False])
def test_arenas_carry_any_tensor_and_workers_follow_a_grown_arena(in_process_worker, copy_inputs):
    host, worker = shm.HostArenas(shm.new_token()), shm.WorkerMappings(copy_inputs=copy_inputs)
    try:
        base = torch.randn(64, 96)
        shared = torch.randn(8192)
        payload = {
            "strided": base.t(),  # not contiguous
            "half": torch.randn(4096, 3).to(torch.bfloat16),
            "mask": torch.rand(1, 20000) > 0.5,
            "twice": [shared, shared],
            "small": torch.ones(3),  # inline
        }
        packed, name = host.pack(payload)
        assert isinstance(packed["strided"], shm.TensorRef) and isinstance(packed["small"], torch.Tensor)
        assert packed["twice"][0] == packed["twice"][1]  # one copy of a tensor that appears twice
        got = worker.unpack(packed, name)
        for key in ("strided", "half", "mask"):
            assert got[key].dtype == payload[key].dtype and torch.equal(got[key], payload[key]), key
        assert torch.equal(got["twice"][1], shared) and torch.equal(got["small"], payload["small"])
        assert worker.mapped() == [name]

        # The next job overwrites the arena: the worker's tensors are valid for one job only.
        keep = got["twice"][0]
        owned = worker.unpack(packed, name, keep=True)["twice"][0]
        del got
        packed, same = host.pack({**payload, "twice": [torch.zeros(8192)] * 2})  # the same layout
        assert same == name
        # A private copy lasts until the worker unpacks the next job; a view sees the new job at once.
        assert torch.equal(keep, shared) == copy_inputs
        assert torch.equal(owned, shared)
        worker.keep_only(same)

        # A bigger job gets a new arena; the worker maps it and lets the old one go, even while
        # a tensor of an old job (kept by mistake) still views it.
        big = torch.randn(shm.Arena.GRANULE)  # 4 MiB
        packed, grown = host.pack({"big": big})
        assert grown != name and host.names() == [grown]
        assert name not in shm.our_segments(os.getpid())  # unlinked by the host; still mapped here
        worker.keep_only(grown)
        assert torch.equal(worker.unpack(packed, grown)["big"], big)
        assert worker.mapped() == [grown]
        del keep
        worker.keep_only(grown)
    finally:
        worker.close()
        host.close()
    assert not [n for n in shm.our_segments(os.getpid()) if host._token in n]


def test_a_result_goes_through_the_output_arena_or_a_one_off_segment(in_process_worker):
    token = shm.new_token()
    host, worker = shm.HostArenas(token), shm.WorkerMappings(copy_inputs=False)
    try:
        result = torch.randn(1, 16, 64, 64)  # 256 KiB
        arena, capacity = host.reserve_output(result.numel() * 4)
        ref = worker.write_result(result, arena, capacity, shm.segment_name(token, 1, "r"))
        assert ref.segment == arena
        out = host.take(ref)
        assert torch.equal(out, result)
        worker.write_result(torch.zeros_like(result), arena, capacity, shm.segment_name(token, 2, "r"))
        assert torch.equal(out, result), "the caller's tensor must not share the arena"

        larger = torch.randn(2, 16, 256, 256)  # 8 MiB: more than the arena holds
        spill = shm.segment_name(token, 3, "r")
        ref = worker.write_result(larger, arena, capacity, spill)
        assert ref.segment == spill
        assert torch.equal(host.take(ref), larger)
        assert spill not in shm.our_segments(os.getpid())  # taken and unlinked
        arena2, capacity2 = host.reserve_output(0)  # grows to what the last result needed
        assert arena2 != arena and capacity2 >= larger.numel() * 4
        worker.keep_only(arena2)
        ref = worker.write_result(larger, arena2, capacity2, shm.segment_name(token, 4, "r"))
        assert ref.segment == arena2 and torch.equal(host.take(ref), larger)
    finally:
        worker.close()
        host.close()
    assert not [n for n in shm.our_segments(os.getpid()) if token in n]


def test_a_rank_that_fails_alone_breaks_the_pool():
    # Every rank gets the same input, so they fail together; one failing alone means the ranks
    # may be out of step in their collectives, and only fresh workers are safe.
    pool = WorkerPool(CONFIG)  # not started: the verdict alone is under test
    error = protocol.RemoteError("CheckpointError", "comfy_xdit.loading", "file is corrupt", "Traceback ...")
    with pytest.raises(PoolError, match=r"rank 0: CheckpointError: file is corrupt; rank 1: finished"):
        pool._judge(1, "load", {0: protocol.Failed(1, 0, error), 1: protocol.Done(1, 1)})
    assert pool.status()["state"] == "broken"
    alike = {
        r: protocol.Failed(2, r, protocol.RemoteError.capture(CheckpointError(f"bad file on rank {r}"))) for r in (0, 1)
    }
    pool._state = "running"
    assert isinstance(pool._judge(2, "load", alike), CheckpointError)
    assert pool.status()["state"] == "running"


def test_segments_of_a_killed_host_are_swept_by_the_next_pool():
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    name = f"cxdit{dead_pid}_abcdef_1i"
    segment = shared_memory.SharedMemory(name=name, create=True, size=64)
    segment.close()
    try:
        assert name in shm.sweep_stale_segments()
        assert name not in shm.our_segments()
    finally:
        shm.unlink_quietly(name)


HOST_SCRIPT = """
import json, sys, torch
from comfy_xdit.config import ParallelConfig
from comfy_xdit.pool import WorkerPool
from comfy_xdit.requests import FluxConditioning, ModelSpec, SampleRequest

pool = WorkerPool(ParallelConfig(ulysses_degree=2, devices=("cpu", "cpu")), log_dir=sys.argv[3]).start()
if sys.argv[2] == "exit":  # leave without close(): atexit must stop the workers
    print(json.dumps({"pids": pool.status()["pids"]}), flush=True)
    sys.exit(0)
pool.load(ModelSpec(sys.argv[1], dtype="float32"))
g = torch.Generator().manual_seed(0)
positive = FluxConditioning(torch.randn(1, 256, 32, generator=g), torch.randn(1, 24, generator=g))
request = SampleRequest(torch.zeros(1, 16, 48, 48), positive, None, seed=1, steps=1000)
if sys.argv[2] == "exit_after_job":  # the arenas exist now; atexit must unlink them
    request.steps = 1
    pool.sample(request)
    print(json.dumps({"pids": pool.status()["pids"], "arenas": pool.status()["shared_memory"]}), flush=True)
    sys.exit(0)

def on_step(step, total, preview):
    print(json.dumps({"step": step, "pids": pool.status()["pids"]}), flush=True)

pool.sample(request, on_step=on_step)
"""


@pytest.mark.parametrize("how", ["sigkill", "exit", "exit_after_job"])
def test_the_host_ending_leaves_no_worker_and_no_shared_memory(spec, tmp_path, how):
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, str(script), spec.path, how, str(tmp_path / "logs")]
    host = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = host.stdout.readline()
        assert line, "the host script ended before it reported its workers"
        pids = json.loads(line)["pids"]
        if how == "exit_after_job":
            assert len(json.loads(line)["arenas"]) == 2
        if how == "sigkill":  # mid-job, with the request's input segment in place
            assert shm.our_segments(host.pid), "expected the running job's input segment"
            host.send_signal(signal.SIGKILL)
        host.wait(timeout=30)
        assert wait_until(lambda: not any(alive(pid) for pid in pids), 10), "workers outlived their host"
        assert wait_until(lambda: not shm.our_segments(host.pid), 10), shm.our_segments(host.pid)
    finally:
        if host.poll() is None:
            host.kill()
        host.stdout.close()
