"""Joint attention of one image patch against the stale keys/values of the rest of the image.

PipeFusion runs a stage's blocks on one patch of the image tokens at a time. Inside attention
the patch's own image keys/values are fresh; those of the other patches come from a per-layer
cache holding the whole image's keys/values: written by the previous evaluation (one sampler
step stale) and overwritten, patch by patch, as the current evaluation reaches them. Text
tokens ride along with every patch, so text keys/values are always fresh and never cached.

The caches of all of a stage's layers live in one KVCacheStore, one tensor per conditioning
branch slot (0: the first branch a job evaluates, 1: the second). They are kept from job to job
while their shape holds, so a CUDA graph captured against them (runner.py) stays valid; the
store also owns those graphs and drops a slot's graphs when it reallocates the slot's cache.

A synchronous (warmup) pass is the same code with one patch covering the whole image: every
cached entry is overwritten before it is read, so the pass is exact and fills the cache.

With Ulysses inside a stage the cache lives after the all-to-all: every rank caches all image
tokens for its own slice of heads, so no extra communication is needed for the stale part.

With Ring inside a stage each ring rank holds one chunk of the patch's tokens. The ring passes
the patch's fresh K/V chunks around as usual; every chunk that passes by is also written to the
cache, so after the ring every ring rank's cache again holds the whole image (for its heads)
without any extra communication. The stale K/V of the other patches are one more block of the
ring, merged with the fresh blocks through their log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from yunchang.ring.utils import RingComm, update_out_and_lse

from ..attention.kernels import Kernel, plain_attention
from ..attention.usp import SequenceLayout, SequenceParallelAttention


@dataclass
class PatchWindow:
    """The image tokens the current pass computes, read by every attention layer of the stage."""

    start: int  # first image token of the patch, in whole-image order
    tokens: int  # real (unpadded) tokens of the patch
    total: int  # image tokens of the whole image
    branch: int  # which cache slot to use: one per conditioning branch (positive, negative)
    attend_stale: bool = True  # False: attend only to the patch's own tokens (diagnostic switch)

    @property
    def is_whole_image(self) -> bool:
        return self.start == 0 and self.tokens == self.total


class PatchWindowState:
    """Shared by a stage's attention layers; the pipeline runner sets ``window`` before each pass."""

    def __init__(self) -> None:
        self.window: PatchWindow | None = None


class KVCacheStore:
    """The image keys/values of every attention layer of a stage, one tensor per branch slot, and
    the captured passes (CUDA graphs) that read and write them.

    A cache is allocated (by ``ensure``) before any pass of its slot runs, outside any graph, and
    kept while the shape holds. Reallocating a slot first drops the slot's graphs: a graph bakes
    in the addresses of the cache it was captured against, and must never replay against a freed
    one. Whether a cache holds values of the current job is the runner's business (its first pass
    of each branch in a job is a whole-image pass, which overwrites every entry before reading).
    """

    def __init__(self, layers: int):
        self.layers = layers
        self.caches: dict[int, torch.Tensor] = {}  # slot -> [layers, 2 (keys, values), B, image tokens, heads, head dim]
        self.graphs: dict[tuple, object] = {}  # (slot, ...) -> a captured pass against that slot's cache

    def ensure(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
        """Have slot's cache of ``shape`` (B, image tokens, heads, head dim); True if it was (re)allocated."""
        full = (self.layers, 2, *shape)
        cache = self.caches.get(slot)
        if cache is not None and tuple(cache.shape) == full and cache.dtype == dtype and cache.device == torch.device(device):
            return False
        dropped = [key for key in self.graphs if key[0] == slot]
        if dropped and cache is not None and cache.is_cuda:
            torch.cuda.synchronize(cache.device)  # no replay of a dropped graph may still be running
        for key in dropped:
            del self.graphs[key]
        self.caches.pop(slot, None)  # free the old cache before taking memory for the new one
        self.caches[slot] = torch.empty(full, dtype=dtype, device=device)
        return True

    def graph_for(self, key: tuple, make):
        """The captured pass of ``key`` (its first item the slot), made by ``make()`` on first use."""
        if key[0] not in self.caches:
            raise RuntimeError("internal: a PipeFusion pass was captured before its K/V cache was allocated")
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = make()
        return graph

    def layer(self, slot: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.caches.get(slot)
        if cache is None:
            raise RuntimeError("internal: a PipeFusion pass ran before its K/V cache was allocated")
        return cache[index, 0], cache[index, 1]


class StaleKVAttention(SequenceParallelAttention):
    """One attention layer's PipeFusion attention (Ulysses and Ring inside the stage)."""

    def __init__(self, state: PatchWindowState, store: KVCacheStore, index: int, ulysses_group, ring_group=None,
                 lse_kernel: Kernel | None = None):
        super().__init__(ulysses_group, ring_group, lse_kernel)
        self.state = state
        self.store = store
        self.index = index  # this layer's place in the store

    def _cache(self, window: PatchWindow, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache_k, cache_v = self.store.layer(window.branch, self.index)
        expected = (like.shape[0], window.total, *like.shape[2:])
        if tuple(cache_k.shape) != expected or cache_k.dtype != like.dtype:
            raise RuntimeError(f"internal: the PipeFusion K/V cache is {tuple(cache_k.shape)} {cache_k.dtype}, "
                               f"the layer's keys need {expected} {like.dtype}")
        return cache_k, cache_v

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        window = self.state.window
        if window is None:
            raise RuntimeError("internal: PipeFusion attention was called outside a pipeline pass")
        t = layout.text_tokens
        text_q, text_k, text_v = (self._local_heads(x[:, :t]) for x in (q, k, v))
        image_q, image_k, image_v = self._ulysses_scatter_heads(q[:, t:], k[:, t:], v[:, t:])
        if self.ring_degree > 1:
            out = self._ring_with_stale(torch.cat([text_q, image_q], dim=1), text_k, text_v, image_k, image_v, window)
            text_out, image_out = out[:, :t], out[:, t:]
            return torch.cat([self._gather_heads(text_out), self._ulysses_gather_sequence(image_out)], dim=1)
        # After the all-to-all this rank holds the whole (padded) patch for its heads; padding
        # sits at the end and is never written to the cache nor attended.
        fresh_k, fresh_v = image_k[:, : window.tokens], image_v[:, : window.tokens]
        cache_k, cache_v = self._cache(window, fresh_k)
        stop = window.start + window.tokens
        cache_k[:, window.start:stop] = fresh_k
        cache_v[:, window.start:stop] = fresh_v
        if window.attend_stale:
            image_keys, image_values = cache_k, cache_v
        else:
            image_keys, image_values = fresh_k, fresh_v
        out = plain_attention(
            torch.cat([text_q, image_q], dim=1),
            torch.cat([text_k, image_keys], dim=1),
            torch.cat([text_v, image_values], dim=1),
        )
        text_out, image_out = out[:, :t], out[:, t:]
        return torch.cat([self._gather_heads(text_out), self._ulysses_gather_sequence(image_out)], dim=1)

    def _ring_with_stale(self, queries, text_k, text_v, image_k, image_v, window: PatchWindow) -> torch.Tensor:
        """Attention over text + stale K/V of the other patches + the patch's fresh chunks from the ring."""
        chunk = image_k.shape[1]  # padded patch tokens per ring rank; padding sits at the patch end
        cache_k, cache_v = self._cache(window, image_k)
        stop = window.start + window.tokens
        # The first block: text and the other patches' cached K/V (copied before the ring below
        # overwrites this patch's range; in a whole-image pass there is nothing stale).
        if window.attend_stale:
            first_k = torch.cat([text_k, cache_k[:, :window.start], cache_k[:, stop:]], dim=1)
            first_v = torch.cat([text_v, cache_v[:, :window.start], cache_v[:, stop:]], dim=1)
        else:
            first_k, first_v = text_k, text_v
        out, lse = None, None

        def merge(block_k, block_v):
            nonlocal out, lse
            if block_k.shape[1] > 0:
                block_out, block_lse = self.lse_kernel.fn(queries, block_k, block_v)
                out, lse = update_out_and_lse(out, lse, block_out, block_lse)

        comm = RingComm(self.ring_group)
        kv = torch.cat([image_k, image_v], dim=0).contiguous()
        for step in range(self.ring_degree):
            if step + 1 < self.ring_degree:
                next_kv = comm.send_recv(kv)  # overlaps with this step's attention
                comm.commit()
            if step == 0:
                merge(first_k, first_v)
            source = (self.ring_rank - step) % self.ring_degree
            valid = max(0, min(chunk, window.tokens - source * chunk))
            block_k, block_v = kv[:, :valid].chunk(2, dim=0)
            at = window.start + source * chunk
            cache_k[:, at:at + valid] = block_k
            cache_v[:, at:at + valid] = block_v
            merge(block_k, block_v)
            if step + 1 < self.ring_degree:
                comm.wait()
                kv = next_kv
        return out.to(queries.dtype)
