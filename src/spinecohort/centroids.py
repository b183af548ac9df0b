"""Vertebra centroids as SPINEPS writes them (``…_seg-spine_ctd.json``), in the POI layout TPTBox reads.

SPINEPS's centroid file holds one point per vertebra: the centre of mass of the whole vertebra instance
(TPTBox's subregion 50, "Vertebra_Full"; IVDs and endplates left out), S1 included, in voxel coordinates
of the image's own grid. The file is a JSON list of two objects: the grid (axis codes, voxel size, origin,
direction matrix, shape) with the format keys and our provenance, then ``{vertebra id: {"50": [i, j, k]}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from . import labels as L

VERTEBRA_FULL: Final = 50  # TPTBox's Location.Vertebra_Full
DECIMALS: Final = 2  # as TPTBox rounds


def vertebra_centroids(instance: NDArray[np.integer]) -> dict[int, tuple[float, float, float]]:
    """Vertebra id -> centre of mass (voxel coordinates) of its whole instance, for every id under 100."""
    ids = [int(v) for v in np.unique(instance) if 0 < v < L.IVD_OFFSET]
    if not ids:
        return {}
    centres = ndimage.center_of_mass(np.ones(instance.shape, bool), instance, ids)
    return {k: tuple(round(float(c), DECIMALS) for c in centre) for k, centre in zip(ids, centres)}  # type: ignore[misc]


def poi_json(instance: NDArray[np.integer], affine: NDArray[np.float64], info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The centroid file's content for an instance mask on the grid `affine`; `info` joins the first object."""
    zoom = np.linalg.norm(affine[:3, :3], axis=0)
    grid = {
        "direction": list(nib.aff2axcodes(affine)),
        "zoom": [float(z) for z in zoom],
        "origin": [float(o) for o in affine[:3, 3]],
        "rotation": (affine[:3, :3] / zoom).tolist(),
        "shape": [int(s) for s in instance.shape],
        "format": "POI",
        "level_one_info": "Any",
        "level_two_info": "Any",
    }
    points = {str(k): {str(VERTEBRA_FULL): list(c)} for k, c in sorted(vertebra_centroids(instance).items())}
    return [{**grid, **{k: v for k, v in info.items() if k not in grid}}, points]
