"""Random weights for the tiny test models: every parameter from one seeded generator.

Matrices are scaled by 1/sqrt(fan-in), so activations stay of order one through a few blocks;
vectors (biases, norms, embeddings of one row) get small values. Deterministic in the seed, so
two builds with the same seed are the same model.
"""

from __future__ import annotations

import torch


def randomize_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(noise / param[0].numel() ** 0.5 if param.ndim >= 2 else 0.1 * noise)
    return model
