"""bench/trace_gaps.py: idle time is what no stream covers, and a gap names the host ops running
in it. A small trace in torch.profiler's chrome format, written here, and a real one exported by
torch.profiler on the CPU (no device events: the report says so)."""

from __future__ import annotations

import gzip
import json

import torch

from test_bench_peers import bench_module


def kernel(ts, dur, stream=7, name="gemm"):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": stream}


def host(ts, dur, name):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}


def test_gaps_are_what_no_stream_covers_and_name_the_host_ops(tmp_path):
    gaps = bench_module("trace_gaps")
    events = [
        kernel(0, 100), kernel(50, 100, stream=9),  # overlapping streams: busy 0-150
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 150, "dur": 10, "pid": 0, "tid": 7},  # busy to 160
        kernel(400, 50),  # idle 160-400: 240 us
        kernel(460, 40),  # idle 450-460: 10 us
        host(100, 600, "run_ksampler"), host(200, 150, "aten::to"), host(900, 10, "later"),
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 300},  # not a span: ignored
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)

    loaded = gaps.load_events(path)
    busy = gaps.busy_intervals(loaded)
    assert busy == [(0.0, 160.0), (400.0, 450.0), (460.0, 500.0)]
    assert gaps.idle_gaps(busy) == [gaps.Gap(160.0, 240.0), gaps.Gap(450.0, 10.0)]
    assert gaps.host_ops_at(loaded, 280.0) == ["run_ksampler", "aten::to"]
    text = gaps.report(path, min_us=20)
    assert text.splitlines()[0].endswith("device span 0.5 ms, busy 0.2 ms, idle 0.25 ms (50.0%) in 2 gaps; "
                                         "1 gaps of at least 20 us hold 0.24 ms")
    assert text.splitlines()[1] == "    0.240 ms at     0.16 ms: run_ksampler > aten::to"


def test_a_trace_exported_by_the_profiler_loads(tmp_path):
    gaps = bench_module("trace_gaps")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(8) @ torch.ones(8)
    path = tmp_path / "cpu_trace.json"
    prof.export_chrome_trace(str(path))
    assert any(e["cat"] == "cpu_op" for e in gaps.load_events(path))
    assert gaps.report(path).endswith("no device activity in the trace")
