"""Initial noise drawn exactly as ComfyUI's KSampler draws it, so a seed means the same image.

The whole batch's noise is drawn on the CPU from one generator; every rank draws it whole and
takes its slice, so sharding never changes the random numbers.
"""

from __future__ import annotations

import torch


def comfy_noise(shape: tuple[int, ...], seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    generator = torch.manual_seed(seed)
    if batch_index is None:
        return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")
    # A latent taken from a larger batch keeps the noise its index had there: draw every index up
    # to the largest one in order and keep the ones asked for.
    wanted = sorted(set(batch_index))
    drawn = {}
    for i in range(wanted[-1] + 1):
        sample = torch.randn([1, *shape[1:]], dtype=torch.float32, generator=generator, device="cpu")
        if i in wanted:
            drawn[i] = sample
    return torch.cat([drawn[i] for i in batch_index], dim=0)
