"""Image grids: orientation, resampling to a model's space, and back.

Arrays are in nibabel order (i, j, k) with a RAS affine; SimpleITK does the
interpolation (linear for images, nearest neighbour for masks), which is the
fastest exact-grid option measured (0.1 s per NAKO image).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

__all__ = ["Grid", "to_sitk", "from_sitk", "target_grid", "resample", "reorient", "spacing_of", "geometry_mismatch"]

_LPS = np.diag([-1.0, -1.0, 1.0])
Grid = tuple[tuple[int, int, int], NDArray[np.float64]]  # (shape, affine)


def spacing_of(affine: NDArray[np.float64]) -> NDArray[np.float64]:
    """Voxel size (mm) along each array axis: the column norms of the affine."""
    return np.linalg.norm(affine[:3, :3], axis=0)


def to_sitk(data: NDArray, affine: NDArray[np.float64]) -> sitk.Image:
    """Wrap an (i, j, k) array with a RAS affine as a SimpleITK image (LPS geometry)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    spacing = spacing_of(affine)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(v) for v in _LPS @ affine[:3, 3]))
    img.SetDirection(tuple(float(v) for v in (_LPS @ affine[:3, :3] / spacing).ravel()))
    return img


def from_sitk(img: sitk.Image) -> tuple[NDArray, NDArray[np.float64]]:
    """Inverse of `to_sitk`: (i, j, k) array and RAS affine."""
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    direction = np.array(img.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ direction * np.array(img.GetSpacing())
    affine[:3, 3] = _LPS @ np.array(img.GetOrigin())
    return data, affine


def reorient(data: NDArray, affine: NDArray[np.float64], codes: Sequence[str]) -> tuple[NDArray, NDArray[np.float64]]:
    """Permute/flip axes (no interpolation) so the array axes point along `codes`, e.g. ("P", "I", "R")."""
    start = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(tuple(codes)))
    out = nib.orientations.apply_orientation(data, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(out), new_affine


def spacing_along(affine: NDArray[np.float64], codes: Sequence[str]) -> NDArray[np.float64]:
    """An image's voxel size (mm) along the axes of orientation `codes` (what reorienting it would give).

    >>> spacing_along(np.diag([0.5, 0.6, 3.0, 1.0]), ("P", "I", "R")).tolist()  # RAS voxel axes
    [0.6, 3.0, 0.5]
    """
    return spacing_of(reorient(np.zeros((1, 1, 1)), affine, codes)[1])


def target_grid(shape: Sequence[int], affine: NDArray[np.float64], codes: Sequence[str], spacing: Sequence[float]) -> Grid:
    """The grid in orientation `codes` at `spacing` (mm) that covers the same field of view.

    The outer voxel edges of both grids coincide (corner alignment), so a round
    trip maps the field of view onto itself; the shape is rounded to whole voxels.
    """
    probe, oriented = reorient(np.zeros(tuple(shape), np.uint8), affine, codes)
    old_shape = np.array(probe.shape)
    old_spacing = spacing_of(oriented)
    new_spacing = np.asarray(spacing, dtype=float)
    extent = old_shape * old_spacing
    new_shape = np.maximum(np.round(extent / new_spacing).astype(int), 1)
    direction = oriented[:3, :3] / old_spacing
    new_affine = np.eye(4)
    new_affine[:3, :3] = direction * new_spacing
    # First voxel centre: half a new voxel inside the old field of view's corner.
    corner = oriented[:3, 3] - direction @ (old_spacing / 2)
    new_affine[:3, 3] = corner + direction @ (new_spacing / 2)
    return (int(new_shape[0]), int(new_shape[1]), int(new_shape[2])), new_affine


def resample(
    data: NDArray,
    affine: NDArray[np.float64],
    grid: Grid,
    *,
    kind: Literal["linear", "nearest"],
    threads: int = 1,
    outside: float = 0.0,
) -> NDArray:
    """Resample `data` onto `grid` (shape, affine); outside the field of view is `outside`."""
    shape, target_affine = grid
    reference = to_sitk(np.zeros(tuple(shape), np.uint8), target_affine)
    interp = sitk.sitkLinear if kind == "linear" else sitk.sitkNearestNeighbor
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(reference)
    f.SetInterpolator(interp)
    f.SetDefaultPixelValue(outside)
    f.SetNumberOfThreads(threads)
    f.SetOutputPixelType(sitk.sitkFloat32 if kind == "linear" else sitk.sitkInt32)
    out, _ = from_sitk(f.Execute(to_sitk(data, affine)))
    return out


def geometry_mismatch(pred_path: Path, pred_shape, pred_affine, ref_path: Path, ref_shape, ref_affine) -> str | None:
    """A message naming both files and both grids when they differ, else None."""
    if tuple(pred_shape) == tuple(ref_shape) and np.allclose(pred_affine, ref_affine, atol=1e-3):
        return None
    def grid(shape, affine):
        return f"shape {tuple(int(s) for s in shape)}, affine {np.round(affine[:3], 3).tolist()}"
    return f"reference {ref_path} ({grid(ref_shape, ref_affine)}) is not on the grid of {pred_path} ({grid(pred_shape, pred_affine)})"
