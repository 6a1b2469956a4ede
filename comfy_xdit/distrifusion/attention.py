"""Attention of one image patch against the keys/values of every patch, the others' one step stale.

DistriFusion splits the image tokens over the ranks of its group like sequence parallelism, but
every rank holds the whole model and never waits for the other patches inside a step: each
attention layer computes its own patch's keys/values, starts an asynchronous all-gather of them
and attends to its fresh own K/V next to the other patches' K/V gathered at the previous
evaluation of the same conditioning branch. The gather of this step finishes in the background
and is waited for only at the same layer of the next evaluation, so communication overlaps the
rest of the step.

A synchronous (warmup) evaluation waits for the gather at once and attends to all-fresh K/V: it
is exactly the single-worker attention, and it fills the state the next evaluation reads.

Text tokens (Flux's joint attention) are replicated and always fresh. After warmup each rank's
text queries see its own mixture of fresh and stale image K/V, so the ranks' text states differ
slightly; only the image tokens of each rank's own patch are gathered into the output.

Flux and PixArt have no GroupNorm, so DistriFusion's exchange of stale GroupNorm statistics (for
its convolutional U-Nets) has nothing to apply to: attention K/V are the only exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..attention.kernels import plain_attention
from ..attention.usp import SequenceLayout


@dataclass
class ExchangeMode:
    """Shared by the attention layers of one model; the denoiser sets it before each evaluation."""

    branch: int | None = None  # which state to use: one per conditioning branch (positive, negative)
    synchronous: bool = True
    exchange: bool = True  # False: attend only to the own patch's image tokens (diagnostic switch)


class DisplacedPatchAttention:
    """One attention layer's DistriFusion attention over the ranks of ``group``."""

    def __init__(self, mode: ExchangeMode, group: dist.ProcessGroup):
        self.mode = mode
        self.group = group
        self.degree = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # branch -> (every patch's [K; V] of the last evaluation, the gather still filling them)
        self.gathered: dict[int, tuple[list[torch.Tensor], dist.Work | None]] = {}

    def clear(self) -> None:
        """Finish gathers still in flight (every rank issued them) and forget the state."""
        for _, work in self.gathered.values():
            if work is not None:
                work.wait()
        self.gathered.clear()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        """q, k, v: [B, text + this rank's (padded) patch, H, D] -> attention output shaped like q."""
        mode = self.mode
        t = layout.text_tokens
        # K and V travel together: one collective per layer instead of two.
        fresh = torch.cat([k[:, t:], v[:, t:]], dim=0).contiguous()
        parts = [torch.empty_like(fresh) for _ in range(self.degree)]
        work = dist.all_gather(parts, fresh, group=self.group, async_op=True)
        if mode.synchronous:
            work.wait()
            self.gathered[mode.branch] = (parts, None)
            patches = parts
        else:
            stale = self.gathered.get(mode.branch)
            if stale is None:
                raise RuntimeError("internal: a DistriFusion step ran before a synchronous step filled its K/V state")
            previous, pending = stale
            if pending is not None:
                pending.wait()
            patches = [fresh if i == self.rank else previous[i] for i in range(self.degree)]
            self.gathered[mode.branch] = (parts, work)  # read at the next evaluation of this branch
        if mode.exchange or mode.synchronous:
            # Padding sits at the end of the last patch and is never attended.
            image_kv = torch.cat(patches, dim=1)[:, : layout.image_tokens]
        else:
            shard = fresh.shape[1]
            image_kv = fresh[:, : max(0, min(shard, layout.image_tokens - self.rank * shard))]
        image_k, image_v = image_kv.chunk(2, dim=0)
        return plain_attention(
            q,
            torch.cat([k[:, :t], image_k], dim=1),
            torch.cat([v[:, :t], image_v], dim=1),
        )
