"""Unified sequence parallelism (Ulysses x Ring) for joint text+image attention.

Each rank holds all text tokens (replicated: they are short and every image token attends to
them) and one shard of the image tokens. Ulysses trades the image shard for a slice of heads with
one all-to-all; Ring then passes the image keys/values of the ring group around, merging partial
results through their log-sum-exp. Text keys/values are attended once, locally, so text of any
length is exact and never has to divide by a degree.

Image tokens may be padded at the end of the sequence so they divide by the degree; padded keys
are trimmed before attention (never attended), padded queries are dropped by the caller.

Where the text length divides by the degree, a model's plan may split the text tokens too
(``SequenceLayout.text_sharded``): each rank then holds [its text shard, its image shard], the
two travel through the same all-to-all and ring, and no rank repeats another's text projections
and MLPs (at Flux-dev 1024px and degree 4 that repeated work was a third of each rank's tokens).
Attention does not depend on the order of its keys, and rotary positions were applied before, so
the shards' interleaving [text 0, image 0, text 1, image 1, ...] leaves the result exact.

The collectives come from yunchang (all-to-all, ring send/recv, the lse merge); its global
process-group singleton is never used: groups are passed in explicitly.

Without a ring, the Ulysses all-to-alls can run beside other work (ulysses_chunks.py, functional
collectives): ``start`` issues the q/k/v all-to-all and returns at once, ``finish`` attends, so a
caller's independent work queued between the two (Flux's single-block MLP) overlaps it; and
``head_chunks`` > 1 splits each rank's heads into chunks whose all-to-alls pipeline with the other
chunks' attention; ``head_chunks=None`` chooses (``auto_head_chunks``). Both are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from yunchang.comm.all_to_all import all_to_all_4D
from yunchang.ring.utils import RingComm, update_out_and_lse

from . import ulysses_chunks
from .kernels import Kernel, plain_attention

# What head_chunks=None picks where it can: 2 chunks took Flux-dev at ulysses=2 from 2.431 to
# 2.315 s (compiled + CUDA graphs, 2 x H200, docs/performance.md run R). In run S, 4 chunks were
# no faster than 2, and 3 or 6 slower than none.
AUTO_HEAD_CHUNKS = 2


def auto_head_chunks(heads_per_rank: int, ulysses_degree: int, ring_degree: int) -> int:
    """head_chunks=None's choice: AUTO_HEAD_CHUNKS where Ulysses runs without a ring and the chunks
    divide a rank's heads, else 1 (no pipelining)."""
    if ulysses_degree > 1 and ring_degree == 1 and heads_per_rank % AUTO_HEAD_CHUNKS == 0:
        return AUTO_HEAD_CHUNKS
    return 1


def resolve_head_chunks(head_chunks: int | None, heads: int, ulysses_degree: int, ring_degree: int) -> int:
    """The head chunks attention over ``heads`` heads (all ranks' together) runs in: an explicit
    count, checked, or auto_head_chunks' choice for None."""
    if head_chunks is None:
        return auto_head_chunks(heads // ulysses_degree, ulysses_degree, ring_degree)
    # A silent fallback to one chunk would leave a benchmark row labelled with chunks it did not use.
    if heads % (ulysses_degree * head_chunks):
        raise ValueError(f"head_chunks={head_chunks} does not divide the {heads // ulysses_degree} heads "
                         f"each of the {ulysses_degree} Ulysses ranks holds; use a divisor of that count")
    return head_chunks


@dataclass
class SequenceLayout:
    """Where the image tokens of one forward pass live across the sequence-parallel ranks."""

    text_tokens: int
    image_tokens: int  # real tokens, before padding
    padded_image_tokens: int  # divisible by the sequence-parallel degree
    # text_tokens is this rank's shard of the text, not all of it (see the module docstring)
    text_sharded: bool = False


@dataclass
class InFlightAttention:
    """The Ulysses all-to-alls ``SequenceParallelAttention.start`` issued; ``finish`` waits on them."""

    scattered: list[torch.Tensor]  # each head chunk's q/k/v, in flight (ulysses_chunks.scatter_head_chunk)
    # Text kept whole (not sharded): this rank's heads of the text q, k, v, attended locally.
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


class SequenceParallelAttention:
    def __init__(
        self,
        ulysses_group: dist.ProcessGroup | None,
        ring_group: dist.ProcessGroup | None,
        lse_kernel: Kernel | None,
        head_chunks: int | None = 1,
    ):
        self.ulysses_group = ulysses_group
        self.ring_group = ring_group
        self.ulysses_degree = dist.get_world_size(ulysses_group) if ulysses_group is not None else 1
        self.ulysses_rank = dist.get_rank(ulysses_group) if ulysses_group is not None else 0
        self.ring_degree = dist.get_world_size(ring_group) if ring_group is not None else 1
        self.ring_rank = dist.get_rank(ring_group) if ring_group is not None else 0
        if self.ring_degree > 1 and lse_kernel is None:
            raise ValueError("ring attention needs a kernel that returns a log-sum-exp")
        self.lse_kernel = lse_kernel
        if head_chunks is not None and (not isinstance(head_chunks, int) or head_chunks < 1):
            raise ValueError(f"head_chunks must be a whole number of at least 1 or None, got {head_chunks!r}")
        if head_chunks is not None and head_chunks > 1 and (self.ulysses_degree == 1 or self.ring_degree > 1):
            raise ValueError(f"head_chunks={head_chunks} pipelines the Ulysses all-to-all: it needs ulysses_degree > 1 "
                             f"and ring_degree 1, got {self.ulysses_degree} and {self.ring_degree}")
        self.head_chunks = head_chunks  # None: auto_head_chunks, per call from the heads it sees
        from . import compile_boundary

        # Registered now, not while dynamo traces: dynamo defers a traced function's side effects
        # until after the graph ran, when the op would already have looked the handle up.
        self._compile_handle = compile_boundary.register(self)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        """q, k, v: [B, text + local image shard, H, D] -> attention output of the same shape."""
        # Only the ring goes behind the custom op: dynamo cannot trace its send/recv, while the
        # Ulysses all-to-all traces, and measured faster traced (2.70 s against 3.37 s opaque,
        # Flux-dev 1024px on 2 x H200, docs/performance.md).
        if self.ring_degree > 1 and torch.compiler.is_compiling():
            from . import compile_boundary

            return compile_boundary.sequence_parallel_attention(
                q, k, v, self._compile_handle, layout.text_tokens, layout.image_tokens, layout.padded_image_tokens,
                layout.text_sharded)
        return self.attend(q, k, v, layout)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        if self.chunks_for(q.shape[2]) > 1:
            return self.finish(self.start(q, k, v, layout), layout)
        if layout.text_sharded:
            return self._attend_sharded_text(q, k, v, layout)
        t = layout.text_tokens
        text_q, text_k, text_v = q[:, :t], k[:, :t], v[:, :t]
        image_q, image_k, image_v = self._ulysses_scatter_heads(q[:, t:], k[:, t:], v[:, t:])
        text_q, text_k, text_v = (self._local_heads(x) for x in (text_q, text_k, text_v))

        chunk = image_q.shape[1]  # image tokens this ring rank holds after the all-to-all
        queries = torch.cat([text_q, image_q], dim=1)
        if self.ring_degree == 1:
            valid = self._valid_image_tokens(layout, 0, chunk)
            keys = torch.cat([text_k, image_k[:, :valid]], dim=1)
            values = torch.cat([text_v, image_v[:, :valid]], dim=1)
            out = (plain_attention(queries, keys, values) if self.lse_kernel is None
                   else self.lse_kernel.fn(queries, keys, values)[0])
        else:
            out = self._ring(queries, text_k, text_v, image_k, image_v, layout, chunk)

        text_out, image_out = out[:, :t], out[:, t:]
        return torch.cat([self._gather_heads(text_out), self._ulysses_gather_sequence(image_out)], dim=1)

    def _attend_sharded_text(self, q, k, v, layout: SequenceLayout) -> torch.Tensor:
        """q, k, v: [B, this rank's text shard + image shard, H, D]; text and image move together."""
        q, k, v = self._ulysses_scatter_heads(q, k, v)  # [B, ulysses x (text shard + image shard), H / u, D]
        if self.ring_degree == 1:
            keys, values = self._real_keys(k, layout, 0), self._real_keys(v, layout, 0)
            out = (plain_attention(q, keys, values) if self.lse_kernel is None
                   else self.lse_kernel.fn(q, keys, values)[0])
        else:
            comm = RingComm(self.ring_group)
            kv = torch.cat([k, v], dim=0).contiguous()
            out = lse = None
            for step in range(self.ring_degree):
                if step + 1 < self.ring_degree:
                    next_kv = comm.send_recv(kv)  # overlaps with this step's attention
                    comm.commit()
                block_k, block_v = self._real_keys(kv, layout, (self.ring_rank - step) % self.ring_degree).chunk(2, dim=0)
                block_out, block_lse = self.lse_kernel.fn(q, block_k, block_v)
                out, lse = update_out_and_lse(out, lse, block_out, block_lse)
                if step + 1 < self.ring_degree:
                    comm.wait()
                    kv = next_kv
            out = out.to(q.dtype)
        return self._ulysses_gather_sequence(out)

    # --- Ulysses beside other work: start/finish, in head chunks (ulysses_chunks.py; ring_degree 1) --

    @property
    def can_overlap(self) -> bool:
        """Whether start/finish apply: Ulysses without a ring."""
        return self.ulysses_degree > 1 and self.ring_degree == 1

    def start(self, q, k, v, layout: SequenceLayout) -> InFlightAttention:
        """Issue the q/k/v all-to-alls (every head chunk's) and return without waiting on them.

        q, k, v as for ``__call__``. Work the caller queues before ``finish`` runs beside the
        all-to-alls, as long as it does not touch the result.
        """
        if not self.can_overlap:
            raise ValueError(f"start/finish overlap the Ulysses all-to-all: they need ulysses_degree > 1 and "
                             f"ring_degree 1, got {self.ulysses_degree} and {self.ring_degree}")
        chunks = self.chunks_for(q.shape[2])
        if layout.text_sharded:  # text and image shards travel together
            return InFlightAttention(self._scatter_chunks(q, k, v, chunks), text=None)
        t = layout.text_tokens
        text = tuple(self._local_heads(x) for x in (q[:, :t], k[:, :t], v[:, :t]))
        return InFlightAttention(self._scatter_chunks(q[:, t:], k[:, t:], v[:, t:], chunks), text=text)

    def finish(self, in_flight: InFlightAttention, layout: SequenceLayout) -> torch.Tensor:
        """The attention output ([B, text + local image shard, H, D]) of what ``start`` issued. With
        several head chunks, chunk c's attention runs while the chunks after it are still arriving
        and the output of the chunk before it is on its way back."""
        if in_flight.text is None:
            return self._finish_sharded_text(in_flight.scattered, layout)
        return self._finish_whole_text(in_flight.scattered, in_flight.text, layout)

    def chunks_for(self, heads: int) -> int:
        """The head chunks attention over ``heads`` heads runs in (heads: all ranks' together)."""
        return resolve_head_chunks(self.head_chunks, heads, self.ulysses_degree, self.ring_degree)

    def _attention(self, q, k, v) -> torch.Tensor:
        return plain_attention(q, k, v) if self.lse_kernel is None else self.lse_kernel.fn(q, k, v)[0]

    def _scatter_chunks(self, q, k, v, chunks: int) -> list[torch.Tensor]:
        """Every chunk's q/k/v all-to-all, issued up front (in flight until first used)."""
        return [ulysses_chunks.scatter_head_chunk((q, k, v), c, chunks, self.ulysses_group, self.ulysses_degree)
                for c in range(chunks)]

    def _gather_chunk(self, out: torch.Tensor) -> torch.Tensor:
        return ulysses_chunks.gather_sequence_chunk(out, self.ulysses_group, self.ulysses_degree)

    def _join_head_chunks(self, gathered: list[torch.Tensor]) -> torch.Tensor:
        return ulysses_chunks.join_head_chunks(gathered)

    def _finish_sharded_text(self, scattered: list[torch.Tensor], layout: SequenceLayout) -> torch.Tensor:
        """_attend_sharded_text without a ring, one head chunk at a time."""
        gathered = []
        for received in scattered:
            cq, ck, cv = ulysses_chunks.unpack_scattered(received)
            out = self._attention(cq, self._real_keys(ck, layout, 0), self._real_keys(cv, layout, 0))
            gathered.append(self._gather_chunk(out))
        return self._join_head_chunks(gathered)

    def _finish_whole_text(self, scattered: list[torch.Tensor], text: tuple[torch.Tensor, ...],
                           layout: SequenceLayout) -> torch.Tensor:
        """attend without a ring (text whole, local heads for text), one head chunk at a time."""
        t = layout.text_tokens
        text_q, text_k, text_v = text
        per_chunk = text_q.shape[2] // len(scattered)
        text_outs, gathered = [], []
        for c, received in enumerate(scattered):
            image_q, image_k, image_v = ulysses_chunks.unpack_scattered(received)
            heads = slice(c * per_chunk, (c + 1) * per_chunk)  # this chunk's share of the local heads
            valid = self._valid_image_tokens(layout, 0, image_q.shape[1])
            out = self._attention(torch.cat([text_q[:, :, heads], image_q], dim=1),
                                  torch.cat([text_k[:, :, heads], image_k[:, :valid]], dim=1),
                                  torch.cat([text_v[:, :, heads], image_v[:, :valid]], dim=1))
            text_outs.append(out[:, :t])
            gathered.append(self._gather_chunk(out[:, t:]))
        text_out = self._gather_heads(torch.cat(text_outs, dim=2))
        return torch.cat([text_out, self._join_head_chunks(gathered)], dim=1)

    def _real_keys(self, x: torch.Tensor, layout: SequenceLayout, ring_rank: int) -> torch.Tensor:
        """The keys (or values) of ring rank ``ring_rank``'s gathered shards without image padding.

        ``x`` holds the Ulysses group's shards one after another, each [text shard, image shard];
        padding sits at the end of the image sequence, so only the last shards lose tokens.
        """
        if layout.padded_image_tokens == layout.image_tokens:
            return x
        shards = self.ulysses_degree
        image = layout.padded_image_tokens // (shards * self.ring_degree)
        shard_len = layout.text_tokens + image
        parts = []
        for j in range(shards):
            real = self._valid_image_tokens(layout, ring_rank * shards + j, image)
            parts.append(x[:, j * shard_len : j * shard_len + layout.text_tokens + real])
        return torch.cat(parts, dim=1)

    # --- Ulysses -------------------------------------------------------------------------

    def _ulysses_scatter_heads(self, q, k, v):
        if self.ulysses_degree == 1:
            return q, k, v
        # One all-to-all for q, k and v together: three launches cost more than one bigger one.
        packed = torch.cat([q, k, v], dim=0).contiguous()
        packed = all_to_all_4D(packed, scatter_idx=2, gather_idx=1, group=self.ulysses_group)
        return packed.chunk(3, dim=0)

    def _ulysses_gather_sequence(self, image_out: torch.Tensor) -> torch.Tensor:
        if self.ulysses_degree == 1:
            return image_out
        return all_to_all_4D(image_out.contiguous(), scatter_idx=1, gather_idx=2, group=self.ulysses_group)

    def _local_heads(self, x: torch.Tensor) -> torch.Tensor:
        if self.ulysses_degree == 1:
            return x
        per_rank = x.shape[2] // self.ulysses_degree
        return x[:, :, self.ulysses_rank * per_rank : (self.ulysses_rank + 1) * per_rank]

    def _gather_heads(self, text_out: torch.Tensor) -> torch.Tensor:
        if self.ulysses_degree == 1:
            return text_out
        parts = [torch.empty_like(text_out) for _ in range(self.ulysses_degree)]
        dist.all_gather(parts, text_out.contiguous(), group=self.ulysses_group)
        return torch.cat(parts, dim=2)

    # --- Ring ----------------------------------------------------------------------------

    @staticmethod
    def _valid_image_tokens(layout: SequenceLayout, ring_rank: int, chunk: int) -> int:
        """How many of ring rank r's image tokens are real (padding sits at the sequence end)."""
        return max(0, min(chunk, layout.image_tokens - ring_rank * chunk))

    def _ring(self, queries, text_k, text_v, image_k, image_v, layout: SequenceLayout, chunk: int):
        comm = RingComm(self.ring_group)
        kv = torch.cat([image_k, image_v], dim=0).contiguous()
        out = lse = None
        for step in range(self.ring_degree):
            if step + 1 < self.ring_degree:
                next_kv = comm.send_recv(kv)  # overlaps with this step's attention
                comm.commit()
            source = (self.ring_rank - step) % self.ring_degree
            valid = self._valid_image_tokens(layout, source, chunk)
            block_k, block_v = kv[:, :valid].chunk(2, dim=0)
            if step == 0:
                block_k = torch.cat([text_k, block_k], dim=1)
                block_v = torch.cat([text_v, block_v], dim=1)
            if block_k.shape[1] > 0:
                block_out, block_lse = self.lse_kernel.fn(queries, block_k, block_v)
                out, lse = update_out_and_lse(out, lse, block_out, block_lse)
            if step + 1 < self.ring_degree:
                comm.wait()
                kv = next_kv
        return out.to(queries.dtype)
