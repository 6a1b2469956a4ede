"""Run a function on N CPU processes joined by gloo, and collect each rank's return value; build an
engine on the calling rank of that group."""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N processes share two cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # No rank tears its groups down while another is still in a collective with it: that
        # race aborted a rank at exit once ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


# Ranks start from a fork server that has imported these once, so a rank starts in a fraction of a
# second instead of importing torch and diffusers again (several seconds per rank on two cores;
# the suite starts a few hundred groups). The server never computes, so forking it is safe where
# forking this process, whose OpenMP threads have run, would not be.
# (The list only counts when the server starts, at the first run_on_ranks.)
mp.set_forkserver_preload(["torch", "torch.distributed", "diffusers", "safetensors.torch", "comfy_xdit.engine"])


def run_on_ranks(world_size: int, fn, *args) -> list:
    """fn(*args) on every rank of a fresh gloo group; returns the list of results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True,
                           start_method="forkserver")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]


def cpu_engine(config_kwargs: dict | None = None):
    """An engine on this process's rank of the running gloo group (or alone), CPU devices."""
    from comfy_xdit.config import ParallelConfig
    from comfy_xdit.engine import RankEngine
    from comfy_xdit.mesh import ParallelMesh

    world = dist.get_world_size() if dist.is_initialized() else 1
    config = ParallelConfig(devices=("cpu",) * world, **(config_kwargs or {}))
    return RankEngine(ParallelMesh.build(config, torch.device("cpu")))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, DESIGN.md's measure."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())
