"""One pool per device set for the whole process: the ComfyUI bridge holds one registry."""

from __future__ import annotations

import threading
from typing import Any

from ..config import ParallelConfig
from .backends import LOCAL, Backend
from .host import WorkerPool


class PoolRegistry:
    """The pools of one process, one per device set; the ComfyUI bridge holds exactly one.

    ``get(config)`` returns a running pool for ``config``: the warm one when it matches, a
    restarted one when it broke, and a new one (after closing any pool that holds one of the
    same devices) when the configuration changed.
    """

    def __init__(self, **pool_options: Any):
        self._pool_options = pool_options
        self._pools: dict[tuple, WorkerPool] = {}  # by (backend, devices)
        self._last_used: WorkerPool | None = None
        self._lock = threading.Lock()

    def get(self, config: ParallelConfig, backend: Backend = LOCAL) -> WorkerPool:
        key = (backend, config.devices)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None and (pool.config != config or pool.status()["state"] == "closed"):
                pool.close()
                del self._pools[key]
                pool = None
            if pool is None:
                pool = backend.create(config, **self._pool_options)  # refuses bad devices before any start
                if backend.shares_local_devices:
                    mine = set(config.node_devices(0))
                    for other in [k for k in self._pools if k[0].shares_local_devices and set(k[1]) & mine]:
                        self._pools.pop(other).close()  # the new pool needs those devices
                self._pools[key] = pool
            self._last_used = pool
            return pool.start()

    def latest(self) -> WorkerPool | None:
        """The pool used last (e.g. the sampler's), for jobs that run on whatever pool is warm."""
        with self._lock:
            pool = self._last_used
        if pool is None or pool.status()["state"] == "closed":
            return None
        return pool.start()

    def status(self) -> list[dict]:
        with self._lock:
            pools = list(self._pools.values())
        return [pool.status() for pool in pools]

    def close_all(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
