"""One whole-spine picture per subject: its stations' masks on one grid, the patient's motion between stations undone.

A subject's stations share the scanner frame, so they stitch by their affines. What the patient moved between
two stations is their link's displacement (`subject_levels.Link.shift`, from the structures both show:
`subject_levels.refined_shift`); each lower station is translated back onto the one above. Translation only: the link measures the shift
where the stations overlap, which is where the seam runs; a rotation of a few degrees moves a station's far end,
not its seam.

The grid has the top station's axes and voxel size, extended to cover every station. Where stations overlap,
a voxel comes from the station whose field it lies deeper in along the column (world S): the seam runs through
the middle of the overlap, away from the borders where vertebrae are cut. Masks are resampled nearest-neighbour
(ids stay ids); the image, for the QC picture only, linearly, each station scaled by its own 99th percentile
(stations differ in coil and gain).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from .geometry import Grid, resample

__all__ = ["Piece", "stitch", "stitch_grid"]


@dataclass(frozen=True)
class Piece:
    """One station to stitch: its layers (masks or image) on its own grid, and the world shift that undoes motion."""

    layers: tuple[NDArray, ...]
    affine: NDArray[np.float64]
    shift: NDArray[np.float64]  # added to the station's world coordinates

    @property
    def moved_affine(self) -> NDArray[np.float64]:
        out = self.affine.copy()
        out[:3, 3] += self.shift
        return out


def _corners(shape: Sequence[int], affine: NDArray[np.float64]) -> NDArray[np.float64]:
    """World positions of a grid's eight outer voxel corners."""
    edges = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape], indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ edges).T + affine[:3, 3]


def stitch_grid(pieces: Sequence[Piece]) -> Grid:
    """The top station's axes and voxel size, over the bounding box of every (moved) station.

    >>> a = np.diag([1.0, 1.0, 2.0, 1.0])
    >>> b = a.copy(); b[2, 3] = -10.0  # 10 mm further down, overlapping by 10 of its 20 mm
    >>> shape, affine = stitch_grid([Piece((np.zeros((4, 4, 10)),), a, np.zeros(3)), Piece((np.zeros((4, 4, 10)),), b, np.zeros(3))])
    >>> shape, affine[2, 3].item()
    ((4, 4, 15), -10.0)
    """
    top = max(pieces, key=lambda p: _corners(p.layers[0].shape, p.moved_affine)[:, 2].max())
    to_top = np.linalg.inv(top.moved_affine)
    corners = np.concatenate([_corners(p.layers[0].shape, p.moved_affine) for p in pieces])
    index = (to_top[:3, :3] @ corners.T).T + to_top[:3, 3]
    lo = np.floor(index.min(axis=0) + 0.5 + 1e-6)  # the first voxel centre inside the box
    hi = np.ceil(index.max(axis=0) - 0.5 - 1e-6)
    affine = top.moved_affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    shape = (hi - lo + 1).astype(int)
    return (int(shape[0]), int(shape[1]), int(shape[2])), affine


def stitch(pieces: Sequence[Piece], kinds: Sequence[Literal["linear", "nearest"]]) -> tuple[list[NDArray], Grid]:
    """Each layer of the pieces on `stitch_grid`, every voxel from the piece it lies deepest in along world S.
    The first layer is a mask (nearest): where it lands tells where a piece covers the grid."""
    grid = stitch_grid(pieces)
    shape, affine = grid
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    a = affine[2].astype(np.float32)  # world S is linear in the voxel index
    height = a[0] * i[:, None, None] + a[1] * j[None, :, None] + a[2] * k[None, None, :] + a[3]
    out = [np.zeros(shape, np.float32 if kind == "linear" else np.int32) for kind in kinds]
    deepest = np.full(shape, -np.inf, np.float32)
    for p in pieces:
        s = _corners(p.layers[0].shape, p.moved_affine)[:, 2]
        first = resample(p.layers[0], p.moved_affine, grid, kind="nearest", outside=-1)
        depth = np.minimum(height - np.float32(s.min()), np.float32(s.max()) - height)
        mine = (first >= 0) & (depth > deepest)
        deepest[mine] = depth[mine]
        np.copyto(out[0], first, where=mine)
        for layer, (data, kind) in enumerate(zip(p.layers[1:], kinds[1:], strict=True), start=1):
            np.copyto(out[layer], resample(data, p.moved_affine, grid, kind=kind), where=mine)
    return out, grid
