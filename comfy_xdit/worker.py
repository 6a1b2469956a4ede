"""One rank of the worker pool: ``python -m comfy_xdit.worker --control HOST:PORT``.

The pool host starts one of these per device with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
the device and the control connection's auth key in the environment. The worker joins the
process group, builds the mesh and the engine, and then runs jobs until told to stop. It dies
with its host however the host ends (parent-death signal, parent polling, and the control
connection's end of file), so a killed ComfyUI leaves no worker behind.

Threads: the main thread runs jobs; a reader thread takes messages off the control connection
(so a cancel arrives while a job runs); a watchdog thread checks that the host is still alive.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import queue
import signal
import sys
import threading
import time
from datetime import timedelta

from .pool import protocol, shm

_LOCAL_PACKAGE = __spec__.parent if __spec__ is not None else __name__.rpartition(".")[0]
_PR_SET_PDEATHSIG = 1
_EXIT_HOST_GONE = 75


def die_with_parent(parent_pid: int) -> None:
    """Exit as soon as the host process is gone, however it went."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still covers it
    if os.getppid() != parent_pid:  # the host died before the signal was armed
        os._exit(_EXIT_HOST_GONE)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(_EXIT_HOST_GONE)

    threading.Thread(target=watch, name="comfy-xdit-parent-watch", daemon=True).start()


class _Reader(threading.Thread):
    """Moves jobs to the main thread and turns a cancel into the flag the engine polls."""

    def __init__(self, channel: protocol.Channel, jobs: queue.Queue):
        super().__init__(name="comfy-xdit-control-reader", daemon=True)
        self.channel = channel
        self.jobs = jobs
        self.cancel = threading.Event()
        self._latest_job = protocol.STARTUP

    def run(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except (EOFError, OSError):
                # The host closed the connection without a shutdown: it is gone or gave up on us.
                os._exit(_EXIT_HOST_GONE)
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


class _Hooks:
    """StepHooks of one job: rank 0 reports progress; every rank answers the cancel vote."""

    def __init__(self, channel: protocol.Channel, job_id: int, report: bool, cancel: threading.Event):
        self._channel = channel
        self._job_id = job_id
        self._report = report
        self._cancel = cancel
        self._last = time.perf_counter()
        self.last_step = 0

    def on_step(self, step: int, total: int, preview) -> None:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.last_step = step
        if self._report:
            if preview is not None:
                preview = preview.detach().to("cpu")
            self._channel.send(protocol.Progress(self._job_id, step, total, seconds, preview))

    def cancel_requested(self) -> bool:
        return self._cancel.is_set()


def _init_distributed(rank: int, world_size: int, device):
    import torch.distributed as dist

    if world_size == 1:
        return
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # eager NCCL init: a bad GPU fails here, not in the first job
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=30), **kwargs)


# Jobs whose result (a tensor) comes back through the output arena.
_RESULT_JOBS = {
    "sample": lambda engine, request, hooks: engine.sample(request, hooks),
    "vae_decode": lambda engine, request, hooks: engine.decode(request),
}


def _run_job(
    engine,
    job: protocol.Job,
    channel: protocol.Channel,
    rank: int,
    cancel: threading.Event,
    mappings: shm.WorkerMappings,
    read: float = 0.0,
):
    from .requests import SamplingCancelled

    if job.kind == "load":
        loaded = engine.load(job.payload)
        return protocol.Done(job.job_id, rank, bool(loaded), {"load_count": engine.load_count})
    if job.kind == "vae_load":
        return protocol.Done(job.job_id, rank, bool(engine.load_vae(job.payload)), {})
    if job.kind in _RESULT_JOBS:
        # Monotonic clock points (shared by all processes of the machine) so the host can say
        # where a job's time outside the engine went.
        received = time.monotonic()
        # The arenas stay mapped from job to job; one the host replaced (grew) is unmapped here.
        mappings.keep_only(job.input_segment, job.output_segment)
        request = mappings.unpack(job.payload, job.input_segment)
        hooks = _Hooks(channel, job.job_id, report=rank == 0, cancel=cancel)
        started = time.monotonic()
        try:
            result = _RESULT_JOBS[job.kind](engine, request, hooks)
        except SamplingCancelled as stop:
            return protocol.Cancelled(job.job_id, rank, stop.step)
        finished = time.monotonic()
        del request  # its tensors may view the input arena, which the next job overwrites
        value = None
        if rank == 0:
            value = mappings.write_result(result, job.output_segment, job.output_capacity, job.spill_segment)
        clock = {"read": read or received, "received": received, "engine_started": started, "engine_finished": finished, "replied": time.monotonic()}
        info = {"engine_seconds": finished - started, "last_step": hooks.last_step, "clock": clock,
                "lora_apply_count": engine.lora_apply_count, "controlnet_load_count": engine.controlnets.load_count}
        return protocol.Done(job.job_id, rank, value, info)
    raise ValueError(f"unknown job kind {job.kind!r}")


def _start(channel: protocol.Channel, rank: int, world_size: int, device_name: str, num_threads: int | None):
    """Everything between the handshake and the first job; returns the engine."""
    import torch

    from .mesh import ParallelMesh

    init = channel.recv()
    if not isinstance(init, protocol.Init):
        raise RuntimeError(f"expected the pool's Init message, got {type(init).__name__}")
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif num_threads:
        torch.set_num_threads(num_threads)
    # Imported before the process group forms, so the ranks overlap their import time.
    from .engine import RankEngine

    _init_distributed(rank, world_size, device)
    mesh = ParallelMesh.build(init.config, device)
    engine = RankEngine(mesh)
    info = {
        "pid": os.getpid(),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return engine, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfy_xdit.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--control", required=True, help="HOST:PORT of the pool host's control listener")
    args = parser.parse_args(argv)

    env = os.environ
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    device_name = env[protocol.ENV_DEVICE]
    authkey = bytes.fromhex(env.pop(protocol.ENV_AUTHKEY))  # not for anything this worker starts
    die_with_parent(int(env[protocol.ENV_PARENT_PID]))
    host_package = env.get(protocol.ENV_HOST_PACKAGE, _LOCAL_PACKAGE)
    num_threads = int(env[protocol.ENV_NUM_THREADS]) if env.get(protocol.ENV_NUM_THREADS) else None

    from multiprocessing.connection import Client

    host, _, port = args.control.rpartition(":")
    channel = protocol.Channel(Client((host, int(port)), authkey=authkey), rename=(host_package, _LOCAL_PACKAGE))
    channel.send(protocol.Hello(rank, os.getpid()))
    print(f"comfy_xdit worker rank {rank}/{world_size} pid {os.getpid()} device {device_name}", flush=True)

    try:
        if shm.SHM_SUPPORTED:
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()  # now, not inside the first job's timing
        engine, info = _start(channel, rank, world_size, device_name, num_threads)
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        channel.send(protocol.Failed(protocol.STARTUP, rank, protocol.RemoteError.capture(exc)))
        return 1

    # CPU workers compute on the request's tensors as they are: give each rank its own copy.
    mappings = shm.WorkerMappings(copy_inputs=not device_name.startswith("cuda"))
    jobs: queue.Queue = queue.Queue()
    reader = _Reader(channel, jobs)
    reader.start()
    channel.send(protocol.Ready(rank, info))

    while True:
        job, read = jobs.get()
        if isinstance(job, protocol.Shutdown):
            break
        try:
            reply = _run_job(engine, job, channel, rank, reader.cancel, mappings, read)
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
    mappings.close()
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
