"""Split a count into parts as even as possible, the first parts one larger: a batch's rows over
the data-parallel ranks, an image's token rows over PipeFusion's patches, Flux's blocks over the
interleaved split's stages."""

from __future__ import annotations


def even_bands(total: int, parts: int) -> list[tuple[int, int]]:
    """(start, size) of each part, contiguous from 0."""
    base, extra = divmod(total, parts)
    bands, start = [], 0
    for k in range(parts):
        size = base + (1 if k < extra else 0)
        bands.append((start, size))
        start += size
    return bands
