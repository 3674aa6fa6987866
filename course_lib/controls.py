r"""Control images for ControlNet (course_lib.controlnet): edges, a silhouette, a coarse colour layout.

Each takes images (B, 3, H, W) in [-1, 1] and gives a control image (B, 3, H, W) in [-1, 1], the picture a
ControlNet reads; a binary map becomes white (1) on black (-1) in all three channels (`as_control`).

Brightness. Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601 luma), in [-1, 1] as the images are.

Sobel [1]. With the 3x3 kernels
    K_x = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],    K_y = K_x transposed,
    g_x = K_x * Y,  g_y = K_y * Y  (correlation, borders replicated),  |g| = sqrt(g_x^2 + g_y^2).
A step from -1 to 1 between two columns gives g_x = 4 (1 - (-1)) = 8 on both columns beside it and 0 elsewhere, so
STEP = 8 is a full edge's response; `edges` keeps |g| >= threshold STEP.

Canny [2], written out: blur Y with the 3x3 binomial kernel [1, 2, 1]^T [1, 2, 1] / 16; Sobel; non-maximum
suppression (a pixel stays if its |g| is a maximum along the gradient's direction, rounded to 0, 45, 90 or 135
degrees: >= the neighbour behind, > the neighbour ahead, so a two-pixel ridge keeps one); double threshold (strong:
|g| >= high STEP, weak: >= low STEP); hysteresis (weak pixels 8-connected to strong ones join them, until nothing
changes).

Silhouette. The course's emoji are composited on white when the data is built (scripts/build_emoji_data.py), and
their alpha is not kept, so the silhouette is the pixels that are not white: some channel below 1 - tolerance.
White inside an emoji (an eye, a white flag) reads as background: a hole in the silhouette.

Colour layout. The mean colour of each cell of a grid x grid partition (average pooling), spread back over the
cell: where the colours go, with no shape.

References:
  [1] Sobel, Feldman. A 3x3 Isotropic Gradient Operator for Image Processing. 1968 (talk at the Stanford AI Project).
  [2] Canny. A Computational Approach to Edge Detection. IEEE TPAMI 8(6), 1986.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_choice, check_int
from .forward import check_images

CONTROLS = ("edges", "canny", "silhouette", "colour")
LUMA = (0.299, 0.587, 0.114)
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
STEP = 8.0                        # |g| of a step from -1 to 1: a full edge


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Y = 0.299 R + 0.587 G + 0.114 B, (B, 1, H, W)."""
    check_images(images, "images")
    if images.shape[1] != 3:
        raise ValueError(f"control images are made from RGB images (B, 3, H, W); got {tuple(images.shape)}")
    return torch.einsum("bchw,c->bhw", images, images.new_tensor(LUMA))[:, None]


def _correlate(y: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """3x3 correlation of (B, 1, H, W) with replicated borders."""
    return F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kernel.to(y)[None, None])


def sobel(images: torch.Tensor, blur: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_x, g_y), each (B, 1, H, W): Sobel's gradients of the brightness (after the binomial blur, if asked)."""
    y = brightness(images)
    if blur:
        b = torch.tensor([1.0, 2.0, 1.0])
        y = _correlate(y, torch.outer(b, b) / 16)
    kx = torch.tensor(SOBEL_X)
    return _correlate(y, kx), _correlate(y, kx.T)


def edge_magnitude(images: torch.Tensor) -> torch.Tensor:
    """|g| = sqrt(g_x^2 + g_y^2), (B, 1, H, W); STEP (8) on a full step from -1 to 1."""
    gx, gy = sobel(images)
    return torch.sqrt(gx * gx + gy * gy)


def check_threshold(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 2:
        raise ValueError(f"{name} must be a number in (0, 2], a share of a full step's Sobel response (1: an edge "
                         f"from -1 to 1; up to 2 on a corner of a larger change); got {value!r}")
    return float(value)


def edges(images: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Where |g| >= threshold STEP: a bool edge map (B, 1, H, W), two pixels wide along a step."""
    return edge_magnitude(images) >= check_threshold("threshold", threshold) * STEP


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved so that out[i, j] = x[i + dy, j + dx] (zero outside)."""
    H, W = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return padded[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]


def canny(images: torch.Tensor, low: float = 0.1, high: float = 0.3) -> torch.Tensor:
    """Canny's edges (B, 1, H, W) bool: blur, Sobel, non-maximum suppression, double threshold, hysteresis (see the
    module's docstring); low and high are shares of a full step's response."""
    low, high = check_threshold("low", low), check_threshold("high", high)
    if low > high:
        raise ValueError(f"low must not exceed high; got low={low}, high={high}")
    gx, gy = sobel(images, blur=True)
    magnitude = torch.sqrt(gx * gx + gy * gy)
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180                 # the gradient's direction, 0..180 degrees
    sector = torch.round(angle / 45).long() % 4                       # 0: 0 deg, 1: 45, 2: 90, 3: 135
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for k, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):  # the step along each direction (y down)
        ahead, behind = _shift(magnitude, dy, dx), _shift(magnitude, -dy, -dx)
        keep |= (sector == k) & (magnitude >= behind) & (magnitude > ahead)
    thin = magnitude * keep
    strong, weak = thin >= high * STEP, thin >= low * STEP
    while True:                                                       # hysteresis: grow strong through weak
        grown = weak & (F.max_pool2d(strong.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, strong):
            return strong
        strong = grown


def silhouette(images: torch.Tensor, tolerance: float = 0.05) -> torch.Tensor:
    """Pixels that are not white, (B, 1, H, W) bool: some channel below 1 - tolerance (images in [-1, 1])."""
    check_images(images, "images")
    if not 0 < tolerance < 2:
        raise ValueError(f"tolerance must be in (0, 2) (how far below white, 1, a channel must be); got {tolerance!r}")
    return (images < 1 - tolerance).any(dim=1, keepdim=True)


def colour_layout(images: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """Each cell of a grid x grid partition filled with its mean colour, (B, 3, H, W)."""
    check_images(images, "images")
    H, W = images.shape[-2:]
    grid = check_int("grid", grid, 1, min(H, W), hint=" (cells per side)")
    if H % grid or W % grid:
        raise ValueError(f"grid must divide the image's size {H}x{W}; got {grid}")
    return F.interpolate(F.avg_pool2d(images, (H // grid, W // grid)), size=(H, W), mode="nearest")


def as_control(mask: torch.Tensor) -> torch.Tensor:
    """A bool map (B, 1, H, W) as a control image (B, 3, H, W): 1 where True (white), -1 elsewhere (black)."""
    return (mask.float() * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def make_control(images: torch.Tensor, kind: str, **options) -> torch.Tensor:
    """A control image (B, 3, H, W) in [-1, 1] of one of CONTROLS: "edges" (Sobel, thresholded), "canny",
    "silhouette", "colour" (the layout); options go to that function (threshold, low/high, tolerance, grid)."""
    check_choice("control", kind, CONTROLS)
    if kind == "colour":
        return colour_layout(images, **options)
    return as_control({"edges": edges, "canny": canny, "silhouette": silhouette}[kind](images, **options))


def agreement(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """How closely two batches of control images of one kind agree, per image (B,): for the white-on-black kinds
    (edges, canny, silhouette) the IoU of their white pixels (1: the same pixels; 0 where both are empty); for the
    colour layout 1 - mean |a - b| / 2 (1: the same colours). How a generated image follows
    its control: make the image's own control of that kind and compare it with the one it was given."""
    check_choice("control", kind, CONTROLS)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"need two batches of control images of one shape (B, 3, H, W); got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if kind == "colour":
        return 1 - (a - b).abs().flatten(1).mean(1) / 2
    A, B = a[:, 0] > 0, b[:, 0] > 0
    return (A & B).flatten(1).sum(1) / (A | B).flatten(1).sum(1).clamp_min(1)


__all__ = ["CONTROLS", "LUMA", "SOBEL_X", "STEP", "brightness", "sobel", "edge_magnitude", "check_threshold", "edges",
           "canny", "silhouette", "colour_layout", "as_control", "make_control", "agreement"]
