"""Sample images on disk: a PNG grid of a cell's first samples, linked from the reports."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def save_grid(x: Tensor, path: Path, *, count: int = 64, nrow: int = 8, min_side: int = 256) -> Path:
    """The first `count` images of x (in [-1, 1], [B, C, H, W]) as an `nrow`-wide PNG grid.

    Small images are enlarged by nearest-neighbour to at least `min_side` pixels a side,
    so 8x8 digits stay readable. Returns `path`.
    """
    from torchvision.utils import make_grid, save_image

    images = ((x[:count].detach().float().cpu() + 1) / 2).clamp(0, 1)
    grid = make_grid(images, nrow=min(nrow, len(images)), padding=1, pad_value=1.0)
    # Integer nearest-neighbour enlargement of small grids
    scale = max(1, -(-min_side // max(grid.shape[-2:])))
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
