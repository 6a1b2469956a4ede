"""The worker pool on Ray keeps the local pool's contract: same latents, cancel, failures, clean stop.

One small Ray cluster on loopback for the whole module (started here, stopped at the end); two
CPU actors joined by gloo (ulysses=2). Results are compared with the engine run in this process
on one rank.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import torch

from comfy_xdit.config import ParallelConfig
from comfy_xdit.pool import PoolError
from comfy_xdit.requests import ModelSpec, SamplingCancelled
from checkpoints import make_flux_diffusers_model, write_diffusers_folder
from distributed import cpu_engine, relative_error
from test_pool import alive, make_request, wait_until

ray = pytest.importorskip("ray")
from comfy_xdit.pool.ray_pool import RayWorkerPool  # noqa: E402

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
CONFIG = ParallelConfig(ulysses_degree=2, devices=("cpu", "cpu"))

pytestmark = pytest.mark.timeout(300)


# The test session's own helpers: the fork server the gloo tests start their ranks from carries
# sys.path in its command line, and importing ray puts ray's folders on sys.path.
NOT_RAY = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def ray_processes() -> list[psutil.Process]:
    """Processes of this test's Ray session: its daemons (our descendants) and its worker processes."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            command = " ".join(p.cmdline())
            if "ray" in command.lower() and not any(helper in command for helper in NOT_RAY):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
    assert wait_until(lambda: not ray_processes(), 15), [p.cmdline()[:2] for p in ray_processes()]


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> ModelSpec:
    path = write_diffusers_folder(make_flux_diffusers_model(), tmp_path_factory.mktemp("raypool") / "flux")
    return ModelSpec(str(path), family="flux", dtype="float32")


@pytest.fixture(scope="module")
def reference(spec):
    engine = cpu_engine()
    engine.load(spec)
    return engine.sample(make_request())


@pytest.fixture(scope="module")
def pool(ray_cluster, spec):
    pool = RayWorkerPool(CONFIG, address=None, job_timeout_s=60, start_timeout_s=120)
    try:
        pool.start()
        pool.load(spec)
        yield pool
    finally:
        pids = [pid for pid in pool.status()["pids"] if pid]
        pool.close()
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 15), "close() left Ray actors running"


def test_ulysses_2_on_ray_gives_the_same_latents_as_one_worker(pool, reference):
    progress = []
    out = pool.sample(make_request(), on_step=lambda step, total, preview: progress.append((step, total)))
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    status = pool.status()
    assert status["backend"] == "ray" and status["state"] == "running" and status["load_count"] == 1
    nodes = {w["node"] for w in status["workers"] if w["alive"]}
    assert nodes == {ray.util.get_node_ip_address()}, status["workers"]  # both ranks alive, on this node
    assert len(set(status["pids"])) == 2 and os.getpid() not in status["pids"]
    error = relative_error(out, reference)
    print(f"ray ulysses=2 against one worker: relative error {error:.2e}")
    assert error <= TOLERANCE


def test_cancel_stops_every_ray_rank_after_the_same_step(pool, reference):
    pids = pool.status()["pids"]
    cancel = threading.Event()

    def on_step(step, total, preview):
        if step == 2:
            cancel.set()

    with pytest.raises(SamplingCancelled) as stopped:
        pool.sample(make_request(steps=20, size=48), on_step=on_step, cancel_event=cancel)
    steps = stopped.value.rank_steps
    assert set(steps) == {0, 1} and len(set(steps.values())) == 1 and 2 <= stopped.value.step <= 3, steps
    assert pool.status()["pids"] == pids
    assert relative_error(pool.sample(make_request()), reference) <= TOLERANCE


def test_vae_load_and_patch_parallel_decode_on_ray_match_one_rank(pool):
    from comfy_xdit.requests import VaeDecodeRequest, VaeWeights
    from comfy_xdit.vae import build_decoder, decoder_state_dict, state_dict_fingerprint
    from vae_files import make_ldm_vae_state_dict

    state = decoder_state_dict(make_ldm_vae_state_dict(seed=0, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16))
    vae = VaeWeights(state_dict_fingerprint(state), state, "float32")
    latent = torch.randn(1, 16, 12, 8, generator=torch.Generator().manual_seed(0))
    assert pool.load_vae(vae) is True and pool.has_vae(vae.fingerprint)
    image = pool.decode(VaeDecodeRequest(vae.fingerprint, latent))
    with torch.inference_mode():
        alone = build_decoder(state, dtype=torch.float32, device=torch.device("cpu")).decode(latent).float()
    assert image.shape == alone.shape and float((image - alone).abs().max()) <= 1e-4


def test_an_actor_killed_mid_job_names_its_rank_and_the_next_job_gets_fresh_actors(pool, reference):
    old_pids = pool.status()["pids"]
    killed = []

    def on_step(step, total, preview):
        if step == 2 and not killed:
            killed.append(time.monotonic())
            os.kill(old_pids[1], signal.SIGKILL)

    with pytest.raises(PoolError) as error:
        pool.sample(make_request(steps=20, size=48), on_step=on_step)
    assert time.monotonic() - killed[0] < 10
    message = str(error.value)
    assert "Ray actor rank 1" in message and "died" in message and "starts afresh" in message, message
    assert pool.status()["state"] == "broken"
    assert wait_until(lambda: not any(alive(pid) for pid in old_pids), 10), "the broken pool's actors live on"

    out = pool.sample(make_request())  # new actors, the model reloaded by itself
    status = pool.status()
    assert status["state"] == "running" and set(status["pids"]).isdisjoint(old_pids)
    assert relative_error(out, reference) <= TOLERANCE


def test_a_pool_that_cannot_be_placed_says_what_the_cluster_lacks(ray_cluster):
    pool = RayWorkerPool(ParallelConfig(ulysses_degree=4, devices=("cpu",) * 4), address=None, start_timeout_s=3)
    try:
        with pytest.raises(PoolError, match="could not place 4 workers"):
            pool.start()
    finally:
        pool.close()


def test_the_loader_inputs_choose_the_backend_and_ray_auto_devices_follow_the_cluster(ray_cluster):
    from comfy_xdit import bridge
    from comfy_xdit.cli import backend_from_flags, build_parser, config_from_flags
    from comfy_xdit.config import ConfigError
    from comfy_xdit.pool.backends import LOCAL, Backend
    from comfy_xdit.pool.multinode import Cluster

    assert bridge.make_backend("local", "auto") is LOCAL
    assert bridge.make_backend("local", "10.0.0.1:29500") == Backend("local", cluster=Cluster("10.0.0.1", 29500))
    assert bridge.make_backend("ray", "") == Backend("ray", ray_address="auto")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        bridge.make_backend("local", "10.0.0.1")
    # This cluster has no GPU: 'auto' gives CPU actors, as many as the degrees (0: two).
    on_ray = Backend("ray", ray_address=None)
    config = bridge.make_config(ulysses_degree=0, ring_degree=1, use_cfg_parallel=False, data_parallel_degree=1,
                                pipefusion_parallel_degree=1, attention_backend="auto", devices="auto", backend=on_ray)
    assert config.devices == ("cpu", "cpu") and config.ulysses_degree == 2

    args = build_parser().parse_args(["generate", "--model", "x", "--backend", "ray", "--ray-address", "ray://h:10001",
                                      "--placement", "spread", "--devices", "cpu,cpu"])
    assert backend_from_flags(args) == Backend("ray", ray_address="ray://h:10001", placement="spread")
    args = build_parser().parse_args(["generate", "--model", "x", "--nnodes", "2", "--master-addr", "10.0.0.1",
                                      "--devices", "cuda:0,cuda:1"])
    assert backend_from_flags(args).cluster == Cluster("10.0.0.1", 29500)
    assert config_from_flags(args).devices == ("cuda:0", "cuda:1", "1/cuda:0", "1/cuda:1")
