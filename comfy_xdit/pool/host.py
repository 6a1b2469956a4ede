"""The persistent worker pool, host side: one process per device, kept warm across jobs.

The host starts ``python -m comfy_xdit.worker`` once per device (never a fork or spawn of the
caller's main module, which inside ComfyUI would re-run its start-up), accepts one
authenticated control connection from each, and then sends every job to every rank. Rank 0
reports progress and returns the result through shared memory.

While it waits, the host watches every worker: a dead worker, a silent pool (a hang) or ranks
that disagree about how a job ended break the pool: it kills the workers and raises PoolError
naming the rank, its exit status and the end of its log. The next call starts a fresh pool and
reloads the model, so a caller (a ComfyUI node) only ever sees one failed job.

With a ``Cluster`` the pool spans hosts: ranks of other nodes are started by those nodes'
agents (``multinode.py``) and known here only by their control connections. ``RayWorkerPool``
(``ray_pool.py``) reuses all of the job handling with Ray actors as the ranks.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Listener
from multiprocessing.connection import wait as wait_readable
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ParallelConfig, check_local_devices_exist, split_node
from ..request_checks import check_sample_settings
from ..requests import ModelSpec, SampleRequest, SamplingCancelled, VaeDecodeRequest, VaeWeights
from . import protocol, shm, timeouts
from .loopback import local_rendezvous_environment
from .multinode import Cluster, HostStore, cluster_key
from .processes import (Acceptor, Launcher, Reaper, RemoteWorker, WorkerProcess, cpu_count, free_port, terminate,
                        wait_for_exit)

log = logging.getLogger(__name__)

# The engine package as this process imported it, and as a worker started with -m sees it.
HOST_PACKAGE = __name__.rpartition(".pool.")[0]
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
WORKER_PACKAGE = _PACKAGE_DIR.name
_IMPORT_ROOT = _PACKAGE_DIR.parent

# A result has the request latent's shape widened to the model's channels (Flux: 16), as float32.
# A model with more channels sends its first result through a one-off segment, and the output
# arena grows to fit the next.
_RESULT_CHANNELS = 16

POLL_S = 0.1  # how often the host checks processes, cancel and timeouts while it waits
STRAGGLER_S = 5.0  # after one rank fails, how long the others get to fail the same way
# After an out-of-memory: the others fail alike within moments, or wait for it in a collective.
OOM_STRAGGLER_S = 2.0
SHUTDOWN_GRACE_S = 5.0

OnStep = Callable[[int, int, "torch.Tensor | None"], None]

# A pool's own log folder is <tmp>/comfy_xdit_pool_<host pid>_<random>: a host that was killed
# cannot remove it, and the pid says whose logs a left-behind folder holds.
LOG_DIR_PREFIX = "comfy_xdit_pool_"


def log_dir_owner(path: Path) -> int | None:
    """The host pid in the name of a pool's own log folder, or None for any other folder."""
    pid, _, rest = path.name.removeprefix(LOG_DIR_PREFIX).partition("_")
    return int(pid) if path.name.startswith(LOG_DIR_PREFIX) and pid.isdigit() and rest else None


class PoolError(RuntimeError):
    """The pool failed as a whole (a worker died, hung or could not start). It restarts on next use."""


class WorkerOutOfMemoryError(PoolError):
    """A rank ran out of (GPU) memory; the pool was shut down, since the other ranks may wait on it forever."""


# What the host calls each kind of job in its errors: the phase the workers were in.
JOB_PHASES = {"load": "loading the model", "vae_load": "loading the VAE", "sample": "sampling",
              "vae_decode": "the VAE decode"}
OUT_OF_MEMORY_ADVICE = (
    "To fit, lower the resolution or the batch size, spread the work over more GPUs (a higher ulysses_degree or "
    "ring_degree), or split the model's layers over GPUs with pipefusion_parallel_degree; bfloat16 weights also halve "
    "the model's memory."
)


def _is_out_of_memory(error: protocol.RemoteError) -> bool:
    return error.type_name in ("OutOfMemoryError", "MemoryError") or "out of memory" in error.message.lower()


def check_devices(config: ParallelConfig) -> None:
    """Refuse devices this machine cannot give the pool, before any process starts."""
    kind = config.device_type
    if kind == "cpu":
        return
    if kind != "cuda":
        raise ConfigError(f"device kind {kind!r} is not supported by the worker pool; use 'cuda:N' or 'cpu'")
    if not torch.cuda.is_available():
        raise ConfigError(f"devices {list(config.devices)} are GPUs but CUDA is not available here; use CPU devices")
    count = torch.cuda.device_count()
    for device in config.node_devices(0):  # other nodes' GPUs are their agents' to check
        index = torch.device(device).index
        if index is not None and index >= count:
            raise ConfigError(f"device {device} does not exist: {count} GPU(s) are visible (cuda:0..cuda:{count - 1})")
    if config.world_size > 1:
        import torch.distributed as dist

        if not dist.is_nccl_available():
            raise ConfigError(
                "several GPU workers need NCCL, which this PyTorch build lacks (as on Windows); use one device"
            )


def _is_distributed_error(error: protocol.RemoteError) -> bool:
    return error.module.startswith("torch.distributed") or error.type_name.startswith("Dist")


RESULT_JOBS = ("sample", "vae_decode")  # their result comes back through the output arena
VAE_UPSCALE = 8


def _result_bytes_estimate(kind: str, request: Any) -> int:
    latent = getattr(request, "latent", None)
    if not isinstance(latent, torch.Tensor) or latent.dim() < 2 or latent.shape[1] == 0:
        return 0
    per_channel = latent.numel() // latent.shape[1]
    if kind == "vae_decode":
        return per_channel * VAE_UPSCALE**2 * 3 * 4  # float32 RGB at 8x the latent's size
    return per_channel * max(latent.shape[1], _RESULT_CHANNELS) * 4


def _overhead_breakdown(replies: dict[int, Any], marks: dict[str, float], done: float) -> dict | None:
    """Where a job's time outside the engine went, in ms (all processes share the monotonic clock).

    ``to_workers`` ~ host_pack + host_send (to every rank) + delivery (from its send to a rank's
    reader thread) + handoff (reader thread to main thread); ``back_to_host`` = reply_delivery
    + take_result + host_finish. Per-rank parts are the slowest rank's.
    """
    by_rank = {rank: r.info.get("clock") for rank, r in replies.items() if isinstance(r, protocol.Done)}
    if len(by_rank) != len(replies) or not all(by_rank.values()):
        return None
    clocks = list(by_rank.values())
    first = replies[0].info["clock"]
    start = marks["start"]
    sent = marks.get("sent", start)
    collected = marks.get("collected", done)
    taken = marks.get("taken", collected)
    last_reply = max(c["replied"] for c in clocks)
    ms = lambda seconds: round(seconds * 1000, 2)  # noqa: E731
    return {
        "to_workers": ms(max(c["received"] for c in clocks) - start),
        "host_pack": ms(marks.get("packed", start) - start),
        "host_send": ms(sent - marks.get("packed", start)),
        "delivery": ms(max(c.get("read", c["received"]) - marks.get(f"sent{r}", sent) for r, c in by_rank.items())),
        "handoff": ms(max(c["received"] - c.get("read", c["received"]) for c in clocks)),
        "unpack_inputs": ms(first["engine_started"] - first["received"]),
        "ranks_finish_spread": ms(max(c["engine_finished"] for c in clocks) - min(c["engine_finished"] for c in clocks)),
        "write_result": ms(first["replied"] - first["engine_finished"]),
        "back_to_host": ms(done - last_reply),
        "reply_delivery": ms(collected - last_reply),
        "take_result": ms(taken - collected),
        "host_finish": ms(done - taken),
    }


class WorkerPool:
    """Persistent workers, one per device of ``config``, running the engine's jobs.

    ``job_timeout_s`` bounds the silence during sampling (the first step, or between steps);
    ``load_timeout_s`` bounds a model load; ``start_timeout_s`` the start of the workers. The
    first two default to the environment's ``COMFY_XDIT_JOB_TIMEOUT_S`` / ``COMFY_XDIT_LOAD_TIMEOUT_S``,
    else to a bound scaled by the loaded model's size (``timeouts.py``).
    ``worker_env`` adds environment variables for the workers (e.g. allocator settings).
    ``log_dir`` keeps the workers' logs there; by default they go to a temporary folder that
    ``close()`` removes (``comfy_xdit_pool_<host pid>_...``: a killed host leaves it, logs and all).
    """

    def __init__(
        self,
        config: ParallelConfig,
        *,
        job_timeout_s: float | None = None,
        load_timeout_s: float | None = None,
        start_timeout_s: float = 180.0,
        worker_env: dict[str, str] | None = None,
        log_dir: str | os.PathLike | None = None,
        cluster: Cluster | None = None,
    ):
        if not isinstance(config, ParallelConfig):
            raise ConfigError(f"WorkerPool needs a ParallelConfig, got {type(config).__name__}")
        self._check_devices(config)
        self.config = config
        # None: the environment's, else scaled by the model's size (job_silence_s, load_silence_s).
        self.job_timeout_s = float(job_timeout_s) if job_timeout_s is not None else timeouts.from_environment(timeouts.ENV_JOB_TIMEOUT)
        self.load_timeout_s = float(load_timeout_s) if load_timeout_s is not None else timeouts.from_environment(timeouts.ENV_LOAD_TIMEOUT)
        self._model_bytes = 0  # of the last model loaded, for the default timeouts
        self.start_timeout_s = float(start_timeout_s)
        self._worker_env = dict(worker_env or {})
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._own_log_dir = log_dir is None
        # Several hosts: node 0 (here) keeps the store the other nodes' agents watch.
        if config.nnodes > 1 and cluster is None:
            raise ConfigError(f"devices {list(config.devices)} span {config.nnodes} nodes: give cluster=Cluster(master_addr, "
                              "master_port) and run `comfy-xdit worker` on the other nodes")
        self.cluster = cluster
        self._cluster_key = cluster_key() if cluster is not None else None
        self._store: HostStore | None = None

        self._job_lock = threading.RLock()  # one job (or start) at a time
        self._state_lock = threading.Lock()  # what status() reads
        self._state = "stopped"  # stopped -> running -> broken -> running ... -> closed
        self._workers: list[WorkerProcess] = []
        self._reaper: Reaper | None = None
        self._token = shm.new_token()
        # Shared memory reused by every job (created on the first sample, unlinked by close()).
        self._arenas = shm.HostArenas(self._token)
        self._job_id = 0
        self._generation = 0
        self._spec: ModelSpec | None = None  # what the caller last loaded successfully
        self._vae_fingerprints: set[str] = set()  # VAEs the current workers hold
        self._lora_apply_count = 0
        self._controlnet_load_count = 0  # ControlNet weight loads by the current workers
        self._loaded_spec: ModelSpec | None = None  # what the current workers hold
        self._load_count = 0
        self._jobs_done = 0
        self._current: dict | None = None  # the running job's progress
        self._last_steps: list[float] = []
        self._last_job: dict | None = None
        self._last_error: str | None = None
        self._marks: dict[str, float] = {}  # clock points of the running sample job

    def _check_devices(self, config: ParallelConfig) -> None:
        check_devices(config)

    def job_silence_s(self) -> float:
        """The longest silence allowed while sampling or decoding before the pool counts as hung."""
        if self.job_timeout_s is not None:
            return self.job_timeout_s
        return timeouts.default_job_timeout_s(self._model_bytes)

    def load_silence_s(self, model_bytes: int | None = None) -> float:
        """The longest a load may take (of ``model_bytes``, default the current model's)."""
        if self.load_timeout_s is not None:
            return self.load_timeout_s
        return timeouts.default_load_timeout_s(self._model_bytes if model_bytes is None else model_bytes)

    # lifecycle

    def __enter__(self) -> "WorkerPool":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> "WorkerPool":
        """Start the workers; a no-op when running; a broken pool is replaced by fresh workers."""
        with self._job_lock:
            if self._state == "closed":
                raise PoolError("this worker pool was closed; create a new one")
            dead = [w for w in self._workers if w.exit_status() is not None]
            if self._state == "running" and dead:
                # Died between jobs (e.g. the OOM killer): replace the pool before the next job
                # instead of failing it.
                what = "; ".join(f"{w.label()} {w.exit_status()}" for w in dead)
                log.warning(
                    "comfy_xdit worker pool: %s while idle; restarting the pool\n%s", what, dead[0].log_excerpt()
                )
                self._break(f"{what} while idle")
            if self._state != "running":
                self._spawn()
            return self

    def close(self) -> None:
        """Stop the workers (politely if idle, by signal if a job is running). Idempotent."""
        with self._state_lock:
            if self._state == "closed":
                return
            was_running = self._state == "running"
            self._state = "closed"
        idle = self._job_lock.acquire(blocking=False)
        try:
            workers = self._workers
            if idle and was_running:
                self._shutdown_politely(workers)
            self._terminate(workers)
        finally:
            if idle:
                self._job_lock.release()
        # A job still running on another thread may be copying into the arenas: only unlink them
        # then (their names go at once); that thread unmaps them when it ends.
        self._arenas.close(unmap=idle)
        if self._reaper is not None:
            atexit.unregister(self._reaper.reap)
            self._reaper = None
        if self._own_log_dir and self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
        if self._store is not None:  # the other nodes' agents stop
            self._store.close(self.config.nnodes)
            self._store = None

    def _shutdown_politely(self, workers: list[WorkerProcess]) -> None:
        for w in workers:
            try:
                if w.channel is not None:
                    w.channel.send(protocol.Shutdown())
            except OSError:
                pass
        wait_for_exit(workers, time.monotonic() + SHUTDOWN_GRACE_S)

    def _worker_environment(self, rank: int, device: str, port: int, authkey: bytes,
                            store: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self._worker_env)
        env.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(self.config.world_size),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(self.config.world_size),
                protocol.ENV_DEVICE: device,
                protocol.ENV_AUTHKEY: authkey.hex(),
                protocol.ENV_PARENT_PID: str(os.getpid()),
                protocol.ENV_HOST_PACKAGE: HOST_PACKAGE,
                "PYTHONUNBUFFERED": "1",
            }
        )
        if store is not None:  # a multi-node pool: the ranks meet in the host's TCP store
            env[protocol.ENV_STORE] = store
            env["LOCAL_WORLD_SIZE"] = str(len(self.config.node_devices(0)))
        else:  # one machine: nothing listens on the network (pool/loopback.py)
            env.update(local_rendezvous_environment(self._rendezvous_file(), env))
        # The worker must import this very engine, whatever the caller's sys.path was.
        env["PYTHONPATH"] = os.pathsep.join([str(_IMPORT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        if self.config.device_type == "cpu" and "OMP_NUM_THREADS" not in env:
            # CPU workers share the cores instead of each starting a thread per core.
            env[protocol.ENV_NUM_THREADS] = str(max(1, cpu_count() // self.config.world_size))
        return env

    def _rendezvous_file(self) -> Path:
        return self._log_dir / f"rendezvous.{os.getpid()}.run{self._generation}"

    def _spawn(self) -> None:
        check_local_devices_exist(self.config.devices)  # before any process starts
        if self._workers:
            self._terminate(self._workers)
        self._generation += 1
        self._loaded_spec = None
        self._vae_fingerprints = set()  # fresh workers hold no VAE
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix=f"{LOG_DIR_PREFIX}{os.getpid()}_"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._rendezvous_file().unlink(missing_ok=True)  # a stale FileStore would mislead the new ranks
        shm.sweep_stale_segments()
        if shm.SHM_SUPPORTED:
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()  # now, not inside the first job

        world_size = self.config.world_size
        cluster = self.cluster
        authkey = self._cluster_key or os.urandom(32)
        # Other nodes' workers connect from outside: listen on every interface (authenticated).
        listener = Listener(("0.0.0.0" if cluster else "127.0.0.1", 0), backlog=world_size + 1, authkey=authkey)
        acceptor = Acceptor(listener, world_size)
        acceptor.start()
        control = f"{cluster.master_addr if cluster else '127.0.0.1'}:{listener.address[1]}"
        port = free_port()
        store_prefix = None
        if cluster is not None:
            if self._store is None:
                self._store = HostStore(cluster)
            plan = {"world_size": world_size, "nnodes": self.config.nnodes, "devices": list(self.config.devices),
                    "control": control, "host_package": HOST_PACKAGE}
            store_prefix = f"{cluster.master_addr}:{cluster.master_port}:{self._store.publish(self._generation, plan)}"
        command = [sys.executable, "-m", f"{WORKER_PACKAGE}.worker", "--control", control]
        workers: list = []
        if self._reaper is None:
            self._reaper = Reaper()
            self._reaper.log_dir = self._log_dir if self._own_log_dir else None
            self._reaper.arenas = self._arenas
            atexit.register(self._reaper.reap)
        try:
            for rank, device in enumerate(self.config.devices):
                node, device = split_node(device)
                if node != 0:  # started by that node's agent; known here once it connects
                    workers.append(RemoteWorker(rank, device, node))
                    continue
                log_path = self._log_dir / f"worker-{rank}.run{self._generation}.log"
                with open(log_path, "wb") as log_file:
                    process = Launcher.shared().popen(
                        command,
                        env=self._worker_environment(rank, device, port, authkey, store_prefix),
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        # Own process group: a terminal's Ctrl-C reaches the host only, and the
                        # host can signal a worker together with whatever it started.
                        start_new_session=os.name == "posix",
                    )
                workers.append(WorkerProcess(rank, device, process, log_path))
                self._reaper.workers = workers
            self._workers = workers
            self._handshake(acceptor, workers)
        except BaseException as exc:
            self._terminate(workers)
            with self._state_lock:
                if self._state != "closed":
                    self._state = "broken"
                self._last_error = str(exc)
            raise
        finally:
            acceptor.stop()
            listener.close()
        with self._state_lock:
            if self._state == "closed":  # closed from another thread meanwhile
                self._terminate(workers)
                raise PoolError("the pool was closed while it started")
            self._state = "running"
            self._last_error = None

    def _handshake(self, acceptor: Acceptor, workers: list[WorkerProcess]) -> None:
        """Pair each accepted connection with its worker (by Hello), send Init, await Ready."""
        deadline = time.monotonic() + self.start_timeout_s
        strangers: dict[Any, protocol.Channel] = {}  # accepted, not yet introduced
        waiting = {w.rank for w in workers}
        while waiting:
            while not acceptor.connections.empty():
                channel = protocol.Channel(acceptor.connections.get(), rename=(WORKER_PACKAGE, HOST_PACKAGE))
                strangers[channel.connection] = channel
            by_connection = {w.channel.connection: w for w in workers if w.channel is not None and w.rank in waiting}
            watched = [*strangers, *by_connection]
            ready = wait_readable(watched, timeout=POLL_S) if watched else time.sleep(POLL_S) or []
            for connection in ready:
                if connection in strangers:
                    self._introduce(strangers.pop(connection), workers)
                    continue
                worker = by_connection[connection]
                try:
                    message = worker.channel.recv()
                except (EOFError, OSError):
                    self._raise_start_failure(worker, "closed its control connection")
                if isinstance(message, protocol.Ready):
                    worker.info = message.info
                    waiting.discard(worker.rank)
                elif isinstance(message, protocol.Failed):
                    error = self._remote_exception(worker.rank, message.error)
                    if isinstance(error, ValueError):
                        raise error  # e.g. a configuration the engine refuses
                    self._raise_start_failure(worker, f"failed to start: {message.error.describe()}")
            for w in workers:
                if w.exit_status() is not None:
                    self._raise_start_failure(w, w.exit_status())
            if time.monotonic() > deadline:
                late = ", ".join(str(r) for r in sorted(waiting))
                self._raise_start_failure(
                    workers[min(waiting)],
                    f"was not ready within start_timeout_s={self.start_timeout_s:.0f} s (ranks not ready: {late})",
                )

    def _introduce(self, channel: protocol.Channel, workers: list[WorkerProcess]) -> None:
        try:
            hello = channel.recv()
        except (EOFError, OSError):
            hello = None
        ours = isinstance(hello, protocol.Hello) and 0 <= hello.rank < len(workers)
        if not ours or not workers[hello.rank].accepts(hello) or workers[hello.rank].channel is not None:
            channel.close()  # authenticated, yet not one of the workers we started: ignore it
            return
        workers[hello.rank].channel = channel
        channel.send(protocol.Init(self.config))

    def _raise_start_failure(self, worker: WorkerProcess, what: str):
        time.sleep(0.2)  # let the log catch the last lines
        raise PoolError(
            f"the worker pool ({self.config.describe_degrees()} on {', '.join(self.config.devices)}) could not start: "
            f"{worker.label()} {what}.\n{worker.log_excerpt()}"
        )

    def _break(self, reason: str) -> None:
        """Kill every worker and mark the pool broken; the next call starts fresh workers."""
        self._terminate(self._workers)
        with self._state_lock:
            if self._state != "closed":
                self._state = "broken"
            self._last_error = reason
            self._loaded_spec = None

    # jobs

    def load(self, spec: ModelSpec) -> bool:
        """Load ``spec`` on every worker; False when it was loaded already (warm reuse)."""
        with self._job_lock:
            self._ensure_running()
            return self._load(spec)

    def sample(
        self,
        request: SampleRequest,
        on_step: OnStep | None = None,
        cancel_event: threading.Event | None = None,
    ) -> torch.Tensor:
        """Run one generation on all workers; returns the output latent (float32, CPU).

        ``on_step(step, total, preview)`` runs on this thread after each step. Setting
        ``cancel_event`` (or raising from ``on_step``) stops every rank after the same step and
        raises SamplingCancelled (or the callback's exception); the pool stays warm.
        """
        # Bad settings cost no worker time; NaN or infinite inputs are refused by every rank on its
        # device (quicker there than on this host's CPU), and the pool stays warm either way.
        check_sample_settings(request)
        with self._job_lock:
            self._ensure_running()
            if self._spec is None:
                raise PoolError("no model is loaded in the worker pool; call load(spec) first")
            if self._loaded_spec != self._spec:  # fresh workers after a restart
                self._load(self._spec)
            self._marks = {"start": time.monotonic()}
            replies, result, error = self._run("sample", request, self.job_silence_s(), on_step, cancel_event)
            self._record_sample(replies, self._marks, time.monotonic())
            if error is not None:
                raise error
            return result

    def has_vae(self, fingerprint: str) -> bool:
        """Whether the current workers hold the VAE with these decoder weights."""
        return fingerprint in self._vae_fingerprints

    def load_vae(self, weights: VaeWeights) -> bool:
        """Send a VAE's decoder weights to every worker (once per fingerprint and pool)."""
        with self._job_lock:
            self._ensure_running()
            replies, _, error = self._run("vae_load", weights, self.load_silence_s(), None, None)
            if error is not None:
                raise error
            self._vae_fingerprints.add(weights.fingerprint)
            return bool(replies[0].value)

    def decode(self, request: VaeDecodeRequest) -> torch.Tensor:
        """Patch-parallel VAE decode on all workers; returns the image [B, H, W, 3] in [0, 1]."""
        with self._job_lock:
            self._ensure_running()
            if request.fingerprint not in self._vae_fingerprints:
                raise PoolError("this VAE is not loaded in the worker pool (it restarted?); call load_vae first")
            replies, result, error = self._run("vae_decode", request, self.job_silence_s(), None, None)
            if error is not None:
                raise error
            return result

    def _ensure_running(self) -> None:
        self.start()

    def _load(self, spec: ModelSpec) -> bool:
        self._loaded_spec = None  # unknown until every rank confirms
        model_bytes = timeouts.weights_bytes(spec.path)
        replies, _, error = self._run("load", spec, self.load_silence_s(model_bytes), None, None)
        if error is not None:
            raise error
        self._spec = self._loaded_spec = spec
        self._model_bytes = model_bytes
        self._load_count = replies[0].info.get("load_count", self._load_count)
        return bool(replies[0].value)

    def _run(
        self,
        kind: str,
        payload: Any,
        silence_s: float,
        on_step: OnStep | None,
        cancel_event: threading.Event | None,
    ) -> tuple[dict[int, Any], Any, BaseException | None]:
        """Send one job to every rank and collect every rank's reply (or break the pool).

        Returns the replies by rank, rank 0's result, and the exception the caller should raise
        (the on_step callback's own, or one every rank raised alike), if any.
        """
        self._job_id += 1
        job_id = self._job_id
        spill = None
        self._current = {"job": job_id, "kind": kind, "step": 0, "total": 0, "step_seconds": []}
        try:
            job, spill = self._make_job(job_id, kind, payload)
            data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
            self._marks["packed"] = time.monotonic()
            for w in self._workers:
                try:
                    w.channel.send_bytes(data)
                except OSError:
                    self._raise_dead(w)
                self._marks[f"sent{w.rank}"] = time.monotonic()
            self._marks["sent"] = time.monotonic()
            replies, callback_error = self._collect(job_id, silence_s, on_step, cancel_event)
            self._marks["collected"] = time.monotonic()
            outcome = self._judge(job_id, kind, replies)
            result = None
            if outcome is None and kind in RESULT_JOBS:
                result = self._take_result(replies[0].value)
                spill = None  # taken and unlinked, or never made
                self._marks["taken"] = time.monotonic()
            return replies, result, callback_error or outcome
        finally:
            if spill is not None:  # rank 0 may have made it before the job failed
                shm.unlink_quietly(spill)
            if self._state == "closed":  # close() ran meanwhile and left the unmapping to us
                self._arenas.close()
            with self._state_lock:
                self._last_steps = self._current["step_seconds"]
                self._current = None

    def _make_job(self, job_id: int, kind: str, payload: Any) -> tuple[protocol.Job, str | None]:
        """The job message (large tensors placed in the input arena) and its one-off result segment's name."""
        if kind not in RESULT_JOBS:
            return protocol.Job(job_id, kind, payload), None
        estimate = _result_bytes_estimate(kind, payload)
        payload, _ = self._arenas.pack(payload)
        output, capacity = self._arenas.reserve_output(estimate)
        spill = shm.segment_name(self._token, job_id, "r") if shm.SHM_SUPPORTED else None
        # The arenas' names go with every job: a worker unmaps those the host replaced.
        return protocol.Job(job_id, kind, payload, self._arenas.inputs.name, output, capacity, spill), spill

    def _take_result(self, value: Any) -> torch.Tensor:
        return self._arenas.take(value)

    def _terminate(self, workers: list) -> None:
        terminate(workers)

    def _collect(self, job_id: int, silence_s: float, on_step: OnStep | None, cancel_event: threading.Event | None):
        by_connection = {w.channel.connection: w for w in self._workers}
        replies: dict[int, Any] = {}
        callback_error: BaseException | None = None
        cancel_sent = False
        last_activity = time.monotonic()
        first_failure: float | None = None
        straggler_s = STRAGGLER_S
        while len(replies) < len(self._workers):
            if not cancel_sent and (callback_error is not None or (cancel_event is not None and cancel_event.is_set())):
                cancel = pickle.dumps(protocol.Cancel(job_id), protocol=pickle.HIGHEST_PROTOCOL)
                for w in self._workers:
                    try:
                        w.channel.send_bytes(cancel)
                    except OSError:
                        pass  # a dead worker is reported below
                cancel_sent = True
            for connection in wait_readable(list(by_connection), timeout=POLL_S):
                worker = by_connection[connection]
                while True:
                    try:
                        message = worker.channel.recv()
                    except (EOFError, OSError):
                        self._raise_dead(worker)
                    if getattr(message, "job_id", None) == job_id:
                        last_activity = time.monotonic()
                        if isinstance(message, protocol.Progress):
                            self._note_progress(message)
                            if on_step is not None and callback_error is None:
                                try:
                                    on_step(message.step, message.total, message.preview)
                                except BaseException as exc:  # e.g. ComfyUI's interrupt: stop the ranks first
                                    callback_error = exc
                        else:
                            replies[message.rank] = message
                            if isinstance(message, protocol.Failed) and first_failure is None:
                                first_failure = last_activity
                                straggler_s = OOM_STRAGGLER_S if _is_out_of_memory(message.error) else STRAGGLER_S
                    if not worker.channel.poll():
                        break
            for w in self._workers:
                if w.exit_status() is not None:
                    self._raise_dead(w)
            now = time.monotonic()
            if first_failure is not None and len(replies) < len(self._workers) and now - first_failure > straggler_s:
                self._raise_disagreement(job_id, replies)
            if now - last_activity > silence_s:
                self._raise_hang(job_id, replies, silence_s)
        return replies, callback_error

    def _note_progress(self, message: protocol.Progress) -> None:
        current = self._current
        if current is not None:
            current["step"], current["total"] = message.step, message.total
            current["step_seconds"].append(message.step_seconds)

    def _judge(self, job_id: int, kind: str, replies: dict[int, Any]) -> BaseException | None:
        """None when every rank finished; else the exception to raise (breaking the pool if needed)."""
        outcomes = {type(m) for m in replies.values()}
        if outcomes == {protocol.Done}:
            return None
        if outcomes == {protocol.Cancelled}:
            steps = {rank: m.step for rank, m in replies.items()}
            if len(set(steps.values())) > 1:
                self._raise_disagreement(job_id, replies)
            cancelled = SamplingCancelled(steps[0])
            cancelled.rank_steps = steps
            return cancelled
        if outcomes == {protocol.Failed}:
            first = replies[0].error
            # Messages may differ (an out-of-memory error names its own GPU); the type may not.
            same = all(m.error.type_name == first.type_name for m in replies.values())
            if not same or _is_distributed_error(first):
                self._raise_disagreement(job_id, replies)
            if _is_out_of_memory(first):  # every rank alike: they stopped in step, the pool stays warm
                self._last_error = f"{kind} ran out of memory on every rank: {first.describe()}"
                return WorkerOutOfMemoryError(
                    f"every worker ran out of memory during {self._job_label(job_id)}: {first.describe()}. "
                    f"{OUT_OF_MEMORY_ADVICE} The pool stays loaded."
                )
            self._last_error = f"{kind} failed on every rank: {first.describe()}"
            return self._remote_exception(0, first)  # every rank failed alike: the pool is fine
        self._raise_disagreement(job_id, replies)

    def _remote_exception(self, rank: int, error: protocol.RemoteError) -> BaseException:
        exc = None
        if error.pickled is not None:
            try:
                exc = protocol.loads(error.pickled, rename=(WORKER_PACKAGE, HOST_PACKAGE))
            except Exception:
                exc = None
        if isinstance(exc, ValueError):  # bad input (ConfigError, CheckpointError, ...): keep its type
            if hasattr(exc, "add_note"):
                exc.add_note(f"(raised on pool worker rank {rank})\n{error.traceback.rstrip()}")
            return exc
        return PoolError(f"pool worker rank {rank} raised {error.describe()}\n{error.traceback.rstrip()}")

    # breaking

    def _job_label(self, job_id: int | None = None) -> str:
        """The job and the phase it was in, e.g. 'job 3 (sampling, after step 2/4)'."""
        current = self._current or {"job": job_id, "kind": "?"}
        kind = current["kind"]
        where = f"job {current['job']} ({JOB_PHASES.get(kind, kind)}"
        step, total = current.get("step", 0), current.get("total", 0)
        if kind == "sample" and not total:
            where += ", before the first step finished"
        elif total and step >= total:
            where += f", returning the result after the last step {step}/{total}"
        elif total:
            where += f", after step {step}/{total}"
        return where + ")"

    def _note_pending_progress(self) -> None:
        """Read the progress the live ranks sent before a failure, so the error names the right phase."""
        for w in self._workers:
            channel = getattr(w, "channel", None)
            try:
                while channel is not None and w.exit_status() is None and channel.poll():
                    message = channel.recv()
                    if isinstance(message, protocol.Progress) and self._current and message.job_id == self._current["job"]:
                        self._note_progress(message)
            except (EOFError, OSError):
                continue

    def _raise_dead(self, worker: WorkerProcess):
        if self._state == "closed":
            self._terminate(self._workers)
            raise PoolError("the worker pool was closed while a job was running")
        worker.wait(2.0)  # its connection closed: give the exit status a moment
        time.sleep(0.2)  # let other casualties and the log's last lines land
        self._note_pending_progress()
        dead = [w for w in self._workers if w.exit_status() is not None] or [worker]
        what = "; ".join(f"{w.label()} {w.exit_status() or 'closed its control connection'}" for w in dead)
        excerpt = "\n".join(w.log_excerpt() for w in dead)
        message = (
            f"the worker pool failed during {self._job_label()}: {what}. The pool was shut down and "
            f"starts afresh on the next job.\n{excerpt}"
        )
        self._break(message)
        raise PoolError(message)

    def _raise_out_of_memory(self, job_id: int, failed: protocol.Failed):
        worker = self._workers[failed.rank]
        message = (
            f"{worker.label()} ran out of memory during {self._job_label(job_id)}: {failed.error.describe()}. "
            f"{OUT_OF_MEMORY_ADVICE} The pool was shut down (the other ranks would wait for this one in their "
            f"collectives) and starts afresh on the next job.\nTraceback on rank {failed.rank}:\n"
            f"{failed.error.traceback.rstrip()}"
        )
        self._break(message)
        raise WorkerOutOfMemoryError(message)

    def _raise_hang(self, job_id: int, replies: dict[int, Any], silence_s: float):
        silent = [w for w in self._workers if w.rank not in replies]
        setting = "load_timeout_s" if self._current and self._current["kind"] in ("load", "vae_load") else "job_timeout_s"
        message = (
            f"the worker pool made no progress for {silence_s:.0f} s during {self._job_label(job_id)}; ranks "
            f"{[w.rank for w in silent]} did not answer, so the pool is assumed hung. It was shut down and "
            f"starts afresh on the next job (raise {setting}, or the environment's "
            f"{timeouts.ENV_JOB_TIMEOUT if setting == 'job_timeout_s' else timeouts.ENV_LOAD_TIMEOUT}, if it can "
            f"legitimately take longer).\n"
            + "\n".join(w.log_excerpt() for w in silent)
        )
        self._break(message)
        raise PoolError(message)

    def _raise_disagreement(self, job_id: int, replies: dict[int, Any]):
        out_of_memory = next((m for m in replies.values() if isinstance(m, protocol.Failed) and _is_out_of_memory(m.error)), None)
        if out_of_memory is not None:
            self._raise_out_of_memory(job_id, out_of_memory)
        def outcome(rank: int) -> str:
            m = replies.get(rank)
            if m is None:
                return "no answer"
            if isinstance(m, protocol.Failed):
                return m.error.describe()
            if isinstance(m, protocol.Cancelled):
                return f"cancelled after step {m.step}"
            return "finished"

        per_rank = "; ".join(f"rank {rank}: {outcome(rank)}" for rank in range(self.config.world_size))
        failed = next((m for m in replies.values() if isinstance(m, protocol.Failed)), None)
        message = (
            f"the workers ended {self._job_label(job_id)} differently ({per_rank}), so they may be out of step; the "
            f"pool was shut down and starts afresh on the next job."
        )
        if failed is not None:
            message += f"\nTraceback on rank {failed.rank}:\n{failed.error.traceback.rstrip()}"
        self._break(message)
        raise PoolError(message)

    # status

    def _record_sample(self, replies: dict[int, Any], marks: dict[str, float], done: float) -> None:
        wall = done - marks["start"]
        steps = self._last_steps
        first = replies[0]
        record = {
            "kind": "sample",
            "outcome": {protocol.Done: "done", protocol.Cancelled: "cancelled", protocol.Failed: "failed"}[type(first)],
            "seconds": round(wall, 4),
            "steps": len(steps),
            "seconds_per_step": round(sum(steps) / len(steps), 4) if steps else None,
            "finished_at": time.time(),
        }
        if isinstance(first, protocol.Done):
            self._lora_apply_count = first.info.get("lora_apply_count", self._lora_apply_count)
            self._controlnet_load_count = first.info.get("controlnet_load_count", self._controlnet_load_count)
            engine = first.info.get("engine_seconds")
            record["engine_seconds"] = round(engine, 4) if engine is not None else None
            record["overhead_seconds"] = round(wall - engine, 4) if engine is not None else None
            record["overhead_ms"] = _overhead_breakdown(replies, marks, done)
        with self._state_lock:
            self._last_job = record
            self._jobs_done += 1

    def status(self) -> dict:
        """A JSON-ready snapshot; safe to call from any thread, also while a job runs."""
        with self._state_lock:
            workers = list(self._workers)
            current = dict(self._current) if self._current else None
            spec = self._spec
            status = {
                "state": self._state,
                "busy": current is not None,
                "degrees": self.config.describe_degrees(),
                "world_size": self.config.world_size,
                "devices": list(self.config.devices),
                "generation": self._generation,
                "model": dataclasses.asdict(spec) if spec is not None else None,
                "model_loaded": spec is not None and self._loaded_spec == spec,
                "load_count": self._load_count,
                # How often the workers re-patched LoRA weights (a strength change does it once,
                # without a new load_count).
                "lora_apply_count": self._lora_apply_count,
                "controlnet_load_count": self._controlnet_load_count,
                "jobs_done": self._jobs_done,
                # The silences after which a job or a load counts as hung (set, or scaled by the model).
                "job_timeout_s": round(self.job_silence_s(), 1),
                "load_timeout_s": round(self.load_silence_s(), 1),
                "last_job": dict(self._last_job) if self._last_job else None,
                "last_error": self._last_error,
                "log_dir": str(self._log_dir) if self._log_dir else None,
                "shared_memory": self._arenas.names(),
            }
        if current is not None:
            current["step_seconds"] = (
                round(sum(current["step_seconds"]) / len(current["step_seconds"]), 4)
                if current["step_seconds"]
                else None
            )
        status["current_job"] = current
        status["workers"] = [
            {
                "rank": w.rank,
                "pid": w.pid,
                "device": w.device,
                "alive": w.alive(),
                "exit": w.exit_status(),
                "log": str(w.log_path) if getattr(w, "log_path", None) else None,
                **{k: v for k, v in w.info.items() if k not in ("pid", "device")},
            }
            for w in workers
        ]
        status["pids"] = [w.pid for w in workers]
        return status
