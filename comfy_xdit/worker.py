"""One rank of the worker pool: ``python -m comfy_xdit.worker --control HOST:PORT``.

The pool host starts one of these per device with RANK, WORLD_SIZE, its rendezvous (pool/loopback.py),
the device and the control connection's auth key in the environment. The worker joins the
process group, builds the mesh and the engine, and then runs jobs until told to stop. It dies
with its host however the host ends (parent-death signal, parent polling, and the control
connection's end of file), so a killed ComfyUI leaves no worker behind.

The job handling itself is ``pool/rank_loop.py``, which the Ray backend's actors share; this
module is what is particular to a worker process: its environment, its control socket, and a
watchdog thread that checks that the host (or the multi-node agent that started it) is alive.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

from .pool import protocol, rank_loop, shm

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
        init = channel.recv()
        if not isinstance(init, protocol.Init):
            raise RuntimeError(f"expected the pool's Init message, got {type(init).__name__}")
        engine, info = rank_loop.start_engine(init.config, rank, world_size, device_name, num_threads,
                                              store=_rendezvous_store(env))
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        channel.send(protocol.Failed(protocol.STARTUP, rank, protocol.RemoteError.capture(exc)))
        return 1

    # CPU workers compute on the request's tensors as they are: give each rank its own copy.
    mappings = shm.WorkerMappings(copy_inputs=not device_name.startswith("cuda"))
    rank_loop.serve(engine, channel, rank, mappings, info, on_host_gone=lambda: os._exit(_EXIT_HOST_GONE))
    channel.close()
    return 0


def _rendezvous_store(env):
    """The multi-node pool's TCP store (``ENV_STORE`` = HOST:PORT:PREFIX), a local pool's FileStore, or None for env://."""
    from datetime import timedelta

    import torch.distributed as dist

    if env.get(protocol.ENV_STORE_FILE):  # one machine: a file in the pool's private folder, no socket
        return dist.FileStore(env[protocol.ENV_STORE_FILE], int(env["WORLD_SIZE"]))
    where = env.get(protocol.ENV_STORE)
    if not where:
        return None

    host, port, prefix = where.rsplit(":", 2)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(minutes=5))
    return dist.PrefixStore(prefix, store)


if __name__ == "__main__":
    sys.exit(main())
