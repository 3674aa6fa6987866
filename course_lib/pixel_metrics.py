r"""Pixel statistics of image sets: reconstruction error, sharpness and colour (re-exported by course_lib.metrics).

Reconstruction (notebooks 06, 07): `psnr`, the peak signal-to-noise ratio of a reconstruction, in pixels;
`high_frequency_share`, how much of the images' spectral power lies at fine detail (their sharpness).

Colour (notebooks 05, 09): `colour`, two pixel statistics that FID folds into one number, for telling apart the
two ways a sampler's colours fail: saturated, over-coloured tiles (high chroma) and greyed-out, washed images
without white backgrounds or dark outlines (few pixels at the range's ends). Always read beside real emoji's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .forward import check_images


# --- Reconstruction --------------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, for images in [-1, 1] (data range 2):
    10 log10(2^2 / MSE). Identical images give inf."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse)


def high_frequency_share(images: torch.Tensor, cutoff: float = 0.25) -> float:
    """Sharpness: the share of a set's spectral power (|FFT2|^2 of each channel of images mapped to [0, 1], DC
    included, pooled over the set) at normalised radial frequency sqrt(fx^2 + fy^2) > cutoff (cycles per pixel;
    0.5 is Nyquist). Compare reconstructions or samples with real images: a ratio of 1 is as sharp as the data."""
    check_images(images, "images", data_range=False)
    if not 0 < cutoff < 0.5 * 2 ** 0.5:
        raise ValueError(f"cutoff is a frequency in cycles per pixel in (0, 0.707); got {cutoff!r}")
    power = torch.fft.fft2((images.float().clamp(-1, 1) + 1) / 2).abs().pow(2)
    fy, fx = torch.fft.fftfreq(images.shape[-2]).view(-1, 1), torch.fft.fftfreq(images.shape[-1]).view(1, -1)
    return ((power * ((fx ** 2 + fy ** 2).sqrt() > cutoff)).sum() / power.sum()).item()


# --- Colour ----------------------------------------------------------------------------------------------

@dataclass
class Colour:
    """Colour statistics of a set of images (see `colour`)."""
    chroma: float    # mean over pixels of max(R, G, B) - min(R, G, B), in [0, 1]: 0 grey, 1 a pure primary
    at_ends: float   # share of channel values within `tol` of -1 or 1: white backgrounds, black outlines, clipping
    n: int

    def __str__(self) -> str:
        return f"chroma {self.chroma:.3f}, at the range's ends {100 * self.at_ends:.1f}% (n={self.n})"


def colour(images: torch.Tensor, tol: float = 0.02) -> Colour:
    """Mean chroma and the share of channel values at the ends of [-1, 1] of images (N, 3, H, W) in [-1, 1].

    Chroma is the hexagonal chroma of HSV (max - min of a pixel's R, G, B in [0, 1] units; Smith 1978). Values
    outside [-1, 1] are clipped first, as saving the images would. Real emoji have white backgrounds, so about
    half their values sit at an end; a washed-out sampler leaves few there, a saturating one colours more."""
    check_images(images, "images", data_range=False)
    if images.shape[1] != 3:
        raise ValueError(f"colour needs RGB images (N, 3, H, W); got {images.shape[1]} channels")
    if not 0 <= tol < 1:
        raise ValueError(f"tol must be in [0, 1) (a distance from -1 or 1); got {tol!r}")
    x = images.float().clamp(-1, 1)
    u = (x + 1) / 2
    return Colour((u.amax(1) - u.amin(1)).mean().item(), (x.abs() >= 1 - tol).float().mean().item(), len(images))
