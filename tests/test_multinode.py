"""Several hosts without Ray: two "hosts" on one machine give the same latents as one worker.

Node 0 is this test's WorkerPool with a Cluster (its TCP store on loopback); node 1 is a
`comfy-xdit worker` agent started as its own process group, as it would be on another machine.
Each node starts its own worker processes; the ranks meet only through the store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from comfy_xdit.config import ConfigError, ParallelConfig
from comfy_xdit.pool import WorkerPool
from comfy_xdit.pool.multinode import ENV_CLUSTER_KEY, Cluster, multi_node_devices
from comfy_xdit.requests import ModelSpec
from checkpoints import make_flux_diffusers_model, write_diffusers_folder
from distributed import cpu_engine, free_port, relative_error
from test_pool import alive, make_request, wait_until

TOLERANCE = 1e-4
REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(240)


def start_agent(port: int, node_rank: int, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "comfy_xdit.cli", "worker", "--master-addr", "127.0.0.1", "--master-port",
               str(port), "--node-rank", str(node_rank), "--nnodes", "2", "--nproc-per-node", "1"]
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_nodes_on_loopback_give_the_same_latents_as_one_worker(tmp_path, monkeypatch):
    path = write_diffusers_folder(make_flux_diffusers_model(), tmp_path / "flux")
    spec = ModelSpec(str(path), family="flux", dtype="float32")
    engine = cpu_engine()
    engine.load(spec)
    reference = engine.sample(make_request())

    monkeypatch.setenv(ENV_CLUSTER_KEY, "two-nodes-on-one-machine")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    port = free_port()
    agent = start_agent(port, 1, env)  # may start before the host: it waits for the store
    config = ParallelConfig(ulysses_degree=2, devices=multi_node_devices(("cpu",), 2))
    assert config.devices == ("cpu", "1/cpu") and config.nnodes == 2
    try:
        with WorkerPool(config, cluster=Cluster("127.0.0.1", port), job_timeout_s=60, start_timeout_s=120) as pool:
            pool.load(spec)
            out = pool.sample(make_request())
            workers = pool.status()["workers"]
            remote_pid = workers[1]["pid"]
            # Rank 1 was started by the agent (a child of the agent, not of this process).
            assert psutil.Process(remote_pid).ppid() == agent.pid
            assert workers[0]["pid"] in [p.pid for p in psutil.Process().children()]
        error = relative_error(out, reference)
        print(f"two nodes x one CPU worker (ulysses=2) against one worker: relative error {error:.2e}")
        assert error <= TOLERANCE
        # Closing the pool stops the other node's workers and its agent.
        assert agent.wait(timeout=20) == 0
        assert wait_until(lambda: not alive(remote_pid), 10)
    finally:
        if agent.poll() is None:
            agent.kill()
        print(agent.stdout.read())
        agent.stdout.close()


def test_a_multi_node_pool_needs_its_cluster_and_key(monkeypatch):
    config = ParallelConfig(ulysses_degree=2, devices=("cpu", "1/cpu"))
    with pytest.raises(ConfigError, match="span 2 nodes"):
        WorkerPool(config)
    monkeypatch.delenv(ENV_CLUSTER_KEY, raising=False)
    with pytest.raises(ConfigError, match=ENV_CLUSTER_KEY):
        WorkerPool(config, cluster=Cluster("127.0.0.1", 29500))
    with pytest.raises(ConfigError, match="node number"):
        ParallelConfig(devices=("x/cpu",))
