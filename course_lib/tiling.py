"""Decoding a large latent in tiles: the VAE decoder's memory bounded by a tile's area (the 8 GB budget).

A VAE's decoder is convolutional, so it can be run on a piece of the latents: a tile of t x t latent pixels gives a
(f t) x (f t) piece of the image (f: the VAE's factor), with activations for that area only. Pieces decoded
side by side show seams, because a convolution near a tile's edge sees zero padding where its neighbours would
be; so tiles overlap, and each piece is weighted by a ramp that rises linearly across its overlaps (1 elsewhere),
and the weighted sum is divided by the sum of the weights (what diffusers' tiled VAE decoding does, in its own way).

Not exact: the decoder's GroupNorm statistics and its mid-block attention see one tile, not the whole image. The
budget notebook measures the difference on the course's VAE; the memory saved is measured by
course_lib.memory's accounting (scripts/measure_sd15_memory.py's decode rows).
"""

from __future__ import annotations

from typing import Callable

import torch

from .checks import check_int


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` start along a side of `size`, each overlapping the next by at least `overlap`."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile + 1, tile - overlap))
    return starts if starts[-1] == size - tile else starts + [size - tile]


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int | None = None) -> torch.Tensor:
    """`decode` (a VAE's decoder: latents -> images) run on overlapping tile x tile pieces of the latents z
    (B, C, h, w) and blended back together (see the module's docstring); overlap defaults to a quarter of the tile."""
    check_int("tile", tile, 2, hint=" (latent pixels a side)")
    overlap = tile // 4 if overlap is None else check_int("overlap", overlap, 0, tile - 1)
    h, w = z.shape[-2:]
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = weight = None
    for r in rows:
        for c in cols:
            piece = decode(z[..., r:r + tile, c:c + tile])
            f = piece.shape[-1] // min(tile, w)                       # image pixels per latent pixel
            ramp = [torch.ones(n, device=piece.device, dtype=piece.dtype) for n in piece.shape[-2:]]
            for axis, (start, starts, side) in enumerate(((r, rows, h), (c, cols, w))):
                n, edge = ramp[axis].numel(), overlap * f
                if edge and start > 0:                                # rises across the overlap with the tile before
                    ramp[axis][:edge] = torch.linspace(1 / (edge + 1), edge / (edge + 1), edge)
                if edge and start + tile < side:                      # falls across the overlap with the tile after
                    ramp[axis][n - edge:] = torch.minimum(ramp[axis][n - edge:],
                                                          torch.linspace(edge / (edge + 1), 1 / (edge + 1), edge))
            wmap = ramp[0][:, None] * ramp[1][None, :]
            if out is None:
                out = piece.new_zeros(*piece.shape[:2], h * f, w * f)
                weight = piece.new_zeros(h * f, w * f)
            out[..., r * f:r * f + piece.shape[-2], c * f:c * f + piece.shape[-1]] += piece * wmap
            weight[r * f:r * f + piece.shape[-2], c * f:c * f + piece.shape[-1]] += wmap
    return out / weight


__all__ = ["tile_starts", "decode_tiled"]
