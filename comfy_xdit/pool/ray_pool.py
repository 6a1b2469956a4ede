"""The worker pool on Ray: one actor per worker, placed together (one node) or spread over nodes.

``RayWorkerPool`` is a ``WorkerPool`` whose workers are Ray actors (``ray_rank.RankActor``)
instead of local processes. Everything about jobs (progress, cancel, the verdict on how the
ranks ended, breaking and restarting, status) is the local pool's code; what differs is here:

- start: a placement group with one bundle per rank (``STRICT_PACK`` for one node, ``SPREAD``
  over nodes), one actor per bundle, rank 0 names its node's address and a free port, and the
  actors form the torch.distributed group there (NCCL on GPUs, gloo on CPUs);
- messages: each rank's control channel is a local pipe that a pump thread fills from the
  actor's ``messages`` calls, so the host waits on Ray ranks exactly as on worker processes;
  a dead actor ends its pump, which closes the pipe: the pool sees the rank die;
- tensors travel inside the messages (Ray's object store), not through shared memory;
- stop: ``ray.kill`` every actor and remove the placement group.

The pool connects to Ray with ``ray.init(address)`` unless the process is connected already
(``address``: ``"auto"`` for the cluster this machine belongs to, ``"ray://HOST:10001"`` for a
Ray Client connection, ``"local"`` for a private one-machine cluster).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import threading
import time
from typing import Any

import torch

from ..config import ConfigError, ParallelConfig
from . import protocol, ray_rank
from .host import _IMPORT_ROOT, HOST_PACKAGE, POLL_S, WORKER_PACKAGE, PoolError, WorkerPool

log = logging.getLogger(__name__)

PLACEMENTS = {"pack": "STRICT_PACK", "spread": "SPREAD"}
ACTOR_CONCURRENCY = 4  # the job thread is the actor's own; deliver and messages calls run beside it
KILL_WAIT_S = 10.0


def import_ray():
    try:
        import ray
    except ImportError as missing:
        raise ConfigError(
            "the ray backend needs Ray: pip install 'comfy-xdit[ray]' (or pip install ray) on this machine and "
            "every node of the cluster; or use the local backend"
        ) from missing
    return ray


def connect(address: str | None) -> tuple[Any, bool]:
    """Connect this process to Ray unless it is connected; returns (ray, whether we connected it)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=None if address in (None, "", "local") else address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise PoolError(
            f"could not connect to the Ray cluster at {address!r}: {error}. Start one with `ray start --head` "
            f"(then use address 'auto' on that machine, or 'ray://HEAD:10001' elsewhere), or use 'local'"
        ) from error
    return ray, True


def _actor_death(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"died ({type(error).__name__}: {text[:300]})"


class RayChannel(protocol.Channel):
    """A rank's control channel: sends are actor calls, receives come off a pipe the pump fills."""

    def __init__(self, actor, reader, rename):
        super().__init__(reader, rename)
        self._actor = actor

    def send_bytes(self, data: bytes) -> None:
        self._actor.deliver.remote(data)  # a dead actor shows in the pump, not here


class RayWorker:
    """One rank as the host sees it: the actor, its channel, and the pump that feeds the channel."""

    def __init__(self, rank: int, device: str, actor, ray):
        self.rank, self.device, self.actor = rank, device, actor
        self.info: dict = {}
        self.gone: str | None = None
        self._ray = ray
        reader, self._writer = multiprocessing.Pipe(duplex=False)
        self.channel = RayChannel(actor, reader, rename=(WORKER_PACKAGE, HOST_PACKAGE))
        self._pump = threading.Thread(target=self._run_pump, name=f"comfy-xdit-ray-pump-{rank}", daemon=True)
        self._pump.start()

    def _run_pump(self) -> None:
        try:
            while True:
                for data in self._ray.get(self.actor.messages.remote(0.5)):
                    self._writer.send_bytes(data)
        except Exception as error:  # the actor died or was killed; anything else ends the pump too
            self.gone = self.gone or _actor_death(error)
        finally:
            self._writer.close()  # the host's next receive sees the end of file

    @property
    def pid(self) -> int | None:
        return self.info.get("pid")

    def alive(self) -> bool:
        return self.gone is None

    def accepts(self, hello: protocol.Hello) -> bool:
        return True

    def label(self) -> str:
        where = f"pid {self.pid} on {self.info['node']}" if self.info.get("node") else "not started"
        return f"Ray actor rank {self.rank} ({where}, {self.device})"

    def exit_status(self) -> str | None:
        return self.gone

    def log_excerpt(self) -> str:
        actor_id = self.actor._actor_id.hex()
        return f"its output is in the Ray driver's log and in `ray logs actor --id {actor_id}`"

    def kill(self) -> None:
        self.gone = self.gone or "was stopped by the pool"
        try:
            self._ray.kill(self.actor, no_restart=True)
        except Exception:
            pass

    def wait(self, timeout: float) -> None:
        self._pump.join(max(0.0, timeout))


class RayWorkerPool(WorkerPool):
    """A WorkerPool whose ranks are Ray actors; same jobs, progress, cancel, failures and status.

    ``config.devices`` gives the kind and the count: ``("cuda:0", "cuda:1")`` asks Ray for two
    actors with one GPU each (whichever GPUs Ray assigns), ``("cpu", "cpu")`` for two CPU
    actors. ``placement``: ``"pack"`` keeps every rank on one node, ``"spread"`` spreads them.
    ``runtime_env`` is passed to the actors (for example ``{"py_modules": [...]}``).
    """

    def __init__(self, config: ParallelConfig, *, address: str | None = "auto", placement: str = "pack",
                 runtime_env: dict | None = None, **options: Any):
        if placement not in PLACEMENTS:
            raise ConfigError(f"placement {placement!r} is unknown; choose one of {', '.join(PLACEMENTS)}")
        import_ray()  # refuse now when Ray is missing
        super().__init__(config, **options)
        self.address = address
        self.placement = placement
        self._runtime_env = runtime_env
        self._placement_group = None
        self._connected_ray = False

    def _check_devices(self, config: ParallelConfig) -> None:
        if any("/" in d for d in config.devices):
            raise ConfigError("devices of a Ray pool are placed by Ray: give kinds only, e.g. cuda:0,cuda:1 or cpu,cpu")

    def _actor_options(self, rank: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # The engine must import on every node: as installed there, or from this checkout.
        env = dict(self._runtime_env or {})
        env_vars = dict(env.get("env_vars", {}))
        paths = [str(_IMPORT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env_vars.setdefault("PYTHONPATH", os.pathsep.join(paths))
        env["env_vars"] = env_vars
        gpu = self.config.device_type == "cuda"
        return dict(
            num_cpus=1,
            num_gpus=1 if gpu else 0,
            max_concurrency=ACTOR_CONCURRENCY,
            runtime_env=env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._placement_group, placement_group_bundle_index=rank
            ),
        )

    def _spawn(self) -> None:
        if self._workers:
            self._terminate(self._workers)
        self._generation += 1
        self._loaded_spec = None
        self._vae_fingerprints = set()
        ray, connected = connect(self.address)
        self._connected_ray = self._connected_ray or connected
        if HOST_PACKAGE != WORKER_PACKAGE:
            # The host's name for the engine means nothing on a Ray node: ship the actor class itself.
            ray.cloudpickle.register_pickle_by_value(ray_rank)
        from ray.util.placement_group import placement_group

        deadline = time.monotonic() + self.start_timeout_s
        world_size = self.config.world_size
        bundle = {"CPU": 1, "GPU": 1} if self.config.device_type == "cuda" else {"CPU": 1}
        self._placement_group = placement_group([dict(bundle)] * world_size, strategy=PLACEMENTS[self.placement])
        workers: list[RayWorker] = []
        try:
            ready, _ = ray.wait([self._placement_group.ready()], timeout=self.start_timeout_s)
            if not ready:
                raise PoolError(
                    f"Ray could not place {world_size} workers of {bundle} ({PLACEMENTS[self.placement]}) within "
                    f"start_timeout_s={self.start_timeout_s:.0f} s; the cluster has {ray.available_resources()} free. "
                    f"Lower the degrees, add nodes, or use placement 'spread'"
                )
            actor_class = ray.remote(ray_rank.RankActor)
            for rank, device in enumerate(self.config.devices):
                actor = actor_class.options(**self._actor_options(rank)).remote(
                    WORKER_PACKAGE, HOST_PACKAGE, rank, world_size
                )
                workers.append(RayWorker(rank, device, actor, ray))
            self._workers = workers
            master = self._await(ray, workers[:1], [workers[0].actor.rendezvous.remote()], deadline)[0]
            init = pickle.dumps(protocol.Init(self.config), protocol=pickle.HIGHEST_PROTOCOL)
            started = self._await(ray, workers, [w.actor.start.remote(init, master) for w in workers], deadline)
            for worker, failed in zip(workers, started):
                if failed is not None:
                    message = protocol.loads(failed, rename=(WORKER_PACKAGE, HOST_PACKAGE))
                    error = self._remote_exception(worker.rank, message.error)
                    if isinstance(error, ValueError):
                        raise error  # e.g. a configuration the engine refuses
                    self._raise_start_failure(worker, f"failed to start: {message.error.describe()}")
            self._await_ready(workers, deadline)
        except BaseException:
            self._terminate(workers)
            with self._state_lock:
                if self._state != "closed":
                    self._state = "broken"
            raise
        with self._state_lock:
            if self._state == "closed":
                self._terminate(workers)
                raise PoolError("the pool was closed while it started")
            self._state = "running"
            self._last_error = None

    def _await(self, ray, workers: list[RayWorker], refs: list, deadline: float) -> list:
        """ray.get of one call per worker, naming the rank whose actor died or was too slow."""
        pending = dict(zip(refs, workers))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                late = sorted(w.rank for w in pending.values())
                self._raise_start_failure(
                    pending[refs[0]] if refs[0] in pending else next(iter(pending.values())),
                    f"was not ready within start_timeout_s={self.start_timeout_s:.0f} s (ranks not ready: {late})",
                )
            worker = pending.pop(done[0])
            try:
                ray.get(done[0])
            except Exception as error:
                self._raise_start_failure(worker, _actor_death(error))
        return ray.get(refs)

    def _await_ready(self, workers: list[RayWorker], deadline: float) -> None:
        from multiprocessing.connection import wait as wait_readable

        waiting = {w.channel.connection: w for w in workers}
        while waiting:
            for connection in wait_readable(list(waiting), timeout=POLL_S):
                worker = waiting[connection]
                try:
                    message = worker.channel.recv()
                except (EOFError, OSError):
                    self._raise_start_failure(worker, worker.gone or "closed its channel")
                if isinstance(message, protocol.Ready):
                    worker.info = message.info
                    del waiting[connection]
            if waiting and time.monotonic() > deadline:
                late = sorted(w.rank for w in waiting.values())
                self._raise_start_failure(next(iter(waiting.values())), f"did not report ready (ranks {late})")

    def _shutdown_politely(self, workers: list) -> None:
        pass  # ray.kill follows at once; the group needs no goodbye from actors about to go

    def _make_job(self, job_id: int, kind: str, payload: Any) -> tuple[protocol.Job, None]:
        return protocol.Job(job_id, kind, payload), None  # tensors ride in the message

    def _take_result(self, value: Any) -> torch.Tensor:
        return value

    def _terminate(self, workers: list) -> None:
        for w in workers:
            w.kill()
        for w in workers:
            w.wait(KILL_WAIT_S)
            w.channel.close()
        if self._placement_group is not None:
            try:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self._placement_group)
            except Exception:
                pass
            self._placement_group = None

    def close(self) -> None:
        super().close()
        if self._connected_ray:  # this pool started the connection (and maybe a local cluster)
            self._connected_ray = False
            try:
                import_ray().shutdown()
            except Exception:
                pass

    def status(self) -> dict:
        status = super().status()
        status.update(backend="ray", ray_address=self.address, placement=self.placement)
        return status
