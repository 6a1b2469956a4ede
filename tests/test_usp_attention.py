"""Sequence-parallel joint attention against full attention, including the failure it must catch.

yunchang's math and cuDNN kernels return a zero log-sum-exp; ring attention merged with it is
silently wrong. These tests run the ring with our kernels (exact) and with a zero-lse kernel
(which must be caught by the same comparison).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from comfy_xdit.attention.kernels import KERNELS, choose_lse_kernel
from comfy_xdit.attention.usp import SequenceLayout, SequenceParallelAttention
from comfy_xdit.models.sharding import pad_to_multiple
from distributed import relative_error, run_on_ranks

TEXT, IMAGE, HEADS, DIM = 5, 13, 4, 8  # 13 image tokens: padding needed for every degree > 1


def qkv() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, TEXT + IMAGE, HEADS, DIM, generator=g) for _ in range(3)]


def full_attention() -> torch.Tensor:
    q, k, v = qkv()
    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def sharded_attention(ulysses: int, ring: int, kernel_name: str, zero_lse: bool = False) -> torch.Tensor:
    rank = dist.get_rank()
    ranks = list(range(dist.get_world_size()))
    # ulysses innermost, as in the mesh; every process creates every group in the same order
    ulysses_groups = [dist.new_group(ranks[i : i + ulysses]) for i in range(0, len(ranks), ulysses)]
    ring_groups = [dist.new_group(ranks[i::ulysses]) for i in range(ulysses)]
    ulysses_group = ulysses_groups[rank // ulysses] if ulysses > 1 else None
    ring_group = ring_groups[rank % ulysses] if ring > 1 else None
    kernel = KERNELS[kernel_name]
    if zero_lse:
        real = kernel.fn
        kernel = dataclasses.replace(kernel, fn=lambda q, k, v: (real(q, k, v)[0], torch.zeros(q.shape[0], q.shape[2], q.shape[1])))
    attention = SequenceParallelAttention(ulysses_group, ring_group, kernel)

    degree = ulysses * ring
    shard = (rank // ulysses) * ulysses + rank % ulysses
    layout = SequenceLayout(TEXT, IMAGE, IMAGE + (-IMAGE % degree))
    local = []
    for t in qkv():
        image = pad_to_multiple(t[:, TEXT:], 1, degree).chunk(degree, dim=1)[shard]
        local.append(torch.cat([t[:, :TEXT], image], dim=1))
    out = attention(*local, layout)
    return out


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2), (2, 2), (1, 3)])
def test_usp_matches_full_attention(ulysses, ring):
    expected = full_attention()
    degree = ulysses * ring
    padded = IMAGE + (-IMAGE % degree)
    per_shard = padded // degree
    outputs = run_on_ranks(degree, sharded_attention, ulysses, ring, "cpu_flash")
    for shard, out in enumerate(outputs):
        assert relative_error(out[:, :TEXT], expected[:, :TEXT]) < 1e-5
        start = shard * per_shard
        real = max(0, min(per_shard, IMAGE - start))
        assert relative_error(out[:, TEXT : TEXT + real], expected[:, TEXT + start : TEXT + start + real]) < 1e-5


def test_ring_with_zero_lse_kernel_is_caught():
    expected = full_attention()
    outputs = run_on_ranks(2, sharded_attention, 1, 2, "cpu_flash", True)
    assert relative_error(outputs[0][:, :TEXT], expected[:, :TEXT]) > 1e-2


def test_lse_kernels_return_the_real_log_sum_exp():
    q, k, v = qkv()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * DIM**-0.5
    for name in ("cpu_flash", "math"):
        out, lse = KERNELS[name].fn(q, k, v)
        assert torch.allclose(lse, torch.logsumexp(scores, dim=-1), atol=1e-5), name
        assert relative_error(out, full_attention()) < 1e-5


def test_backend_choice_refuses_kernels_that_cannot_run_here():
    assert choose_lse_kernel("auto", torch.device("cpu"), torch.float32).name == "cpu_flash"
    with pytest.raises(ValueError, match="does not run on cpu"):
        choose_lse_kernel("cudnn", torch.device("cpu"), torch.float32)
