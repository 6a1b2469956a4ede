"""CFG's two branches as one model call of twice the batch, as diffusers' pipelines and ComfyUI do.

Two calls of batch B launch every kernel twice; one call of batch 2B launches each once. On a GPU
that is bound by the host (small models like SD3-medium: docs/performance.md, run I) the
batched call is what matters; on a GPU-bound model it changes little. The branches can share a
call only when their conditionings have the same shapes (ComfyUI pads or repeats text of other
lengths; we keep two calls there, which is exact) and the same non-tensor values.
"""

from __future__ import annotations

import dataclasses

import torch


def stack_branches(positive, negative, rows: int):
    """positive's and negative's tensors stacked along the batch ([positive rows, negative rows]),
    or None when the two cannot share one call. Conditionings are the families' dataclasses; a
    tensor field's batch is 1 (shared by every row) or ``rows``."""
    if type(positive) is not type(negative):
        return None
    stacked = {}
    for field in dataclasses.fields(positive):
        a, b = getattr(positive, field.name), getattr(negative, field.name)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape[1:] != b.shape[1:] or a.shape[0] not in (1, rows) or b.shape[0] not in (1, rows):
                return None
            stacked[field.name] = torch.cat([a.expand(rows, *a.shape[1:]), b.expand(rows, *b.shape[1:])])
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a != b:
            return None
    return dataclasses.replace(positive, **stacked)
