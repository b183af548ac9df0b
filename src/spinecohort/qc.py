"""QC pictures: a mid-sagittal slice with a label overlay and a legend."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from . import labels as L
from .io import atomic_path


def _sagittal(volume: NDArray, affine: NDArray[np.float64]) -> tuple[NDArray, float]:
    """Mid-sagittal slice as a radiologist shows it (superior up, anterior left) and its pixel aspect."""
    ornt = nib.orientations.axcodes2ornt(nib.aff2axcodes(affine))
    to_pir = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("P", "I", "R")))
    pir = nib.orientations.apply_orientation(volume, to_pir)
    spacing = np.empty(3)
    spacing[to_pir[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    return pir[:, :, pir.shape[2] // 2].T, float(spacing[1] / spacing[0])


def snapshot_png(
    path: str | os.PathLike[str],
    image: NDArray,
    mask: NDArray,
    affine: NDArray[np.float64],
    *,
    title: str,
    names: dict[int, str] | None = None,
) -> None:
    """Write a PNG of the image's mid-sagittal slice with `mask` overlaid and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = names if names is not None else L.SEMANTIC_NAMES
    img2d, aspect = _sagittal(image, affine)
    lab2d, _ = _sagittal(mask, affine)
    present = [int(v) for v in np.unique(lab2d) if v != 0]
    cmap = plt.get_cmap("tab20", max(len(present), 1))
    rgba = np.zeros((*lab2d.shape, 4))
    for k, v in enumerate(present):
        rgba[lab2d == v] = (*cmap(k)[:3], 0.45)
    fig, ax = plt.subplots(figsize=(7.5, 6), dpi=80)
    lo, hi = np.percentile(img2d, (1, 99.5))
    ax.imshow(img2d, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
    ax.imshow(rgba, aspect=aspect, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    handles = [Patch(color=cmap(k), label=f"{v} {names.get(v, '')}".strip()) for k, v in enumerate(present)]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
