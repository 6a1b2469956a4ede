"""The messages between the pool host and its workers, and the channel that carries them.

Messages are small dataclasses pickled onto a ``multiprocessing.connection`` socket that was
authenticated with the pool's key; large tensors travel through shared memory (``shm.py``) and
appear here only as references.

The host may import this engine under another package name than the workers do (inside
ComfyUI the pack's folder is the parent package, so the host sees ``<pack>.comfy_xdit`` while a
worker started with ``-m comfy_xdit.worker`` sees ``comfy_xdit``). The channel therefore
renames the engine's package in every class it unpickles, so a ``ModelSpec`` or ``ConfigError``
arrives as the receiver's own class.
"""

from __future__ import annotations

import io
import pickle
import threading
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

# Environment variables the host sets for each worker (the auth key never goes on argv, where
# any user of the machine could read it).
ENV_AUTHKEY = "COMFY_XDIT_AUTHKEY"
ENV_PARENT_PID = "COMFY_XDIT_PARENT_PID"
ENV_DEVICE = "COMFY_XDIT_DEVICE"
ENV_HOST_PACKAGE = "COMFY_XDIT_HOST_PACKAGE"
ENV_NUM_THREADS = "COMFY_XDIT_NUM_THREADS"
# HOST:PORT:PREFIX of a multi-node pool's TCP store, where the ranks rendezvous instead of env://.
ENV_STORE = "COMFY_XDIT_STORE"
# A one-machine pool's rendezvous file (torch FileStore): no listening socket at all.
ENV_STORE_FILE = "COMFY_XDIT_STORE_FILE"

# Job id of the start-up handshake, for errors raised before the first job.
STARTUP = -1


# host -> worker


@dataclass
class Init:
    config: Any  # ParallelConfig


@dataclass
class Job:
    job_id: int
    kind: str  # "load" or "sample"
    payload: Any  # ModelSpec, or SampleRequest with large tensors as shm.TensorRef
    input_segment: str | None = None  # the input arena, holding the payload's large tensors
    output_segment: str | None = None  # the output arena, where rank 0 writes the result...
    output_capacity: int = 0  # ...when it fits these many bytes; else rank 0 creates
    spill_segment: str | None = None  # a one-off segment under this name (the host unlinks it)


@dataclass
class Cancel:
    job_id: int


@dataclass
class Shutdown:
    pass


# worker -> host


@dataclass
class Hello:
    rank: int
    pid: int


@dataclass
class Ready:
    rank: int
    info: dict


@dataclass
class Progress:
    job_id: int
    step: int
    total: int
    step_seconds: float
    preview: Any = None  # small CPU tensor or None


@dataclass
class Done:
    job_id: int
    rank: int
    value: Any = None  # load: whether it loaded; sample (rank 0): shm.TensorRef or a tensor
    info: dict = field(default_factory=dict)


@dataclass
class Cancelled:
    job_id: int
    rank: int
    step: int


@dataclass
class RemoteError:
    """An exception raised on a worker, as text plus (when it pickles) the exception itself."""

    type_name: str
    module: str
    message: str
    traceback: str
    pickled: bytes | None = None

    @classmethod
    def capture(cls, exc: BaseException) -> "RemoteError":
        pickled = None
        try:
            pickled = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.loads(pickled)  # refuse exceptions that pickle but cannot be rebuilt
        except Exception:
            pickled = None
        return cls(
            type_name=type(exc).__qualname__,
            module=type(exc).__module__,
            message=str(exc),
            traceback="".join(traceback.format_exception(exc)),
            pickled=pickled,
        )

    def describe(self) -> str:
        return f"{self.type_name}: {self.message}"


@dataclass
class Failed:
    job_id: int
    rank: int
    error: RemoteError


class _RenamingUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, rename: tuple[str, str] | None):
        super().__init__(io.BytesIO(data))
        self._rename = rename

    def find_class(self, module: str, name: str):
        if self._rename is not None:
            foreign, local = self._rename
            if module == foreign or module.startswith(foreign + "."):
                module = local + module[len(foreign) :]
        return super().find_class(module, name)


def loads(data: bytes, rename: tuple[str, str] | None = None) -> Any:
    """Unpickle, mapping classes of the peer's engine package (``rename[0]``) onto ours."""
    if rename is None or rename[0] == rename[1]:
        return pickle.loads(data)
    return _RenamingUnpickler(data, rename).load()


class Channel:
    """One authenticated connection: whole messages, sends serialised across threads."""

    def __init__(self, connection: Connection, rename: tuple[str, str] | None = None):
        self.connection = connection
        self._rename = rename
        self._send_lock = threading.Lock()

    def send(self, message: Any) -> None:
        self.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def send_bytes(self, data: bytes) -> None:
        """Send an already pickled message (the host encodes a job once for every worker)."""
        with self._send_lock:
            self.connection.send_bytes(data)

    def recv(self) -> Any:
        return loads(self.connection.recv_bytes(), self._rename)

    def poll(self) -> bool:
        return self.connection.poll()

    def close(self) -> None:
        try:
            self.connection.close()
        except OSError:
            pass
