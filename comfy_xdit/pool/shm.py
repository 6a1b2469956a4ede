"""Tensors through POSIX shared memory instead of the control socket.

Ownership: the host names every segment of a job and unlinks it when the job ends, whatever
happened. Workers only attach to the host's input segment, or create the output segment under
the name the host chose, and never leave either registered with their own resource tracker
(which would unlink or warn about it when the worker exits). Segment names carry the host's
pid, so ``sweep_stale_segments`` can remove what a killed host left behind.

Where POSIX shared memory is missing (Windows), ``SHM_SUPPORTED`` is False and tensors are
pickled through the socket instead; that path is slower, never wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import secrets
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Any, Callable

import torch

SHM_SUPPORTED = os.name == "posix"
# Tensors smaller than this are cheaper to pickle than to place in shared memory.
INLINE_BYTES = 16 * 1024
_ALIGN = 64
_PREFIX = "cxdit"
_DEV_SHM = Path("/dev/shm")
_NAME = re.compile(rf"^{_PREFIX}(\d+)_")


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor lies in a shared-memory segment."""

    segment: str
    offset: int
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch."


def segment_name(token: str, job_id: int, role: str) -> str:
    """A name that says which host owns it (short: macOS allows 31 characters)."""
    return f"{_PREFIX}{os.getpid()}_{token}_{job_id}{role}"


def new_token() -> str:
    return secrets.token_hex(3)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r} in a shared-memory reference")
    return dtype


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def _untrack(segment: shared_memory.SharedMemory) -> None:
    # Python < 3.13 registers every attach and create with this process's resource tracker,
    # which would unlink the host's segment when this worker exits. The host owns it.
    try:
        resource_tracker.unregister(getattr(segment, "_name", "/" + segment.name), "shared_memory")
    except Exception:
        pass


def map_tensors(obj: Any, fn: Callable[[Any], Any], kind: type) -> Any:
    """A copy of ``obj`` with every ``kind`` inside dataclasses, dicts, lists and tuples replaced."""
    if isinstance(obj, kind):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, map_tensors(getattr(obj, f.name), fn, kind))
        return new
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn, kind) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(v, fn, kind) for v in obj]
    if isinstance(obj, tuple):
        items = [map_tensors(v, fn, kind) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def _large_tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def visit(t: torch.Tensor) -> torch.Tensor:
        if t.numel() * t.element_size() >= INLINE_BYTES:
            found.append(t)
        return t

    map_tensors(obj, visit, torch.Tensor)
    return found


def pack(obj: Any, name: str) -> tuple[Any, shared_memory.SharedMemory | None]:
    """Move the large tensors of ``obj`` into a new segment ``name`` (owned by the caller).

    Returns the object with those tensors replaced by TensorRefs, and the segment (None when
    nothing was large enough, or shared memory is unsupported).
    """
    large = _large_tensors(obj) if SHM_SUPPORTED else []
    if not large:
        return obj, None
    offsets: dict[int, int] = {}
    size = 0
    for t in large:
        if id(t) not in offsets:
            offsets[id(t)] = size
            size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    segment = shared_memory.SharedMemory(name=name, create=True, size=size)
    try:
        written: set[int] = set()

        def place(t: torch.Tensor) -> Any:
            if id(t) not in offsets:
                return t
            offset = offsets[id(t)]
            if id(t) not in written:
                data = _as_bytes(t)
                dst = torch.frombuffer(segment.buf, dtype=torch.uint8, count=data.numel(), offset=offset)
                dst.copy_(data)
                del dst
                written.add(id(t))
            return TensorRef(name, offset, tuple(t.shape), str(t.dtype).removeprefix("torch."))

        packed = map_tensors(obj, place, torch.Tensor)
    except BaseException:
        segment.close()
        segment.unlink()
        raise
    return packed, segment


def _read(segment: shared_memory.SharedMemory, ref: TensorRef) -> torch.Tensor:
    dtype = _dtype(ref.dtype)
    numel = 1
    for n in ref.shape:
        numel *= n
    if numel == 0:
        return torch.empty(ref.shape, dtype=dtype)
    view = torch.frombuffer(segment.buf, dtype=dtype, count=numel, offset=ref.offset)
    out = view.reshape(ref.shape).clone()
    del view  # release the buffer export before the segment closes
    return out


def unpack(obj: Any, name: str | None) -> Any:
    """Worker side of ``pack``: copy every TensorRef of segment ``name`` out into a tensor."""
    if name is None:
        return obj
    segment = shared_memory.SharedMemory(name=name)
    _untrack(segment)
    try:
        return map_tensors(obj, lambda ref: _read(segment, ref), TensorRef)
    finally:
        segment.close()


def write_result(tensor: torch.Tensor, name: str | None) -> TensorRef | torch.Tensor:
    """Worker side: place a result in a new segment the host will read and unlink."""
    data = _as_bytes(tensor)
    if name is None or not SHM_SUPPORTED or data.numel() == 0:
        return tensor.detach().to("cpu")
    segment = shared_memory.SharedMemory(name=name, create=True, size=data.numel())
    _untrack(segment)
    try:
        dst = torch.frombuffer(segment.buf, dtype=torch.uint8, count=data.numel())
        dst.copy_(data)
        del dst
    finally:
        segment.close()
    return TensorRef(name, 0, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))


def take_result(value: TensorRef | torch.Tensor) -> torch.Tensor:
    """Host side: copy a result out of its segment and unlink the segment."""
    if isinstance(value, torch.Tensor):
        return value
    segment = shared_memory.SharedMemory(name=value.segment)
    try:
        return _read(segment, value)
    finally:
        segment.close()
        segment.unlink()


def unlink_quietly(name: str) -> None:
    """Remove a segment if it exists (a worker may have died before or after creating it)."""
    if not SHM_SUPPORTED:
        return
    try:
        segment = shared_memory.SharedMemory(name=name)
    except (FileNotFoundError, OSError):
        return
    segment.close()
    segment.unlink()


def release(segment: shared_memory.SharedMemory | None) -> None:
    if segment is None:
        return
    segment.close()
    try:
        segment.unlink()
    except FileNotFoundError:
        pass


def our_segments(pid: int | None = None) -> list[str]:
    """Names of this package's segments in /dev/shm (of one host pid, or all)."""
    if not _DEV_SHM.is_dir():
        return []
    names = []
    for entry in _DEV_SHM.iterdir():
        match = _NAME.match(entry.name)
        if match and (pid is None or int(match.group(1)) == pid):
            names.append(entry.name)
    return names


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_stale_segments() -> list[str]:
    """Unlink segments whose host process is gone (it was killed mid-job); returns their names."""
    removed = []
    for name in our_segments():
        if not _process_exists(int(_NAME.match(name).group(1))):
            try:
                (_DEV_SHM / name).unlink()
                removed.append(name)
            except OSError:
                pass
    return removed
