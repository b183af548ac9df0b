"""QC pictures: a mid-sagittal slice, alone and with the semantic and the instance mask (SPINEPS's snapshot)."""

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


def instance_colours(ids: list[int]) -> dict[int, tuple[float, float, float]]:
    """A colour per vertebra, neighbours in different hues (tab20's dark shades, then its light ones); an IVD
    (100+X) and endplates (200+X) take their vertebra X's colour."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"]
    vertebrae = sorted({v % L.IVD_OFFSET for v in ids if v % L.IVD_OFFSET})
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    own: dict[int, tuple[float, float, float]] = {v: tab20(order[k % 20])[:3] for k, v in enumerate(vertebrae)}
    return {v: own[v % L.IVD_OFFSET] for v in ids if v % L.IVD_OFFSET}


def snapshot_png(
    path: str | os.PathLike[str],
    image: NDArray,
    semantic: NDArray,
    instance: NDArray,
    affine: NDArray[np.float64],
    *,
    title: str,
    names: dict[int, str] | None = None,
) -> None:
    """SPINEPS's QC picture of one image: its mid-sagittal slice alone, with the semantic mask, and with the
    instance mask, each mask with a legend (the instance legend lists vertebrae only, by `names`: IVDs and
    endplates wear their vertebra's colour, paler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = names if names is not None else {}
    img2d, aspect = _sagittal(image, affine)
    sem2d, inst2d = _sagittal(semantic, affine)[0], _sagittal(instance, affine)[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 6), dpi=80)
    lo, hi = np.percentile(img2d, (1, 99.5))
    for ax in axes:
        ax.imshow(img2d, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax.set_axis_off()
    semantic_ids = [int(v) for v in np.unique(sem2d) if v != 0]
    tab20 = matplotlib.colormaps["tab20"]
    semantic_colours: dict[int, tuple[float, float, float]] = {v: tab20(k % 20)[:3] for k, v in enumerate(semantic_ids)}
    instance_ids = [int(v) for v in np.unique(inst2d) if v != 0]
    instance_colour = instance_colours(instance_ids)
    for ax, lab2d, colours, alpha in ((axes[1], sem2d, semantic_colours, lambda v: 0.5),
                                      (axes[2], inst2d, instance_colour, lambda v: 0.6 if v < L.IVD_OFFSET else 0.3)):
        rgba = np.zeros((*lab2d.shape, 4))
        for v, colour in colours.items():
            rgba[lab2d == v] = (*colour, alpha(v))
        ax.imshow(rgba, aspect=aspect, interpolation="nearest")
    axes[0].set_title(title, fontsize=9)
    axes[1].set_title("semantic", fontsize=9)
    axes[2].set_title("instances", fontsize=9)
    axes[1].legend(handles=[Patch(color=c, label=f"{v} {L.SEMANTIC_NAMES.get(v, '')}".strip()) for v, c in semantic_colours.items()],
                   loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    axes[2].legend(handles=[Patch(color=c, label=names.get(v, str(v))) for v, c in instance_colour.items() if v < L.IVD_OFFSET],
                   loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
