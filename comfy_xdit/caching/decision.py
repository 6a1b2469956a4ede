"""The skip metric, computed from this rank's tokens and reduced over every rank of the same images.

Both caches compare a tensor of the image tokens with its value at an earlier step:
relative L1 = sum|current - previous| / sum|previous| (the mean ratio of ParaAttention and
TeaCache: both sums run over the same elements). Under sequence parallelism each rank holds a
shard of the image tokens, so a rank-local ratio differs from rank to rank and a decision made on
it would let ranks disagree about skipping, after which their collectives no longer match. So
each rank sums its own tokens, the two sums are all-reduced, and every rank decides on the same
number.

Which ranks reduce together: those holding parts of the same model call's input, that is the
Ulysses and Ring groups (tokens) and the data group (rows). One worker with a batch of 2 computes
one metric over both rows, so reducing over the data group keeps N workers equal to one. The cfg
group is not reduced: with one worker the conditional and unconditional calls are separate calls
with separate cache state, and with cfg parallel each cfg rank holds one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def real_tokens(local_tokens: int, layout, shard_index: int) -> int:
    """How many of this rank's image tokens are real (the last shards may carry zero padding)."""
    if layout is None:
        return local_tokens
    return max(0, min(local_tokens, layout.image_tokens - shard_index * local_tokens))


@dataclass
class ReducedRelativeL1:
    """sum|a - b| / sum|b| over the real image tokens of every rank in ``groups`` (dim 1 = tokens)."""

    groups: list[dist.ProcessGroup] = field(default_factory=list)
    shard_index: int = 0
    # The last call's ratio from this rank's tokens alone; recorded for tests and logs, never decided on.
    last_local: float = float("nan")

    @classmethod
    def for_mesh(cls, mesh) -> "ReducedRelativeL1":
        groups = [g for g in (mesh.group("ulysses"), mesh.group("ring"), mesh.group("data")) if g is not None]
        return cls(groups, mesh.sequence_parallel_rank)

    def __call__(self, current: torch.Tensor, previous: torch.Tensor, layout) -> float:
        n = real_tokens(current.shape[1], layout, self.shard_index)
        current, previous = current[:, :n], previous[:, :n]
        # float64 sums: the reduced ratio then differs from one worker's only by summation order.
        sums = torch.stack([(current - previous).abs().sum(dtype=torch.float64), previous.abs().sum(dtype=torch.float64)])
        local = sums.tolist()
        self.last_local = local[0] / local[1] if local[1] else float("inf")
        for group in self.groups:  # sum over ulysses, then ring, then data: the sum over their product
            dist.all_reduce(sums, group=group)
        diff, base = sums.tolist()
        return diff / base if base else float("inf")
