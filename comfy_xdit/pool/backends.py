"""Which machinery runs a pool's workers: local processes (one or several hosts) or Ray actors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, ParallelConfig
from .multinode import Cluster

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class Backend:
    """``local``: worker processes on this host (and, with ``cluster``, on other hosts' agents).
    ``ray``: Ray actors on the cluster at ``ray_address``, placed ``pack`` (one node) or ``spread``."""

    kind: str = "local"
    ray_address: str | None = "auto"
    placement: str = "pack"
    cluster: Cluster | None = None

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ConfigError(f"backend {self.kind!r} is unknown; choose one of {', '.join(BACKENDS)}")
        if self.kind == "ray" and self.cluster is not None:
            raise ConfigError("a Ray pool spans nodes by itself: leave the multi-node (master address) settings out")

    @property
    def shares_local_devices(self) -> bool:
        """Whether this pool's devices are this host's own (two such pools cannot share one)."""
        return self.kind == "local"

    def create(self, config: ParallelConfig, **options: Any):
        if self.kind == "ray":
            from .ray_pool import RayWorkerPool

            return RayWorkerPool(config, address=self.ray_address, placement=self.placement, **options)
        from .host import WorkerPool

        return WorkerPool(config, cluster=self.cluster, **options)


LOCAL = Backend()
