"""bench/run.py's launch watchdog kills a hung launch's whole process tree, including children
started in sessions of their own (as torchrun starts its workers), so a launch that hangs at
exit cannot hold the group's output open past its timeout."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import psutil

RUN = Path(__file__).resolve().parent.parent / "bench" / "run.py"

# A parent that starts a worker in a new session and then hangs, as torchrun does around a hung worker.
HUNG_LAUNCH = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(worker.pid, flush=True)
time.sleep(120)
"""


def test_kill_tree_kills_workers_in_their_own_sessions():
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    launch = subprocess.Popen([sys.executable, "-c", HUNG_LAUNCH], stdout=subprocess.PIPE, text=True, start_new_session=True)
    worker = psutil.Process(int(launch.stdout.readline()))
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    run.kill_tree(launch.pid)
    assert launch.wait(timeout=10) != 0
    gone, alive = psutil.wait_procs([worker], timeout=10)
    assert not alive, "the worker in its own session outlived the watchdog"
    # Its stdout is closed once every process holding it is gone: the group's read loop ends.
    deadline = time.monotonic() + 10
    assert launch.stdout.read() == "" and time.monotonic() < deadline
