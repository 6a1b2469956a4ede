"""A testing hook: make one rank fail at a chosen phase of its work, deterministically.

``COMFY_XDIT_FAULT_FILE=FILE`` in the workers' environment arms the hook. Whenever a rank
reaches a phase it looks at FILE; a line ``PHASE:RANK[:ACTION]`` there makes rank RANK do ACTION
on reaching PHASE:

- phases: ``load`` (a model load job), ``first_step`` (after the first denoising step, the
  warmup of compile and caches), ``mid_sampling`` (after step total // 2), ``vae_decode`` (a
  decode job), ``return_result`` (the engine finished; rank 0 has written the result, the
  reply is not sent)
- actions: ``kill`` (SIGKILL itself, the default), ``hang`` (SIGSTOP itself: alive but silent),
  ``oom`` (raise torch.OutOfMemoryError, as an allocation on a full GPU would)

The rank that fires first renames FILE to FILE.fired (so a fault fires once, and the pool that
replaces a broken one runs clean) and writes the moment into it, on the monotonic clock that
every process of the machine shares. A test (or a person at a running ComfyUI) arms a fault by
writing FILE, without restarting anything.

The reliability tests (tests/test_faults.py, tests/test_comfyui_faults.py) use it; it is not
for production. Unset, it costs one ``is None`` check per phase.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ENV_FAULT_FILE = "COMFY_XDIT_FAULT_FILE"
PHASES = ("load", "first_step", "mid_sampling", "vae_decode", "return_result")
ACTIONS = ("kill", "hang", "oom")


@dataclass(frozen=True)
class Fault:
    phase: str
    rank: int
    action: str = "kill"


def parse(value: str) -> Fault:
    parts = value.strip().split(":")
    if len(parts) not in (2, 3) or parts[0] not in PHASES or not parts[1].isdigit() or parts[2:3] not in ([], *([a] for a in ACTIONS)):
        raise ValueError(f"fault {value.strip()!r}: expected PHASE:RANK[:ACTION] with PHASE one of {PHASES} "
                         f"and ACTION one of {ACTIONS}")
    return Fault(parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "kill")


class FaultHook:
    """The armed hook of one rank: reads the fault file at each phase."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def reach(self, phase: str, rank: int) -> None:
        try:
            fault = parse(self.path.read_text())
        except (OSError, ValueError):
            return  # nothing armed (or a half-written file: the next phase reads it again)
        if fault.phase != phase or fault.rank != rank or not self._claim():
            return
        print(f"comfy_xdit fault hook: rank {rank} does {fault.action!r} at {phase!r} ({ENV_FAULT_FILE})", flush=True)
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            import torch

            raise torch.OutOfMemoryError(
                f"out of memory: tried to allocate 2.00 GiB on rank {rank} (simulated by the {ENV_FAULT_FILE} testing hook)"
            )

    def _claim(self) -> bool:
        fired = fired_path(self.path)
        try:
            os.rename(self.path, fired)  # atomic: one rank wins
        except OSError:
            return False
        with open(fired, "a") as marker:
            marker.write(f"\n{time.monotonic()!r}\n")
        return True


def fired_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.fired")


def from_environment(env=os.environ) -> FaultHook | None:
    """The armed hook, or None (the normal case)."""
    path = env.get(ENV_FAULT_FILE)
    return FaultHook(path) if path else None


def arm(path: str | os.PathLike, fault: str) -> None:
    """Arm a fault for the workers whose hook reads ``path`` (written whole, then renamed into place)."""
    parse(fault)
    fired_path(path).unlink(missing_ok=True)
    staging = Path(f"{path}.new")
    staging.write_text(fault)
    os.replace(staging, path)


def fired_at(path: str | os.PathLike) -> float | None:
    """When the fault armed at ``path`` fired (monotonic clock), or None if it did not."""
    try:
        return float(fired_path(path).read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None
