"""course_lib.tiling: tiles that cover the latents and overlap, blended back exactly where the decoder is local."""

import pytest
import torch
import torch.nn.functional as F

from course_lib.tiling import decode_tiled, tile_starts


@pytest.mark.parametrize("size,tile,overlap", [(64, 32, 8), (64, 24, 6), (10, 4, 1), (8, 8, 2), (5, 8, 2)])
def test_tiles_cover_every_pixel_and_overlap_enough(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
        assert 0 <= s and s + min(tile, size) <= size
    assert covered.all() and starts[0] == 0
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_a_pointwise_decoder_is_reassembled_exactly():
    """Where each output pixel depends on its own latent pixel only (an upsampling by 4 of a pointwise map), tiles
    see everything they need: the blend of overlapping pieces must give the whole decode back."""
    decode = lambda z: F.interpolate(torch.tanh(z[:, :3] * 2 + z[:, 3:]), scale_factor=4, mode="nearest")
    z = torch.randn(2, 4, 20, 28, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decode_tiled(decode, z, tile=8, overlap=3), decode(z))
    torch.testing.assert_close(decode_tiled(decode, z, tile=64), decode(z))       # one tile: the whole


def test_a_convolutional_decoder_differs_only_near_tile_edges_and_the_blend_beats_plain_seams():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Upsample(scale_factor=2),
                               torch.nn.Conv2d(8, 3, 3, padding=1)).eval()
    z = torch.randn(1, 4, 24, 24)
    with torch.no_grad():
        whole = conv(z)
        blended = decode_tiled(conv, z, tile=12, overlap=4)
        seams = decode_tiled(conv, z, tile=12, overlap=0)
    assert (blended - whole).abs().mean() < (seams - whole).abs().mean()
    assert (blended - whole).abs().mean() < 0.05 * whole.abs().mean()


def test_bad_tiles_are_refused():
    with pytest.raises(ValueError, match="tile must be an int >= 2"):
        decode_tiled(lambda z: z, torch.zeros(1, 4, 8, 8), tile=1)
    with pytest.raises(ValueError, match="overlap must be an int from 0 to 7"):
        decode_tiled(lambda z: z, torch.zeros(1, 4, 8, 8), tile=8, overlap=8)
