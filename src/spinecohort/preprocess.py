"""Pre-processing: N4 bias-field correction and resampling into a model's space."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from . import geometry
from .defaults import N4 as N4_DEFAULTS

__all__ = ["N4Result", "bias_correct", "n4_shrink_factors", "to_model_space"]


@dataclass(frozen=True)
class N4Result:
    corrected: NDArray[np.float32]
    bias: NDArray[np.float32]  # estimated multiplicative field, on the input grid
    mask_fraction: float  # share of voxels in the N4 mask (a QC figure: N4 fails on tiny masks)


# An axis is never shrunk below this many voxels: N4 fits a cubic B-spline mesh on the shrunk image (5
# control points per axis at two fitting levels, 11 at four), and an axis shrunk to one voxel has no extent
# at all (ITK refuses it: "zero-valued spacing"). The demo's and NAKO's grids are shrunk as before.
MIN_SHRUNK_VOXELS = 16


# The through-plane shrink factor goes to the coarsest axis only where it is this much coarser than both others (a
# stack of thick slices): an isotropic grid, or one whose short axis is the fine one, has no through-plane axis, and
# shrinking one of its axes less than the others only slows N4.
THROUGH_PLANE_RATIO = 1.5


def n4_shrink_factors(spacing: Sequence[float], shrink: Sequence[int], size: Sequence[int]) -> list[int]:
    """Per-axis shrink factors: `shrink` is (in-plane, in-plane, through-plane), the coarsest axis gets the last
    (when THROUGH_PLANE_RATIO times coarser than both others; else every axis an in-plane one); each is lowered
    where it would leave the axis under MIN_SHRUNK_VOXELS (a short axis is not shrunk).

    >>> n4_shrink_factors((0.67, 0.67, 4.0), (4, 4, 2), (448, 448, 15))
    [4, 4, 1]
    >>> n4_shrink_factors((4.0, 0.67, 0.67), (4, 4, 2), (40, 448, 448))
    [2, 4, 4]
    >>> n4_shrink_factors((1.875, 1.875, 1.0), (8, 8, 1), (160, 160, 14))  # thin slices on the short axis
    [8, 8, 1]
    >>> n4_shrink_factors((1.0, 1.0, 1.0), (8, 6, 1), (300, 300, 62))  # isotropic
    [8, 6, 3]
    """
    second, first = sorted(spacing)[1:]
    coarse = int(np.argmax(spacing)) if first > THROUGH_PLANE_RATIO * second else None
    fine = itertools.cycle(shrink[:2])  # the in-plane factors in turn (an isotropic grid's third axis takes the first again)
    wanted = [int(shrink[2]) if axis == coarse else int(next(fine)) for axis in range(3)]
    return [max(1, min(factor, int(n) // MIN_SHRUNK_VOXELS)) for factor, n in zip(wanted, size)]


def bias_correct(
    image: NDArray[np.float32],
    affine: NDArray[np.float64],
    *,
    shrink: Sequence[int] = N4_DEFAULTS["shrink"],
    iterations: Sequence[int] = N4_DEFAULTS["iterations"],
    bias_fwhm: float = N4_DEFAULTS["bias_fwhm"],
    threads: int = 1,
) -> N4Result:
    """N4 bias-field correction (SimpleITK), fitted on a shrunk copy, applied at full resolution.

    The mask is Otsu's threshold on log intensities: air noise and tissue differ
    by a large ratio, while on linear intensities Otsu may split bright from dark
    tissue instead (mask 5 % of a lumbar phantom, N4 then fails). Intensities are
    shifted to a zero minimum first, as SPINEPS does: N4 models a positive signal.

    Notes
    -----
    Three fitting levels, not N4's usual four: on spine stations the finest
    B-spline mesh takes up anatomy such as bright discs and CSF as "bias".
    `benchmarks/bench_n4.py` holds the table of settings tried.
    """
    shifted = np.asarray(image, np.float32) - float(image.min())
    img = geometry.to_sitk(shifted, affine)
    mask = sitk.OtsuThreshold(geometry.to_sitk(np.log1p(shifted), affine), 0, 1, 200)
    factors = n4_shrink_factors(img.GetSpacing(), shrink, img.GetSize())
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.SetBiasFieldFullWidthAtHalfMaximum(bias_fwhm)
    n4.SetNumberOfThreads(threads)
    n4.Execute(sitk.Shrink(img, factors), sitk.Shrink(mask, factors))
    log_bias, _ = geometry.from_sitk(n4.GetLogBiasFieldAsImage(img))
    bias = np.exp(log_bias).astype(np.float32)
    mask_fraction = float(sitk.GetArrayViewFromImage(mask).mean())
    corrected = (np.asarray(image, np.float32) / bias).astype(np.float32)
    return N4Result(corrected, bias, mask_fraction)


def to_model_space(
    image: NDArray[np.float32],
    affine: NDArray[np.float64],
    *,
    orientation: Sequence[str],
    spacing: Sequence[float],
    threads: int = 1,
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Reorient to `orientation` and resample (linear) to `spacing` mm; returns image and affine."""
    grid = geometry.target_grid(image.shape, affine, orientation, spacing)
    out = geometry.resample(image, affine, grid, kind="linear", threads=threads)
    return out.astype(np.float32), grid[1]
