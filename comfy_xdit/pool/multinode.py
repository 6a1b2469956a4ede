"""Several hosts in one pool with plain torch.distributed (no Ray): the host's store and the nodes' agents.

The pool's own host is node 0: it runs a ``WorkerPool`` with a ``Cluster``, starts the workers
of its own devices, and keeps a TCP store on ``master_addr:master_port`` (torchrun's
rendezvous). Every other host runs one agent, ``comfy-xdit worker --master-addr A
--master-port P --node-rank K --nnodes N --nproc-per-node G``, that stays up across pool
restarts: each time the pool (re)starts it publishes a start plan in the store (the world,
the devices of every node, where its control listener is), and each agent starts that plan's
ranks of its node as ordinary worker processes. Those connect to the host's control listener
(authenticated with the cluster key every node shares) and join the process group through the
store, under a prefix of that start, so ranks of an old start can never meet a new one.

The cluster key (``COMFY_XDIT_CLUSTER_KEY``, the same on every node) keeps other machines'
processes off the control connections, which carry pickles; the store itself has no
authentication (as with torchrun): run this on a network you trust.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ..config import ConfigError, split_node
from . import protocol
from .processes import cpu_count

ENV_CLUSTER_KEY = "COMFY_XDIT_CLUSTER_KEY"
GENERATION_KEY = "pool/generation"
CLOSED_KEY = "pool/closed"
LEFT_KEY = "pool/agents_left"
CLOSE_WAIT_S = 2.0
POLL_S = 0.5


def cluster_key() -> bytes:
    key = os.environ.get(ENV_CLUSTER_KEY, "")
    if len(key) < 8:
        raise ConfigError(
            f"a multi-node pool needs a shared secret: set {ENV_CLUSTER_KEY} to the same string (8 characters or "
            f"more) on every node, for example the output of `python -c 'import secrets; print(secrets.token_hex())'`"
        )
    return key.encode()


@dataclass(frozen=True)
class Cluster:
    """Where the nodes meet: this host's address as the others reach it, and the store's port."""

    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        if not self.master_addr:
            raise ConfigError("master_addr is empty; give the address the other nodes reach this host at")
        if not 0 < int(self.master_port) < 65536:
            raise ConfigError(f"master_port {self.master_port!r} is not a TCP port")


def multi_node_devices(local: tuple[str, ...], nnodes: int) -> tuple[str, ...]:
    """Every node's devices, as many as this host's ('cuda:0' on node 1 is '1/cuda:0')."""
    return (*local, *(f"{node}/{device}" for node in range(1, nnodes) for device in local))


class HostStore:
    """Node 0's side: the TCP store server, and one start plan published per pool start."""

    def __init__(self, cluster: Cluster):
        import torch.distributed as dist

        try:
            self.store = dist.TCPStore(cluster.master_addr, cluster.master_port, is_master=True,
                                       wait_for_workers=False, timeout=timedelta(seconds=30))
        except Exception as error:  # the port is taken, or the address is not this host's
            raise ConfigError(f"could not listen on {cluster.master_addr}:{cluster.master_port} for the other nodes: "
                              f"{error}; choose another master_port, or this host's own address") from error
        self.cluster = cluster

    def publish(self, generation: int, plan: dict) -> str:
        """Announce a pool start; returns the store prefix its process group uses."""
        prefix = f"start{generation}/"
        self.store.set(f"pool/{generation}", json.dumps({**plan, "generation": generation, "prefix": prefix}))
        self.store.add(GENERATION_KEY, generation - int(self.store.add(GENERATION_KEY, 0)))
        return prefix

    def close(self, nnodes: int) -> None:
        """Tell the agents the pool closed; wait a moment for them to hear it before the store goes."""
        try:
            self.store.set(CLOSED_KEY, "1")
            deadline = time.monotonic() + CLOSE_WAIT_S
            while int(self.store.add(LEFT_KEY, 0)) < nnodes - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:
            pass
        self.store = None


# --- the agent on every other node --------------------------------------------------------


def _worker_command() -> list[str]:
    package = __name__.rpartition(".pool.")[0].rpartition(".")[2]
    return [sys.executable, "-m", f"{package}.worker"]


def _start_ranks(plan: dict, node_rank: int, key: bytes, master_port: int, master_addr: str, log) -> list:
    ranks = [(rank, split_node(d)[1]) for rank, d in enumerate(plan["devices"]) if split_node(d)[0] == node_rank]
    import_root = str(Path(__file__).resolve().parents[2])
    processes = []
    for local_rank, (rank, device) in enumerate(ranks):
        env = dict(os.environ)
        env.pop(ENV_CLUSTER_KEY, None)
        env.update({
            "RANK": str(rank), "WORLD_SIZE": str(plan["world_size"]), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(len(ranks)), protocol.ENV_DEVICE: device, protocol.ENV_AUTHKEY: key.hex(),
            protocol.ENV_PARENT_PID: str(os.getpid()), protocol.ENV_HOST_PACKAGE: plan["host_package"],
            protocol.ENV_STORE: f"{master_addr}:{master_port}:{plan['prefix']}", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([import_root, *filter(None, [os.environ.get("PYTHONPATH")])]),
        })
        if device.startswith("cpu") and "OMP_NUM_THREADS" not in env:
            env[protocol.ENV_NUM_THREADS] = str(max(1, cpu_count() // len(ranks)))
        processes.append(subprocess.Popen([*_worker_command(), "--control", plan["control"]], env=env,
                                          stdin=subprocess.DEVNULL))
        log(f"start {plan['generation']}: rank {rank} on {device} (pid {processes[-1].pid})")
    return processes


def _stop(processes: list) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_agent(master_addr: str, master_port: int, node_rank: int, nnodes: int, nproc_per_node: int,
              connect_timeout_s: float = 600.0) -> int:
    """Serve node ``node_rank`` of the pool at ``master_addr:master_port`` until that pool closes."""
    import torch.distributed as dist

    log = lambda text: print(f"comfy-xdit worker (node {node_rank}): {text}", flush=True)  # noqa: E731
    if not 0 < node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} must be between 1 and {nnodes - 1} (node 0 is the pool's host)")
    key = cluster_key()
    log(f"waiting for the pool's host at {master_addr}:{master_port}")
    store = dist.TCPStore(master_addr, master_port, is_master=False, timeout=timedelta(seconds=connect_timeout_s))
    handled, processes = 0, []
    try:
        while True:
            try:
                if store.check([CLOSED_KEY]):
                    log("the pool closed")
                    store.add(LEFT_KEY, 1)
                    return 0
                generation = int(store.add(GENERATION_KEY, 0))
            except Exception:  # the store went away with its host
                log("the pool's host is gone")
                return 0
            if generation > handled:
                _stop(processes)
                plan = json.loads(store.get(f"pool/{generation}"))
                if plan["nnodes"] != nnodes or len(plan["devices"]) != nnodes * nproc_per_node:
                    raise ConfigError(
                        f"the pool's host runs {len(plan['devices'])} workers on {plan['nnodes']} nodes, but this "
                        f"node was started with --nnodes {nnodes} --nproc-per-node {nproc_per_node}"
                    )
                processes, handled = _start_ranks(plan, node_rank, key, master_port, master_addr, log), generation
            time.sleep(POLL_S)
    finally:
        _stop(processes)
