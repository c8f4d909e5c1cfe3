"""Sample images on disk: a PNG grid of a cell's first samples, linked from the reports,
and every sample of a cell for outside evaluators (`bench run --save-samples`).

`samples/<cell_id>.npz` holds one array, `arr_0`: uint8 [N, H, W, C] in sample order
(sample i of the cell at row i), the layout the ADM / guided-diffusion evaluation suite
reads and EDM's tools write. Samples in [-1, 1] become uint8 as EDM saves them
(x * 127.5 + 128, clipped, truncated). The rows stream into the archive batch by batch
(memory stays one batch), in a temporary file renamed over the target once all N are in.
"""

from __future__ import annotations

import contextlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .files import atomic_write


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
    png = io.BytesIO()
    save_image(grid, png, format="png")
    return atomic_write(path, png.getvalue())  # whole or not at all (a full disk leaves no 0-byte PNG)


def to_uint8_nhwc(x0: Tensor) -> np.ndarray:
    """Images in [-1, 1] [B, C, H, W] to uint8 [B, H, W, C], rounded as EDM saves them."""
    x = (x0.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class SampleWriter:
    """Rows of an npz `arr_0` of n images, written in order; `close()` publishes the file."""

    def __init__(self, path: Path, n: int) -> None:
        self.path, self.n, self.written = Path(path), n, 0
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.zip: zipfile.ZipFile | None = None
        self.member = None

    def write(self, indices: Tensor, x0: Tensor) -> None:
        """The batch's images; its positions must follow the rows already written."""
        first = int(indices[0]) if len(indices) else self.written
        if first != self.written or (len(indices) and int(indices[-1]) != first + len(indices) - 1):
            raise ValueError(f"samples arrive out of order: rows {self.written}.. expected, got {first}..")
        images = to_uint8_nhwc(x0)
        if self.member is None:
            self._open(images.shape[1:])
        self.member.write(np.ascontiguousarray(images).tobytes())
        self.written += len(images)

    def _open(self, shape: tuple[int, ...]) -> None:
        # np.savez's layout: a stored (uncompressed) zip member arr_0.npy in .npy format 1.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.member = self.zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.n, *shape)}
        np.lib.format.write_array_header_1_0(self.member, header)

    def close(self) -> Path | None:
        """Publish the archive (all n rows in) and return its path; None if nothing was written."""
        if self.zip is None:
            return None
        if self.written != self.n:
            self.abort()
            raise ValueError(f"{self.written} of {self.n} samples written")
        self.member.close()
        self.zip.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        self.zip = self.member = None
        return self.path

    def __del__(self) -> None:  # a cell that failed midway leaves no partial archive
        if self.zip is not None:
            self.abort()

    def abort(self) -> None:
        """Drop the partial archive."""
        with contextlib.suppress(Exception):
            if self.member is not None:
                self.member.close()
            if self.zip is not None:
                self.zip.close()
        self.zip = self.member = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
