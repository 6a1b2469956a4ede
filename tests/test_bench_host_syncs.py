"""bench/host_syncs.py: the sync debug mode's warnings are counted by the call site that made them,
other warnings are not, and the warning state is left as it was. torch's sync debug mode itself
needs a GPU, so here the mode switch is recorded and the warning is raised as torch raises it."""

from __future__ import annotations

import warnings

import pytest

from test_bench_peers import bench_module


def test_syncs_are_counted_by_call_site_and_the_mode_is_switched_back():
    host_syncs = bench_module("host_syncs")
    modes = []

    def item_like():  # stands for a tensor.item() inside the step
        warnings.warn(host_syncs.SYNC_WARNING)

    def step():
        item_like()
        warnings.warn("an unrelated warning")

    def loop():
        for _ in range(3):
            step()

    before = warnings.showwarning
    counts = host_syncs.count_host_syncs(loop, set_mode=modes.append)
    assert modes == ["warn", 0]
    assert warnings.showwarning is before
    [(site, n)] = counts.items()
    assert n == 3
    innermost, caller, outer = site.split(" <- ")
    assert innermost.startswith("test_bench_host_syncs.py:") and innermost.endswith(" item_like")
    assert caller.endswith(" step") and outer.endswith(" loop")
    text = host_syncs.report(counts, 3, "ours u1r1")
    assert text.splitlines()[0] == "== host syncs ours u1r1: 3 in a loop of 3 steps"


def test_the_mode_is_switched_back_when_the_loop_fails():
    host_syncs = bench_module("host_syncs")
    modes = []

    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        host_syncs.count_host_syncs(failing, set_mode=modes.append)
    assert modes == ["warn", 0]


def test_sync_steps_need_gpus():
    loop = bench_module("flux_loop")
    with pytest.raises(SystemExit, match="--sync-steps: CUDA's sync debug mode needs GPUs"):
        loop.main(["--device", "cpu", "--tiny", "--impl", "ours", "--sync-steps", "2"])
