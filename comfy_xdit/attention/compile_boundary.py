"""Ring attention as one opaque operator for torch.compile.

Dynamo cannot trace the ring's point-to-point send/recv: every ring attention broke the graph
(12 breaks in a 2-block model), splitting each transformer block into small compiled pieces with
Python between them. Registered as a custom op, the whole attention (communication included) is
one node the compiler calls but does not look into, so each block compiles to a single graph
around it while the ring runs its eager, overlapped schedule.

Process groups cannot be operator arguments, so the op receives a small integer handle to the
SequenceParallelAttention that owns them.
"""

from __future__ import annotations

import itertools
import weakref

import torch

# Weak, so a model that is replaced frees its attention (and process-group references).
_ATTENTIONS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_NEXT_HANDLE = itertools.count()


def register(attention) -> int:
    handle = next(_NEXT_HANDLE)
    _ATTENTIONS[handle] = attention
    return handle


@torch.library.custom_op("comfy_xdit::sequence_parallel_attention", mutates_args=())
def sequence_parallel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, text_tokens: int, image_tokens: int,
    padded_image_tokens: int, text_sharded: bool,
) -> torch.Tensor:
    from .usp import SequenceLayout

    layout = SequenceLayout(text_tokens, image_tokens, padded_image_tokens, text_sharded)
    return _ATTENTIONS[handle].attend(q, k, v, layout)


@sequence_parallel_attention.register_fake
def _(q, k, v, handle, text_tokens, image_tokens, padded_image_tokens, text_sharded):
    # The output has the queries' layout: [B, text + this rank's image shard, heads, head_dim].
    return torch.empty_like(q)
