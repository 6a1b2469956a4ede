"""Replay the model's forward as a captured CUDA graph.

Sharded over several GPUs, one Flux step is only tens of milliseconds of GPU work per GPU, and
launching its thousands of kernels from Python takes about as long: the GPUs wait on the host.
A CUDA graph records the kernels (the NCCL collectives of the sequence-parallel attention
included) once per input signature and replays them with one launch, so the host cost of a step
becomes a few input copies.

Captured once per signature (shapes, dtypes, which inputs are present): a new resolution or text
length captures again, a new seed, sigma, prompt of the same length or LoRA strength replays (the
weights are patched in place, so the graph reads the new values). Every rank captures and replays
in the same order, because all ranks run the same sampler with the same request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

# A few graphs: cond and uncond of different text lengths, and a couple of resolutions.
MAX_GRAPHS = 4
WARMUP_CALLS = 2  # cuBLAS/cuDNN plans, NCCL communicators and torch.compile settle before capture


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


def _signature(inputs: dict) -> tuple | None:
    key = []
    for name in sorted(inputs):
        value = inputs[name]
        if value is None:
            key.append((name, None))
        elif isinstance(value, torch.Tensor):
            key.append((name, tuple(value.shape), value.dtype, value.device))
        else:
            return None  # lists of ControlNet residuals and the like: not captured
    return tuple(key)


class CudaGraphForward:
    """Calls ``forward(**tensors)`` by replaying a CUDA graph captured for those input shapes."""

    def __init__(self, forward: Callable[..., torch.Tensor], pool=None):
        self.forward = forward
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        # One memory pool shared by all graphs (``pool``: also by other wrappers' graphs; graphs
        # that share a pool must never replay concurrently, which one stream guarantees).
        self._pool = torch.cuda.graph_pool_handle() if pool is None else pool
        self.capture_count = 0

    def __call__(self, **inputs) -> torch.Tensor:
        key = _signature(inputs)
        if key is None:
            return self.forward(**inputs)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(inputs)
            self._graphs[key] = captured
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            for name, value in inputs.items():
                if value is not None:
                    captured.inputs[name].copy_(value)
        captured.graph.replay()
        # The output buffer is overwritten by the next replay (cfg calls the graph twice per step).
        return captured.output.clone()

    def _capture(self, inputs: dict) -> _Captured:
        static = {name: (value.clone() if value is not None else None) for name, value in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.forward(**static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread keeps polling its events while this thread captures.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = self.forward(**static)
        self.capture_count += 1
        return _Captured(graph, static, output)
