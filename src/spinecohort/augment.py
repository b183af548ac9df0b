"""Augmentations for instance-model training (SPINEPS supplement A), each a small pure function.

A sample is a cutout of the semantic mask in SPINEPS ids (the network's
input before `instances.network_input`) and its target (0 background,
1 vertebra above, 2 centre vertebra, 3 vertebra below), both in (P, I, R)
axis order. The augmentations imitate what the semantic phase gets wrong or
what a station cuts off, so that the instance network tolerates it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from . import labels as L

__all__ = [
    "AugmentConfig",
    "scale",
    "erode",
    "down_up",
    "drop_label",
    "vertical_crop",
    "flip_left_right",
    "augment",
]

Sample = tuple[NDArray[np.integer], NDArray[np.integer]]
_INFERIOR_AXIS = 1  # I in (P, I, R)
_LEFT_RIGHT_AXIS = 2  # R in (P, I, R)


@dataclass(frozen=True)
class AugmentConfig:
    """Probability of each augmentation per sample (the paper's values by default)."""

    scale: float = 0.3
    scale_range: float = 0.2
    erode: float = 0.1
    down_up: float = 0.1
    drop_label: float = 0.1
    vertical_crop: float = 0.25
    flip: float = 0.5

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> AugmentConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown augmentation setting(s): {', '.join(sorted(unknown))}")
        return cls(**{k: float(v) for k, v in values.items()})


def scale(seg: NDArray, target: NDArray, factor: float) -> Sample:
    """Zoom both about the cutout centre by `factor` (nearest neighbour), keeping the cutout size."""
    centre = (np.array(seg.shape) - 1) / 2
    # output voxel x samples input voxel centre + (x - centre) / factor
    matrix = np.eye(3) / factor
    offset = centre - matrix @ centre

    def zoom(a: NDArray) -> NDArray:
        return ndimage.affine_transform(a, matrix, offset=offset, order=0, mode="constant", cval=0, output=a.dtype)

    return zoom(seg), zoom(target)


def erode(seg: NDArray, target: NDArray, iterations: int = 1) -> Sample:
    """Peel `iterations` voxels off the foreground's outer surface (a thinner semantic mask); the target stays."""
    keep = ndimage.binary_erosion(seg > 0, iterations=iterations, border_value=0)
    return np.where(keep, seg, 0).astype(seg.dtype), target


def down_up(seg: NDArray, target: NDArray, factor: int = 2) -> Sample:
    """Nearest down-sampling by `factor` and back: the blocky mask of a coarse semantic prediction."""
    coarse = seg[::factor, ::factor, ::factor]
    up = coarse.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)
    return up[: seg.shape[0], : seg.shape[1], : seg.shape[2]].copy(), target


def drop_label(seg: NDArray, target: NDArray, rng: np.random.Generator) -> Sample:
    """Remove one vertebra-part label present in the cutout (a structure the semantic phase missed)."""
    present = np.intersect1d(np.unique(seg), L.VERTEBRA_PARTS)
    if present.size == 0:
        return seg, target
    gone = rng.choice(present)
    return np.where(seg == gone, 0, seg).astype(seg.dtype), target


def vertical_crop(seg: NDArray, target: NDArray, rng: np.random.Generator, *, min_keep: float = 0.5) -> Sample:
    """Blank the cutout above or below a random level, input and target alike (a station's edge)."""
    n = seg.shape[_INFERIOR_AXIS]
    cut = int(rng.integers(int(min_keep * n), n))
    index = [slice(None)] * 3
    index[_INFERIOR_AXIS] = slice(cut, None) if rng.random() < 0.5 else slice(0, n - cut)
    seg, target = seg.copy(), target.copy()
    seg[tuple(index)] = 0
    target[tuple(index)] = 0
    return seg, target


def flip_left_right(seg: NDArray, target: NDArray) -> Sample:
    """Mirror the left/right axis and swap the left/right labels (43<->44, 45<->46, 47<->48)."""
    lut = np.arange(max(256, int(seg.max()) + 1), dtype=seg.dtype)
    for left, right in L.LEFT_RIGHT_PAIRS:
        lut[left], lut[right] = right, left
    return np.flip(lut[seg], _LEFT_RIGHT_AXIS).copy(), np.flip(target, _LEFT_RIGHT_AXIS).copy()


def augment(seg: NDArray, target: NDArray, rng: np.random.Generator, config: AugmentConfig) -> Sample:
    """Each augmentation with its own probability, in a fixed order (geometry first, then damage)."""
    if rng.random() < config.scale:
        seg, target = scale(seg, target, 1.0 + rng.uniform(-config.scale_range, config.scale_range))
    if rng.random() < config.flip:
        seg, target = flip_left_right(seg, target)
    if rng.random() < config.vertical_crop:
        seg, target = vertical_crop(seg, target, rng)
    if rng.random() < config.erode:
        seg, target = erode(seg, target)
    if rng.random() < config.down_up:
        seg, target = down_up(seg, target)
    if rng.random() < config.drop_label:
        seg, target = drop_label(seg, target, rng)
    return seg, target
