"""The worker processes as the host sees them: starting, accepting, watching, stopping.

Everything here is about operating-system processes and sockets, not about jobs: ``host.py``
builds the pool's protocol on top.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from pathlib import Path

from . import protocol

TERM_GRACE_S = 2.0  # SIGTERM -> SIGKILL
LOG_TAIL_LINES = 25


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (empty)"


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (SIGKILL from outside usually means the system ran out of memory)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


@dataclass
class WorkerProcess:
    """A worker process this host started (the host can signal it, wait for it and read its log)."""

    rank: int
    device: str
    process: subprocess.Popen
    log_path: Path
    channel: protocol.Channel | None = None
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def accepts(self, hello: protocol.Hello) -> bool:
        """Whether a connection that introduced itself with ``hello`` is this worker's."""
        return hello.pid == self.process.pid

    def label(self) -> str:
        return f"worker rank {self.rank} (pid {self.process.pid}, {self.device})"

    def exit_status(self) -> str | None:
        code = self.process.poll()
        return None if code is None else describe_exit(code)

    def log_excerpt(self) -> str:
        return f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"

    def signal(self, sig: int) -> None:
        signal_group(self, sig)

    def wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            pass


@dataclass
class RemoteWorker:
    """A rank another host started (a multi-node agent): known only by its control connection.

    The host cannot signal it; closing the connection is what stops it (a worker exits when
    its host's connection ends), and a closed connection is how its death shows here.
    """

    rank: int
    device: str
    node: int
    channel: protocol.Channel | None = None
    info: dict = field(default_factory=dict)
    gone: str | None = None  # why its connection ended, once it did

    @property
    def pid(self) -> int | None:
        return self.info.get("pid")

    def alive(self) -> bool:
        return self.gone is None

    def accepts(self, hello: protocol.Hello) -> bool:
        return True  # it authenticated with the cluster key and named a rank of another node

    def label(self) -> str:
        return f"worker rank {self.rank} (node {self.node}, pid {self.pid}, {self.device})"

    def exit_status(self) -> str | None:
        return self.gone

    def log_excerpt(self) -> str:
        return f"its log is on node {self.node}, in the output of `comfy-xdit worker --node-rank {self.node}`"

    def signal(self, sig: int) -> None:
        if sig == signal.SIGKILL and self.channel is not None:
            self.channel.close()  # the remote worker exits when its connection ends
            self.gone = self.gone or "was disconnected by the host"

    def wait(self, timeout: float) -> None:
        pass


def signal_group(worker: WorkerProcess, sig: int) -> None:
    """Signal a live worker and everything it started (it leads its own process group)."""
    if worker.process.poll() is not None:
        return  # reaped: its pid (and group id) may belong to someone else by now
    try:
        if os.name == "posix":
            os.killpg(worker.process.pid, sig)
        elif sig == signal.SIGTERM:
            worker.process.terminate()
        else:
            worker.process.kill()
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_exit(workers, deadline: float) -> None:
    """Give every worker until ``deadline`` (a monotonic time) to exit; returns either way."""
    for w in workers:
        w.wait(deadline - time.monotonic())


def terminate(workers, grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM, then SIGKILL what is left; every worker is reaped on return."""
    for w in workers:
        w.signal(signal.SIGTERM)
        if hasattr(signal, "SIGCONT"):
            w.signal(signal.SIGCONT)  # a stopped worker acts on SIGTERM only once resumed
    wait_for_exit(workers, time.monotonic() + grace_s)
    for w in workers:
        w.signal(signal.SIGKILL)
    for w in workers:
        w.wait(5.0)
        if w.channel is not None:
            w.channel.close()


class Reaper:
    """The atexit hook of one pool: holds the workers, not the pool, so the pool can be collected."""

    def __init__(self) -> None:
        self.workers: list[WorkerProcess] = []
        self.log_dir: Path | None = None  # removed too, when the pool made it
        self.arenas = None  # the pool's shm.HostArenas, unlinked too

    def reap(self) -> None:
        terminate(self.workers, grace_s=0.5)
        if self.arenas is not None:
            self.arenas.close(unmap=False)  # a job thread may still be copying: unlink only
        if self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)


class Launcher:
    """Starts worker processes from one long-lived thread.

    Linux delivers PR_SET_PDEATHSIG when the *thread* that created the child exits, not the
    process. ComfyUI runs prompts on a worker thread; starting the pool from there would tie
    the workers' lives to that thread. One daemon thread that lives as long as the process
    ties them to the process instead.
    """

    _lock = threading.Lock()
    _instance: "Launcher | None" = None

    def __init__(self) -> None:
        self._requests: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="comfy-xdit-launcher", daemon=True).start()

    @classmethod
    def shared(cls) -> "Launcher":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _serve(self) -> None:
        while True:
            args, kwargs, reply = self._requests.get()
            try:
                reply.put((subprocess.Popen(args, **kwargs), None))
            except BaseException as exc:
                reply.put((None, exc))

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        reply: queue.Queue = queue.Queue(maxsize=1)
        self._requests.put((args, kwargs, reply))
        process, error = reply.get()
        if error is not None:
            raise error
        return process


class Acceptor(threading.Thread):
    """Accepts the workers' control connections so the host can watch processes meanwhile."""

    def __init__(self, listener: Listener, count: int):
        super().__init__(name="comfy-xdit-pool-accept", daemon=True)
        self.listener = listener
        self.count = count
        self.connections: queue.Queue = queue.Queue()
        self._stopping = False

    def run(self) -> None:
        accepted = errors = 0
        while accepted < self.count and errors < 100:
            try:
                connection = self.listener.accept()
            except Exception:  # a stray local client that failed authentication, or we are stopping
                if self._stopping:
                    return
                errors += 1
                continue
            if self._stopping:
                connection.close()
                return
            self.connections.put(connection)
            accepted += 1

    def stop(self) -> None:
        self._stopping = True
        if self.is_alive():
            try:  # wake the blocked accept(); closing the socket would not on Linux
                socket.create_connection(self.listener.address, timeout=1.0).close()
            except OSError:
                pass
            self.join(timeout=2.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
