"""The persistent worker pool: one worker per device, started once, kept warm across jobs.

Workers are local processes (``WorkerPool``; with a ``Cluster``, also other hosts' agents) or
Ray actors (``RayWorkerPool``); ``Backend`` picks one.
"""

from .backends import Backend
from .host import PoolError, WorkerOutOfMemoryError, WorkerPool
from .multinode import Cluster
from .ray_pool import RayWorkerPool
from .registry import PoolRegistry

__all__ = ["Backend", "Cluster", "PoolError", "PoolRegistry", "RayWorkerPool", "WorkerOutOfMemoryError", "WorkerPool"]
