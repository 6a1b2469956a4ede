"""Tensors through POSIX shared memory instead of the control socket.

Ownership: the host owns every segment. A pool keeps two arenas (``HostArenas``): one the
host copies each job's large input tensors into, one rank 0 writes the result into. They are
created on first use, replaced by bigger ones (under new names) only when a job needs more,
and unlinked when the pool closes, so a warm job maps and faults in no fresh memory. A result
that does not fit goes through a one-off segment under a name the host chose; the host
unlinks it (also when the job fails). Workers keep the arenas mapped (``WorkerMappings``) and
never leave a segment registered with their own resource tracker (which would unlink or warn
about it when the worker exits). Segment names carry the host's pid, so
``sweep_stale_segments`` can remove what a killed host left behind.

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


def _nbytes(ref: TensorRef) -> int:
    numel = 1
    for n in ref.shape:
        numel *= n
    return numel * _dtype(ref.dtype).itemsize


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _view(base: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``shape``/``dtype`` over the bytes of ``base`` (a flat uint8 tensor) from ``offset``."""
    numel = 1
    for n in shape:
        numel *= n
    return base[offset : offset + numel * dtype.itemsize].view(dtype).view(shape)


def _release_quietly(segment: shared_memory.SharedMemory) -> bool:
    """Close a mapping; False (still mapped) while a tensor still views it."""
    try:
        segment.close()
    except BufferError:
        return False
    return True


class Arena:
    """A host-owned segment that one kind of data reuses job after job.

    Creating a segment and touching its fresh pages costs a page fault per page in the host and
    in every worker, job after job (expensive in VMs whose memory grows on use). An arena is
    created once and replaced by a bigger one, under a new name, only when a job needs more; the
    workers keep it mapped while its name stays the same.
    """

    GRANULE = 1 << 20

    def __init__(self, token: str, role: str):
        self._token = token
        self._role = role
        self._generation = 0
        self.segment: shared_memory.SharedMemory | None = None
        self._retired: list[shared_memory.SharedMemory] = []  # unlinked, not yet unmapped

    @property
    def name(self) -> str | None:
        segment = self.segment  # status() reads this from other threads
        return segment.name if segment is not None else None

    @property
    def size(self) -> int:
        segment = self.segment
        return segment.size if segment is not None else 0

    def ensure(self, nbytes: int) -> shared_memory.SharedMemory:
        """The arena, replaced first by one of at least ``nbytes`` if it is smaller."""
        if self.segment is not None and self.segment.size >= nbytes:
            return self.segment
        size = max(_round_up(max(nbytes, 1), self.GRANULE), _round_up(self.size + self.size // 2, self.GRANULE))
        self._generation += 1
        segment = shared_memory.SharedMemory(
            name=segment_name(self._token, self._generation, self._role), create=True, size=size
        )
        self.release()
        self.segment = segment
        return segment

    def bytes(self, count: int) -> torch.Tensor:
        """The first ``count`` bytes as a uint8 tensor (a view: drop it before the arena goes)."""
        return torch.frombuffer(self.segment.buf, dtype=torch.uint8, count=count)

    def release(self, unmap: bool = True) -> None:
        """Unlink the arena (its name disappears at once) and unmap it unless ``unmap`` is False."""
        if self.segment is not None:
            try:
                self.segment.unlink()
            except FileNotFoundError:
                pass
            self._retired.append(self.segment)
            self.segment = None
        if unmap:
            self._retired = [s for s in self._retired if not _release_quietly(s)]


class HostArenas:
    """The host's side of a pool's shared memory: one arena for inputs, one for the result.

    Jobs are strictly sequential: the host rewrites the input arena and rank 0 the output arena
    only once every rank has finished the previous job (or was killed), so the workers may read
    their inputs straight from the arena for the whole job.
    """

    def __init__(self, token: str):
        self._token = token
        self.inputs = Arena(token, "i")
        self.output = Arena(token, "o")
        self._result_bytes = 0  # the largest result seen: the output arena's next size

    def names(self) -> list[str]:
        return [a.name for a in (self.inputs, self.output) if a.name is not None]

    def pack(self, obj: Any) -> tuple[Any, str | None]:
        """Copy the large tensors of ``obj`` into the input arena.

        Returns the object with those tensors replaced by TensorRefs, and the arena's name (None
        when nothing was large enough, or shared memory is unsupported).
        """
        large = _large_tensors(obj) if SHM_SUPPORTED else []
        if not large:
            return obj, None
        offsets: dict[int, int] = {}
        size = 0
        for t in large:
            if id(t) not in offsets:
                offsets[id(t)] = size
                size += _round_up(t.numel() * t.element_size(), _ALIGN)
        name = self.inputs.ensure(size).name
        arena = self.inputs.bytes(size)
        written: set[int] = set()

        def place(t: torch.Tensor) -> Any:
            if id(t) not in offsets:
                return t
            offset = offsets[id(t)]
            if id(t) not in written:
                # One copy, from wherever the tensor lies (also a GPU, or strided) into the arena.
                _view(arena, offset, tuple(t.shape), t.dtype).copy_(t.detach())
                written.add(id(t))
            return TensorRef(name, offset, tuple(t.shape), str(t.dtype).removeprefix("torch."))

        try:
            return map_tensors(obj, place, torch.Tensor), name
        finally:
            del arena

    def reserve_output(self, estimate: int) -> tuple[str | None, int]:
        """The output arena for the next result (``estimate`` bytes expected): its name and size."""
        if not SHM_SUPPORTED:
            return None, 0
        segment = self.output.ensure(max(estimate, self._result_bytes))
        return segment.name, segment.size

    def take(self, value: TensorRef | torch.Tensor) -> torch.Tensor:
        """Copy a result out into a fresh tensor the caller owns.

        A result too large for the output arena came in a one-off segment: that is unlinked,
        and the output arena grows to fit the next such result.
        """
        if isinstance(value, torch.Tensor):
            return value
        nbytes = _nbytes(value)
        self._result_bytes = max(self._result_bytes, nbytes)
        if value.segment == self.output.name:
            return _copy_out(self.output.bytes(value.offset + nbytes), value)
        return take_result(value)

    def close(self, unmap: bool = True) -> None:
        """Unlink both arenas; ``unmap=False`` while another thread may still be copying."""
        self.inputs.release(unmap)
        self.output.release(unmap)


def _copy_out(base: torch.Tensor, ref: TensorRef) -> torch.Tensor:
    dtype = _dtype(ref.dtype)
    out = torch.empty(ref.shape, dtype=dtype)
    if out.numel():
        out.copy_(_view(base, ref.offset, ref.shape, dtype))
    return out


def take_result(value: TensorRef | torch.Tensor) -> torch.Tensor:
    """Host side: copy a result out of a one-off segment and unlink the segment."""
    if isinstance(value, torch.Tensor):
        return value
    segment = shared_memory.SharedMemory(name=value.segment)
    try:
        base = torch.frombuffer(segment.buf, dtype=torch.uint8, count=value.offset + _nbytes(value))
        out = _copy_out(base, value)
        del base  # release the buffer export before the segment closes
        return out
    finally:
        segment.close()
        segment.unlink()


class WorkerMappings:
    """A worker's side: the host's arenas stay mapped for as long as their names stay the same.

    ``copy_inputs`` (CPU workers, where the engine computes on the request's tensors as they
    are) copies the inputs into a private buffer the worker reuses, so no rank can see another
    rank's in-place change. Otherwise (GPU workers) the request's tensors are views on the
    input arena: the engine copies them to its device at the start of the job and never
    writes to them. Either way a request's tensors are valid for their job only (the next job
    overwrites them); the engine keeps no reference to a request after ``sample`` returns. A
    payload the engine does keep (weights, say) must be unpacked with ``keep=True``.
    """

    def __init__(self, copy_inputs: bool):
        self.copy_inputs = copy_inputs
        self._mapped: dict[str, shared_memory.SharedMemory] = {}
        self._retired: list[shared_memory.SharedMemory] = []
        self._private: torch.Tensor | None = None

    def _map(self, name: str) -> shared_memory.SharedMemory:
        segment = self._mapped.get(name)
        if segment is None:
            segment = shared_memory.SharedMemory(name=name)
            _untrack(segment)
            self._mapped[name] = segment
        return segment

    def keep_only(self, *names: str | None) -> None:
        """Unmap every arena but ``names`` (the host replaced them: grown, or the pool closed)."""
        for name in [n for n in self._mapped if n not in names]:
            self._retired.append(self._mapped.pop(name))
        self._retired = [s for s in self._retired if not _release_quietly(s)]

    def mapped(self) -> list[str]:
        return list(self._mapped)

    def unpack(self, obj: Any, name: str | None, keep: bool = False) -> Any:
        """Replace every TensorRef of ``obj`` (all in arena ``name``) by its tensor.

        The tensors are valid until the next job, unless ``keep``: then they are the caller's
        own copies (for a payload the engine holds on to, such as weights).
        """
        if name is None:
            return obj
        refs: list[TensorRef] = []
        map_tensors(obj, refs.append, TensorRef)
        end = max((r.offset + _nbytes(r) for r in refs), default=0)
        if not end:
            return map_tensors(obj, lambda r: torch.empty(r.shape, dtype=_dtype(r.dtype)), TensorRef)
        base = torch.frombuffer(self._map(name).buf, dtype=torch.uint8, count=end)
        if keep:
            return map_tensors(obj, lambda r: _view(base, r.offset, r.shape, _dtype(r.dtype)).clone(), TensorRef)
        if self.copy_inputs:
            if self._private is None or self._private.numel() < end:
                self._private = torch.empty(_round_up(end, Arena.GRANULE), dtype=torch.uint8)
            private = self._private[:end]
            private.copy_(base)
            base = private
        return map_tensors(obj, lambda r: _view(base, r.offset, r.shape, _dtype(r.dtype)), TensorRef)

    def write_result(
        self, tensor: torch.Tensor, arena: str | None, capacity: int, spill: str | None
    ) -> TensorRef | torch.Tensor:
        """Rank 0: place the result in the output arena, or in the one-off segment ``spill``
        (which the host unlinks) when it does not fit; pickled when shared memory is off."""
        nbytes = tensor.numel() * tensor.element_size()
        if not SHM_SUPPORTED or nbytes == 0 or (arena is None and spill is None):
            return tensor.detach().to("cpu")
        if arena is not None and nbytes <= capacity:
            name, segment, one_off = arena, self._map(arena), False
        else:
            name, one_off = spill, True
            segment = shared_memory.SharedMemory(name=spill, create=True, size=nbytes)
            _untrack(segment)
        try:
            base = torch.frombuffer(segment.buf, dtype=torch.uint8, count=nbytes)
            _view(base, 0, tuple(tensor.shape), tensor.dtype).copy_(tensor.detach())
            del base
        finally:
            if one_off:
                _release_quietly(segment)
        return TensorRef(name, 0, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))

    def close(self) -> None:
        self.keep_only()


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


def process_exists(pid: int) -> bool:
    """Whether a process with this pid exists (anyone's)."""
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
        if not process_exists(int(_NAME.match(name).group(1))):
            try:
                (_DEV_SHM / name).unlink()
                removed.append(name)
            except OSError:
                pass
    return removed
