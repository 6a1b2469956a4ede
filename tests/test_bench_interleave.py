"""bench/flux_loop.py --interleave: the launch's diffusers and ours rows take their timed runs in
turn (diffusers, ours, diffusers, ours, ...), so a card that slows as it heats cannot favour the
row timed first. Tiny Flux on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_loop(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(BENCH / "flux_loop.py"), "--device", "cpu", "--tiny", "--steps", "2",
           "--json", str(tmp_path / "rows.jsonl"), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_interleaved_rows_take_turns(tmp_path):
    done = run_loop(tmp_path, "--impl", "diffusers,ours", "--interleave", "--runs", "3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [row["impl"] for row in rows] == ["diffusers", "ours"]
    assert all(row["interleaved"] and len(row["times"]) == 3 and row["finite"] for row in rows)
    diffusers, ours = (row["run_starts_s"] for row in rows)
    turns = [t for pair in zip(diffusers, ours) for t in pair]
    assert turns == sorted(turns), f"runs did not alternate: diffusers {diffusers}, ours {ours}"


def test_interleave_refuses_rows_it_cannot_pair(tmp_path):
    done = run_loop(tmp_path, "--impl", "ours", "--interleave", "--cache", "none")
    assert done.returncode != 0 and "--interleave: diffusers and ours rows only" in done.stdout + done.stderr
