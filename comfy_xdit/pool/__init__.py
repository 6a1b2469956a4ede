"""The persistent worker pool: one process per device, started once, kept warm across jobs."""

from .host import PoolError, WorkerPool
from .registry import PoolRegistry

__all__ = ["PoolError", "PoolRegistry", "WorkerPool"]
