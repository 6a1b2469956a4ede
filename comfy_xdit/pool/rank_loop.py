"""One rank's side of the pool, whatever carries its messages: join the group, build the engine, run jobs.

Both backends run exactly this: a local worker process (``comfy_xdit.worker``) over its
authenticated socket with tensors in shared memory, and a Ray actor (``ray_rank.py``) over
queues its actor methods fill and drain, with tensors pickled through Ray's object store.
What differs is passed in: the channel (``send``/``recv`` of protocol messages), how a job's
tensors are unpacked and its result written (``TensorIO``), and what to do when the host is gone.

Threads: the caller's thread runs jobs; a reader thread takes messages off the channel (so a
cancel arrives while a job runs).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

from . import faults, protocol


class MessageChannel(Protocol):
    def send(self, message: Any) -> None: ...

    def recv(self) -> Any: ...


class TensorIO(Protocol):
    """How a job's large tensors arrive and its result leaves (shm.WorkerMappings, InlineTensors)."""

    def keep_only(self, *names: str | None) -> None: ...

    def unpack(self, obj: Any, name: str | None) -> Any: ...

    def write_result(self, result, segment: str | None, capacity: int, spill: str | None) -> Any: ...

    def close(self) -> None: ...


class InlineTensors:
    """Tensors travel inside the pickled messages (the Ray backend: Ray's object store carries them)."""

    def keep_only(self, *names: str | None) -> None:
        pass

    def unpack(self, obj: Any, name: str | None) -> Any:
        return obj  # unpickled on this rank: already its own copy

    def write_result(self, result, segment: str | None, capacity: int, spill: str | None) -> Any:
        return result.detach().to("cpu").contiguous()

    def close(self) -> None:
        pass


class Reader(threading.Thread):
    """Moves jobs to the job thread and turns a cancel into the flag the engine polls."""

    def __init__(self, channel: MessageChannel, jobs: queue.Queue, on_host_gone: Callable[[], None]):
        super().__init__(name="comfy-xdit-control-reader", daemon=True)
        self.channel = channel
        self.jobs = jobs
        self.cancel = threading.Event()
        self._on_host_gone = on_host_gone
        self._latest_job = protocol.STARTUP

    def run(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except (EOFError, OSError):
                # The host closed the connection without a shutdown: it is gone or gave up on us.
                self._on_host_gone()
                return
            if isinstance(message, protocol.Job):
                # The host sends a job only after every rank finished the previous one, so a
                # late cancel of an old job can never stop this one.
                self._latest_job = message.job_id
                self.cancel.clear()
                self.jobs.put((message, time.monotonic()))
            elif isinstance(message, protocol.Cancel):
                if message.job_id == self._latest_job:
                    self.cancel.set()
            elif isinstance(message, protocol.Shutdown):
                self.jobs.put((message, time.monotonic()))
                return


class Hooks:
    """StepHooks of one job: rank 0 reports progress; every rank answers the cancel vote."""

    def __init__(self, channel: MessageChannel, job_id: int, report: bool, cancel: threading.Event,
                 fault: faults.FaultHook | None = None, rank: int = 0):
        self._channel = channel
        self._job_id = job_id
        self._report = report
        self._cancel = cancel
        self._fault = fault
        self._rank = rank
        self._last = time.perf_counter()
        self.last_step = 0

    def on_step(self, step: int, total: int, preview) -> None:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.last_step = step
        if self._fault is not None:
            if step == 1:
                self._fault.reach("first_step", self._rank)
            if step == max(1, total // 2):
                self._fault.reach("mid_sampling", self._rank)
        if self._report:
            if preview is not None:
                preview = preview.detach().to("cpu")
            self._channel.send(protocol.Progress(self._job_id, step, total, seconds, preview))

    def cancel_requested(self) -> bool:
        return self._cancel.is_set()


def init_distributed(rank: int, world_size: int, device, init_method: str | None = None, store=None) -> None:
    """Join the default process group: a store (local pool: FileStore; multi-node: TCP store) or a tcp:// address (Ray)."""
    import torch.distributed as dist

    if world_size == 1:
        return
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # eager NCCL init: a bad GPU fails here, not in the first job
    if store is not None:
        kwargs["store"] = store
    elif init_method is not None:
        kwargs["init_method"] = init_method
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=30), **kwargs)


def start_engine(config, rank: int, world_size: int, device_name: str, num_threads: int | None,
                 init_method: str | None = None, store=None):
    """Set the device, join the group, build the mesh and the engine; returns (engine, info)."""
    import torch

    from ..mesh import ParallelMesh

    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif num_threads:
        torch.set_num_threads(num_threads)
    # Imported before the process group forms, so the ranks overlap their import time.
    from ..engine import RankEngine

    init_distributed(rank, world_size, device, init_method, store)
    engine = RankEngine(ParallelMesh.build(config, device))
    info = {"pid": os.getpid(), "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return engine, info


# Jobs whose result (a tensor) comes back through the output arena (or inline).
RESULT_JOBS = {
    "sample": lambda engine, request, hooks: engine.sample(request, hooks),
    "vae_decode": lambda engine, request, hooks: engine.decode(request),
}


def run_job(engine, job: protocol.Job, channel: MessageChannel, rank: int, cancel: threading.Event,
            tensors: TensorIO, read: float = 0.0, fault: faults.FaultHook | None = None):
    """One job on this rank; returns the reply (Done or Cancelled; exceptions propagate).

    ``fault`` is the testing hook of ``faults.py`` (None unless COMFY_XDIT_FAULT_FILE is set).
    """
    from ..requests import SamplingCancelled

    if fault is not None and job.kind in ("load", "vae_decode"):
        fault.reach(job.kind, rank)
    if job.kind == "load":
        loaded = engine.load(job.payload)
        return protocol.Done(job.job_id, rank, bool(loaded), {"load_count": engine.load_count})
    if job.kind == "vae_load":
        return protocol.Done(job.job_id, rank, bool(engine.load_vae(job.payload)), {})
    if job.kind in RESULT_JOBS:
        # Monotonic clock points (shared by all processes of the machine) so the host can say
        # where a job's time outside the engine went.
        received = time.monotonic()
        # The arenas stay mapped from job to job; one the host replaced (grew) is unmapped here.
        tensors.keep_only(job.input_segment, job.output_segment)
        request = tensors.unpack(job.payload, job.input_segment)
        hooks = Hooks(channel, job.job_id, report=rank == 0, cancel=cancel, fault=fault, rank=rank)
        started = time.monotonic()
        try:
            result = RESULT_JOBS[job.kind](engine, request, hooks)
        except SamplingCancelled as stop:
            return protocol.Cancelled(job.job_id, rank, stop.step)
        finished = time.monotonic()
        del request  # its tensors may view the input arena, which the next job overwrites
        value = None
        if rank == 0:
            value = tensors.write_result(result, job.output_segment, job.output_capacity, job.spill_segment)
        if fault is not None:
            fault.reach("return_result", rank)
        clock = {"read": read or received, "received": received, "engine_started": started,
                 "engine_finished": finished, "replied": time.monotonic()}
        info = {"engine_seconds": finished - started, "last_step": hooks.last_step, "clock": clock,
                "lora_apply_count": engine.lora_apply_count, "controlnet_load_count": engine.controlnets.load_count}
        return protocol.Done(job.job_id, rank, value, info)
    raise ValueError(f"unknown job kind {job.kind!r}")


def serve(engine, channel: MessageChannel, rank: int, tensors: TensorIO, info: dict,
          on_host_gone: Callable[[], None]) -> None:
    """Announce Ready, then run jobs until Shutdown; leaves the process group on the way out."""
    jobs: queue.Queue = queue.Queue()
    fault = faults.from_environment()
    reader = Reader(channel, jobs, on_host_gone)
    reader.start()
    channel.send(protocol.Ready(rank, info))
    while True:
        job, read = jobs.get()
        if isinstance(job, protocol.Shutdown):
            break
        try:
            reply = run_job(engine, job, channel, rank, reader.cancel, tensors, read, fault)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            reply = protocol.Failed(job.job_id, rank, protocol.RemoteError.capture(exc))
        channel.send(reply)

    # A clean exit lets NCCL and gloo tear down; the host kills us if this takes too long.
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    tensors.close()
