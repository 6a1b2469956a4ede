"""Faults at every phase of a job (issue 9): each ends in a clear error within 10 s and leaves nothing behind.

A rank is made to fail deterministically by the testing hook of pool/faults.py: the module's
pool has ``COMFY_XDIT_FAULT_FILE`` in its workers' environment, and each test arms one fault
by writing that file; it fires once, so the pool that replaces the broken one runs clean (and
serves the next test). Each case checks: the error names the rank and the phase; it came within
10 s of the fault (the hook writes the moment it fired, on the machine-wide monotonic clock);
no worker process and no shared-memory segment of a job is left; and the next job (a fresh
pool) gives the same latents and image as the engine on one rank.
"""

from __future__ import annotations

import os
import re
import time

import psutil
import pytest
import torch

from comfy_xdit.config import ConfigError
from comfy_xdit.pool import PoolError, WorkerOutOfMemoryError, WorkerPool, faults, protocol, shm, timeouts
from comfy_xdit.requests import ModelSpec, VaeDecodeRequest, VaeWeights
from comfy_xdit.vae import build_decoder, decoder_state_dict, state_dict_fingerprint
from checkpoints import make_flux_diffusers_model, write_diffusers_folder
from distributed import relative_error
from test_pool import CONFIG, TOLERANCE, alive, make_request, reference, spec, wait_until  # noqa: F401 (fixtures)
from vae_files import make_ldm_vae_state_dict

VAE_TOLERANCE = 1e-4  # DESIGN.md: patch-parallel decode against one rank, absolute on [0, 1]
NOTICED_WITHIN_S = 10.0  # DESIGN.md's reliability contract
JOB_TIMEOUT_S = 60.0

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def vae() -> VaeWeights:
    state = decoder_state_dict(make_ldm_vae_state_dict(seed=0, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16))
    return VaeWeights(state_dict_fingerprint(state), state, "float32")


@pytest.fixture(scope="module")
def reference_image(vae, reference):
    decoder = build_decoder(vae.state_dict, dtype=torch.float32, device=torch.device("cpu"))
    return decoder.decode_parallel(reference(), group=None).float()


@pytest.fixture(scope="module")
def other_spec(spec, tmp_path_factory) -> ModelSpec:
    """The same weights in another folder: loading it after ``spec`` is a real load job."""
    path = write_diffusers_folder(make_flux_diffusers_model(), tmp_path_factory.mktemp("faults") / "flux")
    return ModelSpec(str(path), family="flux", dtype="float32")


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fault") / "fault"


@pytest.fixture(scope="module")
def pool(fault_file):
    before = our_shm()
    with WorkerPool(CONFIG, job_timeout_s=JOB_TIMEOUT_S, start_timeout_s=120,
                    worker_env={faults.ENV_FAULT_FILE: str(fault_file)}) as pool:
        yield pool
    assert our_shm() <= before, "shared-memory segments leaked"
    assert wait_until(lambda: not worker_children(), 10), worker_children()


@pytest.fixture
def fresh(pool):
    """The shared pool, running and with its default timeouts, as each test starts."""
    pool.job_timeout_s, pool.load_timeout_s = JOB_TIMEOUT_S, None
    pool.start()
    yield pool
    pool.job_timeout_s, pool.load_timeout_s = JOB_TIMEOUT_S, None


def run_through(pool: WorkerPool, spec, vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Every phase once: load, sample (first step, middle, result), VAE load and decode."""
    pool.load(spec)
    latent = pool.sample(make_request())
    pool.load_vae(vae)
    return latent, pool.decode(VaeDecodeRequest(vae.fingerprint, latent))


def provoke(pool: WorkerPool, phase: str, spec, other_spec, vae) -> None:
    if phase == "load":
        pool.load(other_spec if pool.status()["model_loaded"] else spec)
    else:
        run_through(pool, spec, vae)


def worker_children() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and "comfy_xdit.worker" in " ".join(_cmdline(p))]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def our_shm() -> set[str]:
    """This process's segments in /dev/shm (the pool names them after the host's pid)."""
    return set(shm.our_segments(os.getpid()))


def check_the_pool_is_gone(pool: WorkerPool, old_pids: list[int]) -> None:
    assert pool.status()["state"] == "broken"
    assert wait_until(lambda: not any(alive(pid) for pid in old_pids), 10), "a worker outlived the failure"
    assert not worker_children(), "orphan worker processes"
    # Only the pool's two reused arenas remain (the next job reuses them; close() unlinks them).
    assert our_shm() <= set(pool.status()["shared_memory"]), (our_shm(), pool.status()["shared_memory"])


def check_the_next_job(pool: WorkerPool, spec, vae, reference, reference_image, old_pids: list[int]) -> None:
    latent, image = run_through(pool, spec, vae)
    assert pool.status()["state"] == "running" and set(pool.status()["pids"]).isdisjoint(old_pids)
    assert relative_error(latent, reference()) <= TOLERANCE
    assert float((image - reference_image).abs().max()) <= VAE_TOLERANCE


# (phase, rank, what the error says about the phase)
KILLS = [
    ("load", 1, r"\(loading the model\)"),
    ("first_step", 1, r"\(sampling, (before the first step finished|after step 1/4)\)"),
    ("mid_sampling", 1, r"\(sampling, after step [12]/4\)"),
    ("vae_decode", 1, r"\(the VAE decode\)"),
    ("return_result", 0, r"\(sampling, returning the result after the last step 4/4\)"),  # rank 0 writes it
]


@pytest.mark.parametrize("phase,rank,phase_words", KILLS, ids=[k[0] for k in KILLS])
def test_a_worker_killed_at_each_phase_is_a_clear_error_within_10_s_and_the_next_job_succeeds(
        fresh, fault_file, spec, other_spec, vae, reference, reference_image, phase, rank, phase_words):
    pool = fresh
    old_pids = pool.status()["pids"]
    faults.arm(fault_file, f"{phase}:{rank}:kill")
    with pytest.raises(PoolError) as error:
        provoke(pool, phase, spec, other_spec, vae)
    noticed = time.monotonic()
    fired = faults.fired_at(fault_file)
    assert fired is not None, "the fault did not fire"
    print(f"{phase}: rank {rank} killed; error after {noticed - fired:.2f} s")
    assert noticed - fired < NOTICED_WITHIN_S
    message = str(error.value)
    assert f"worker rank {rank} (pid {old_pids[rank]}" in message and "SIGKILL" in message, message
    assert re.search(phase_words, message), message
    check_the_pool_is_gone(pool, old_pids)
    check_the_next_job(pool, spec, vae, reference, reference_image, old_pids)


def test_out_of_memory_on_one_rank_names_it_says_what_to_change_and_frees_the_others(
        fresh, fault_file, spec, vae, reference, reference_image):
    # Rank 1 fails mid-sampling while rank 0 goes on into the next step's all-to-all, where it
    # would wait for rank 1 forever: the host must not wait for rank 0's answer.
    pool = fresh
    old_pids = pool.status()["pids"]
    faults.arm(fault_file, "mid_sampling:1:oom")
    with pytest.raises(WorkerOutOfMemoryError) as error:
        run_through(pool, spec, vae)
    noticed = time.monotonic()
    assert noticed - faults.fired_at(fault_file) < NOTICED_WITHIN_S
    message = str(error.value)
    assert re.match(rf"worker rank 1 \(pid {old_pids[1]}, cpu\) ran out of memory during job \d+ \(sampling, after step", message), message
    for advice in ("lower the resolution or the batch size", "ulysses_degree", "pipefusion_parallel_degree"):
        assert advice in message, message
    assert "OutOfMemoryError: out of memory" in message
    check_the_pool_is_gone(pool, old_pids)
    check_the_next_job(pool, spec, vae, reference, reference_image, old_pids)


@pytest.mark.parametrize("phase,setting", [("mid_sampling", "job_timeout_s"), ("load", "load_timeout_s")])
def test_a_hung_worker_is_an_error_after_the_configured_timeout_and_the_next_job_succeeds(
        fresh, fault_file, spec, other_spec, vae, reference, reference_image, phase, setting):
    pool = fresh
    setattr(pool, setting, 3.0)
    old_pids = pool.status()["pids"]
    faults.arm(fault_file, f"{phase}:1:hang")  # SIGSTOP: alive, silent
    with pytest.raises(PoolError, match="no progress for 3 s") as error:
        provoke(pool, phase, spec, other_spec, vae)
    setattr(pool, setting, JOB_TIMEOUT_S if setting == "job_timeout_s" else None)
    noticed = time.monotonic()
    assert 3.0 <= noticed - faults.fired_at(fault_file) < 3.0 + NOTICED_WITHIN_S
    message = str(error.value)
    # Rank 0 may be waiting for rank 1 in a collective: silent too, but the hook's line names rank 1.
    assert re.search(r"ranks \[(0, )?1\] did not answer", message) and f"raise {setting}" in message, message
    assert "rank 1 does 'hang'" in message, message
    assert ("(loading the model)" if phase == "load" else "(sampling, after step") in message, message
    check_the_pool_is_gone(pool, old_pids)
    check_the_next_job(pool, spec, vae, reference, reference_image, old_pids)


def test_timeouts_default_to_the_model_size_and_the_environment_can_set_them(monkeypatch, spec):
    pool = WorkerPool(CONFIG)  # never started: only the settings are under test
    assert pool.job_silence_s() == timeouts.JOB_BASE_S and pool.load_silence_s() == timeouts.LOAD_BASE_S
    flux_dev = 23_802_932_552  # bytes of flux1-dev.safetensors (bf16)
    assert 300 <= timeouts.default_job_timeout_s(flux_dev) <= 400
    assert 20 * 60 <= timeouts.default_load_timeout_s(flux_dev) <= 30 * 60
    assert pool.load_silence_s(timeouts.weights_bytes(spec.path)) > timeouts.LOAD_BASE_S  # a folder: its weights
    monkeypatch.setenv(timeouts.ENV_JOB_TIMEOUT, "42")
    monkeypatch.setenv(timeouts.ENV_LOAD_TIMEOUT, "900")
    pool = WorkerPool(CONFIG)
    assert pool.job_silence_s() == 42 and pool.load_silence_s(flux_dev) == 900
    assert pool.status()["job_timeout_s"] == 42
    assert WorkerPool(CONFIG, job_timeout_s=5).job_silence_s() == 5  # the argument wins
    monkeypatch.setenv(timeouts.ENV_JOB_TIMEOUT, "soon")
    with pytest.raises(ConfigError, match="COMFY_XDIT_JOB_TIMEOUT_S='soon': expected a positive number"):
        WorkerPool(CONFIG)


def test_the_fault_hook_is_off_unless_set_and_refuses_a_malformed_fault(tmp_path):
    assert faults.from_environment({}) is None
    assert faults.parse("vae_decode:1\n") == faults.Fault("vae_decode", 1, "kill")
    for bad in ("decode:1", "load:x", "load:1:explode", "load"):
        with pytest.raises(ValueError, match="expected PHASE:RANK"):
            faults.arm(tmp_path / "fault", bad)
    hook = faults.from_environment({faults.ENV_FAULT_FILE: str(tmp_path / "fault")})
    hook.reach("load", 1)  # nothing armed: nothing happens
    faults.arm(tmp_path / "fault", "load:1:oom")
    hook.reach("load", 0)  # another rank
    hook.reach("vae_decode", 1)  # another phase
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        hook.reach("load", 1)
    assert faults.fired_at(tmp_path / "fault") is not None
    hook.reach("load", 1)  # fired once: disarmed


def test_out_of_memory_on_every_rank_alike_keeps_the_pool_loaded():
    # The common case (an image too large for every GPU): all ranks stop in step, so the pool
    # need not reload the model; the error still says what to change.
    pool = WorkerPool(CONFIG)  # not started: the verdict alone is under test
    pool._state = "running"
    oom = protocol.RemoteError.capture(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"))
    error = pool._judge(3, "sample", {r: protocol.Failed(3, r, oom) for r in (0, 1)})
    assert isinstance(error, WorkerOutOfMemoryError) and pool.status()["state"] == "running"
    assert "every worker ran out of memory" in str(error) and "pipefusion_parallel_degree" in str(error)
