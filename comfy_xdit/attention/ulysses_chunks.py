"""The Ulysses all-to-alls of one chunk of the heads, asynchronous, for pipelining them with attention.

Split into C chunks of heads, Ulysses attention can overlap its communication with its compute:
every chunk's q/k/v all-to-all is issued first, then each chunk's attention runs while the later
chunks' inputs (and the earlier chunks' outputs) are still in flight. Attention is per head, so
the result is exact as long as each rank gets back its own heads in their original order.

Head layout: rank r of a Ulysses group of u owns heads [r H/u, (r+1) H/u). Chunk c of C sends rank r
the heads r H/u + c H/(uC) + [0, H/(uC)), so concatenating the chunks a rank received, in chunk
order, gives exactly its heads of the unchunked all-to-all; the output all-to-all of a chunk sends
those heads back, and ``join_head_chunks`` puts every chunk's heads back into its slot.

The collectives are torch's functional ones: in eager mode they return an AsyncCollectiveTensor
that waits on its first use, and dynamo traces them into a collective whose wait inductor places
at the first use, so the same code overlaps in both. Callers must not touch a received tensor
before they need it (any op on it, even a view, may wait).

Wire layout of a chunk's q/k/v: per destination rank, token-major with q, k and v side by side
([B, S, 3, heads, D], the "packed QKV" layout attention kernels read in place). Received, each of
q, k and v is then a strided view that goes to attention without a copy (with batch 1; a larger
batch costs one copy per tensor, as the head-major layout always did).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def scatter_head_chunk(parts: tuple[torch.Tensor, ...], chunk: int, chunks: int, group: dist.ProcessGroup,
                       degree: int) -> torch.Tensor:
    """Issue the all-to-all of head chunk ``chunk`` of ``parts`` (q, k, v: [B, S, H, D], this rank's
    sequence shard); returns the in-flight result for ``unpack_scattered``."""
    b, s, h, d = parts[0].shape
    per_chunk = h // (degree * chunks)
    # [degree (destination), B, S, len(parts), heads of this chunk for that destination, D]: one copy
    send = torch.stack([x.reshape(b, s, degree, chunks, per_chunk, d)[:, :, :, chunk].permute(2, 0, 1, 3, 4)
                        for x in parts], dim=3)
    return funcol.all_to_all_single(send, None, None, group)


def unpack_scattered(received: torch.Tensor) -> list[torch.Tensor]:
    """The received chunk as q, k, v: [B, degree x S, H / (degree C), D], source ranks' shards in
    rank order; views of ``received`` where B is 1 (source and token dimensions then merge)."""
    degree, b, s, n, heads, d = received.shape
    return [received[:, :, :, i].transpose(0, 1).reshape(b, degree * s, heads, d) for i in range(n)]


def gather_sequence_chunk(out: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """Issue the inverse all-to-all of one chunk's attention output [B, degree x S, heads, D]."""
    b, full, heads, d = out.shape
    send = out.reshape(b, degree, full // degree, heads, d).transpose(0, 1).contiguous()
    return funcol.all_to_all_single(send, None, None, group)


def join_head_chunks(gathered: list[torch.Tensor]) -> torch.Tensor:
    """The chunks' gathered outputs ([degree (head group), B, S, heads, D] each, in chunk order) as
    [B, S, H, D] with every head in its original slot: head group r, then chunk c, then head."""
    degree, b, s, heads, d = gathered[0].shape
    stacked = torch.stack(gathered, dim=1)  # [degree, C, B, S, heads, D]
    return stacked.permute(2, 3, 0, 1, 4, 5).reshape(b, s, degree * len(gathered) * heads, d)
