"""Instance phase: vertebra instances from a semantic mask, SPINEPS style.

Steps, all in the instance model's space (orientation (P, I, R): axis 1 runs
inferior, so "above" means a smaller index on axis 1):

1. `corpus_centres`: one cutout centre per vertebral body (label 49), after a
   light erosion and removal of specks; merged bodies are split.
2. `cutout_predictions`: a window of the model's cutout size around each centre
   (zero-padded at the borders), one-hot input, a predictor returning
   0 background / 1 vertebra above / 2 centre vertebra / 3 vertebra below.
3. `merge_predictions`: masks of the same vertebra from neighbouring cutouts are
   paired by overlap and merged by votes into one instance per vertebra.
4. `finish_instances` and `number_instances`: clean-up; fragments (specks,
   pieces far smaller than their neighbours) get no id; levels where an anchor
   passes its checks (a cervical station's complete top vertebra is C2; a
   lumbar station's sacrum of plausible size below the lowest vertebra is S1),
   else a count from 2 (see `vertebra_levels`); IVD 100+X and endplate 200+X
   after the nearest vertebra above.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from . import labels as L
from .models import SPINEPS_GRID_MM3

__all__ = [
    "InstanceModel",
    "Numbering",
    "Predictor",
    "assemble",
    "claim_instances",
    "corpus_centres",
    "cutout_predictions",
    "finish_instances",
    "merge_predictions",
    "network_input",
    "number_instances",
    "vertebra_levels",
    "read_instance_model",
    "split_endplates",
]

# A predictor maps a batch of one-hot cutouts (N, 10, *size) and their window
# origins (N, 3) in instance space to class maps (N, *size) with values 0..3.
Predictor = Callable[[NDArray[np.float32], NDArray[np.int64]], NDArray[np.uint8]]
_VERTEBRA = np.array(L.VERTEBRA_PARTS)
_CUBE = np.ones((3, 3, 3), bool)


# SPINEPS 2.1.3 reads `corpus_size_cleaning` and `vert_size_threshold` as voxel counts at the model's
# resolution (`resolution_range`): it scales them to mm³ by that voxel volume, back to voxels by the grid's,
# and never goes below 40 voxels of its reference grid, (0.75, 0.75, 1.65) mm: 37.125 mm³.
_MIN_CLEANING_MM3: Final = 40 * SPINEPS_GRID_MM3


@dataclass(frozen=True)
class InstanceModel:
    """What the instance phase needs from a SPINEPS instance model folder's ``inference_config.json``."""

    path: Path
    orientation: tuple[str, str, str]
    spacing: tuple[float, float, float]
    cutout: tuple[int, int, int]
    corpus_size_cleaning: float = 100.0  # voxels at the model's resolution: eroded body pieces below give no cutout
    vert_size_threshold: float = 250.0  # voxels at the model's resolution: instance pieces below are dropped

    @property
    def voxel_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def _voxels(self, threshold: float) -> int:
        """A SPINEPS size threshold in voxels of the grid the phase runs on (the model's own), computed as SPINEPS
        does it, so that a threshold's rounding is the same in both tools."""
        grid_mm3 = self.spacing[0] * self.spacing[1] * self.spacing[2]
        return max(int(threshold * self.voxel_mm3 / grid_mm3), max(round(_MIN_CLEANING_MM3 / grid_mm3), 1))

    @property
    def corpus_min_voxels(self) -> int:
        return self._voxels(self.corpus_size_cleaning)

    @property
    def vertebra_min_voxels(self) -> int:
        return self._voxels(self.vert_size_threshold)

    @property
    def checkpoint(self) -> Path:
        found = sorted(self.path.glob("**/*weights*.ckpt"))
        if len(found) != 1:
            raise ValueError(f"instance model {self.path}: expected exactly one *weights*.ckpt, found {len(found)}")
        return found[0]


def read_instance_model(folder: str | Path) -> InstanceModel:
    folder = Path(folder)
    cfg_path = folder / "inference_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        resolution = np.asarray(cfg["resolution_range"], float)
        spacing = resolution if resolution.ndim == 1 else resolution[0]
        orientation = cfg.get("model_expected_orientation", ("P", "I", "R"))
        cutout = cfg.get("cutout_size", (248, 304, 64))
        return InstanceModel(
            path=folder,
            orientation=(str(orientation[0]), str(orientation[1]), str(orientation[2])),
            spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
            cutout=(int(cutout[0]), int(cutout[1]), int(cutout[2])),
            corpus_size_cleaning=float(cfg.get("corpus_size_cleaning", 100)),
            vert_size_threshold=float(cfg.get("vert_size_threshold", 250)),
        )
    except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"instance model {cfg_path}: {exc}") from exc


# --- 1. centres -------------------------------------------------------------


def _components(mask: NDArray[np.bool_], min_voxels: int) -> list[NDArray[np.int64]]:
    lab, n = ndimage.label(mask, structure=_CUBE)
    parts = ndimage.find_objects(lab)
    out = []
    for k, box in enumerate(parts, start=1):
        local = np.argwhere(lab[box] == k)
        if len(local) >= min_voxels:
            out.append(local + [s.start for s in box])
    return out


def _split(voxels: NDArray[np.int64], shape: Sequence[int]) -> list[NDArray[np.int64]]:
    """Cut a merged body in two: erode until it breaks, then cut through the neck where the parts met.

    The cut plane passes through the centre of the neck (the voxels next to both parts in the last
    connected erosion) and is normal to the line between the parts' centres, as SPINEPS cuts.
    """
    mask = np.zeros(shape, bool)
    mask[tuple(voxels.T)] = True
    parts: list[NDArray[np.int64]] = []
    eroded = mask
    for _ in range(10):
        connected, eroded = eroded, ndimage.binary_erosion(eroded)
        parts = sorted(_components(eroded, 1), key=len, reverse=True)
        if len(parts) >= 2 or not eroded.any():
            break
    if len(parts) >= 2:
        a, b = parts[0].mean(axis=0), parts[1].mean(axis=0)
        near = []
        for part in parts[:2]:
            own = np.zeros(shape, bool)
            own[tuple(part.T)] = True
            near.append(ndimage.binary_dilation(own, structure=_CUBE))
        neck = np.argwhere(connected & near[0] & near[1])
        centre = neck.mean(axis=0) if len(neck) else (a + b) / 2
    else:  # never broke apart: halve it along the column
        centre = voxels.mean(axis=0)
        a, b = centre - [0, 1, 0], centre + [0, 1, 0]
    side = (voxels - centre) @ (b - a) > 0
    return [voxels[~side], voxels[side]]


def corpus_centres(seg: NDArray[np.integer], *, min_voxels: int = 100, erode: int = 2, merged_factor: float = 1.5) -> NDArray[np.float64]:
    """Vertebral-body centres (voxel coordinates), top first.

    The bodies are eroded by `erode` voxels (18-connected, as SPINEPS does: it
    parts bodies that touch through an endplate) and pieces under `min_voxels` dropped (measured face-connected,
    as SPINEPS's cleaning does).

    A body larger than `merged_factor` x the mean of its up to 5 neighbours on
    each side (at least 3 neighbours) is taken to be two merged bodies and split.
    """
    corpus = ndimage.binary_erosion(seg == L.CORPUS, structure=ndimage.generate_binary_structure(3, 2), iterations=erode)
    # Pieces go by their size as SPINEPS measures it, face-connected; the bodies are the 26-connected parts left.
    faces, _ = ndimage.label(corpus)
    corpus &= (np.bincount(faces.ravel()) >= min_voxels)[faces]
    bodies = sorted(_components(corpus, 1), key=lambda v: v[:, 1].mean())
    sizes = np.array([len(b) for b in bodies], float)
    out = []
    for k, body in enumerate(bodies):
        others = np.r_[sizes[max(0, k - 5) : k], sizes[k + 1 : k + 6]]
        if len(others) >= 3 and sizes[k] > merged_factor * others.mean():
            out += _split(body, seg.shape)
        else:
            out.append(body)
    centres = np.array([b.mean(axis=0) for b in out]).reshape(-1, 3)
    return centres[np.argsort(centres[:, 1])]


def walk_to_foreground(seg: NDArray[np.integer], centre: NDArray[np.float64], step: int = 5) -> NDArray[np.int64]:
    """A centre on background moves inferiorly (axis 1) until it meets foreground or the edge."""
    c = np.round(centre).astype(np.int64)
    while c[1] < seg.shape[1] - step and seg[tuple(c)] == 0:
        c[1] += step
    return c


# --- 2. cutouts ----------------------------------------------------------------


def network_input(seg: NDArray[np.integer]) -> NDArray[np.uint8]:
    """Semantic labels as the instance network sees them: 41-48 -> 1-8, 49 -> 9, everything else 0."""
    lut = np.zeros(max(256, int(seg.max()) + 1), np.uint8)
    lut[list(L.VERTEBRA_PARTS)] = np.arange(1, 10)
    return lut[seg]


def _window(volume: NDArray, origin: NDArray[np.int64], size: Sequence[int]) -> NDArray:
    """volume[origin : origin + size], zero where the window leaves the volume."""
    out = np.zeros(tuple(size), volume.dtype)
    src = tuple(slice(max(0, o), min(n, o + s)) for o, s, n in zip(origin, size, volume.shape))
    dst = tuple(slice(sl.start - o, sl.stop - o) for sl, o in zip(src, origin))
    out[dst] = volume[src]
    return out


def cutout_predictions(
    seg: NDArray[np.integer], centres: NDArray[np.float64], size: Sequence[int], predictor: Predictor, batch_size: int = 4
) -> list[dict[int, NDArray[np.int64]]]:
    """Per cutout, the flat voxel indices (in `seg`) predicted as 1 above / 2 centre / 3 below."""
    mapped = network_input(seg)
    origins = np.array([walk_to_foreground(seg, c) - np.array(size) // 2 for c in centres], np.int64).reshape(-1, 3)
    out: list[dict[int, NDArray[np.int64]]] = []
    for start in range(0, len(origins), batch_size):
        chunk = origins[start : start + batch_size]
        cut = np.stack([_window(mapped, o, size) for o in chunk])
        onehot = (cut[:, None] == np.arange(10)[None, :, None, None, None]).astype(np.float32)
        predicted = predictor(onehot, chunk)
        for origin, pred in zip(chunk, predicted):
            grid = np.argwhere(pred > 0) + origin
            inside = np.all((grid >= 0) & (grid < seg.shape), axis=1)
            flat = np.ravel_multi_index(tuple(grid[inside].T), seg.shape)
            values = pred[pred > 0][inside]
            out.append({k: flat[values == k] for k in (1, 2, 3) if (values == k).any()})
    return out


# --- 3. merging ----------------------------------------------------------------


def _dice(a: NDArray[np.int64], b: NDArray[np.int64]) -> float:
    return 2.0 * len(np.intersect1d(a, b, assume_unique=True)) / (len(a) + len(b))


def merge_predictions(predictions: list[dict[int, NDArray[np.int64]]], n_voxels: int, reach: int = 2) -> NDArray[np.uint16]:
    """One instance per vertebra (flat array, ids 1..N in merge order) from overlapping cutout predictions.

    Each mask is paired with its two best-overlapping masks (Dice > 0.3) from
    cutouts up to `reach` away; identical groups pool their agreement (mean
    partner Dice). Groups are taken best first ((size + 1) x agreement). A group
    keeps voxels with >= 2 votes, or all of its voxels when it is small (<= 2
    masks) or weakly agreeing. Voxels already taken stay with their instance; a
    group with more than 60 % of its voxels taken adds nothing new.
    """
    keys = [(i, k) for i, pred in enumerate(predictions) for k in sorted(pred)]
    groups: dict[tuple, list[float]] = {}
    for i, k in keys:
        anchor = predictions[i][k]
        scored = sorted(
            ((_dice(anchor, predictions[j][m]), (j, m)) for j, m in keys if j != i and abs(j - i) <= reach),
            reverse=True,
        )
        partners = [(d, key) for d, key in scored[:2] if d > 0.3]
        if len(partners) == 2 and _dice(predictions[partners[0][1][0]][partners[0][1][1]],
                                        predictions[partners[1][1][0]][partners[1][1][1]]) < 0.3:
            partners = partners[:1]
        group = tuple(sorted([(i, k), *(key for _, key in partners)]))
        groups.setdefault(group, []).append(float(np.mean([d for d, _ in partners])) if partners else 0.0)
    ranked = sorted(groups.items(), key=lambda g: (len(g[0]) + 1) * np.mean(g[1]), reverse=True)
    instance = np.zeros(n_voxels, np.uint16)
    next_id = 0
    for group, agreements in ranked:
        agreement = float(np.mean(agreements))
        voxels, votes = np.unique(np.concatenate([predictions[i][k] for i, k in group]), return_counts=True)
        if len(group) > 2 and agreement >= 0.3 + 0.15 * (4 - len(group)):
            voxels = voxels[votes >= 2]
        if len(voxels) == 0:
            continue
        free = voxels[instance[voxels] == 0]
        if len(free) < 0.4 * len(voxels):
            continue
        next_id += 1
        instance[free] = next_id
    return instance


# --- 4. clean-up and numbering ----------------------------------------------


def finish_instances(instance: NDArray[np.integer], seg: NDArray[np.integer], *, min_voxels: int = 250) -> NDArray[np.uint16]:
    """Keep instances on vertebra voxels, drop small pieces, fill holes, give unassigned vertebra voxels to a touching instance."""
    vertebra = np.isin(seg, _VERTEBRA)
    out = np.where(vertebra, instance, 0).astype(np.uint16)
    for k, box in enumerate(ndimage.find_objects(out), start=1):
        if box is None:
            continue
        mine = out[box] == k
        lab, n = ndimage.label(mine, structure=_CUBE)
        sizes = np.bincount(lab.ravel())[1:]
        keep = np.isin(lab, 1 + np.flatnonzero((sizes >= min_voxels) | (sizes == sizes.max())))
        filled = ndimage.binary_fill_holes(keep) & (out[box] == 0) & vertebra[box]
        region = out[box]
        region[mine & ~keep] = 0
        region[filled] = k
    _one_owner_per_articular_process(out, seg)
    # Unassigned vertebra voxels: grow the instances two voxels into them, then each remaining
    # piece joins the instance most common on its rim (pieces no instance touches stay 0).
    for _ in range(2):
        todo = vertebra & (out == 0)
        grown = ndimage.grey_dilation(out, footprint=ndimage.generate_binary_structure(3, 1))
        out[todo] = grown[todo]
    pieces, n = ndimage.label(vertebra & (out == 0), structure=_CUBE)
    for k, box in enumerate(ndimage.find_objects(pieces), start=1):
        box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box)
        piece = pieces[box] == k
        rim = out[box][ndimage.binary_dilation(piece, structure=_CUBE) & ~piece]
        rim = rim[rim > 0]
        if len(rim):
            out[box][piece] = np.bincount(rim).argmax()
    return out


def _one_owner_per_articular_process(instance: NDArray[np.uint16], seg: NDArray[np.integer]) -> None:
    """An articular process (a component of 45-48) split between instances goes whole to its clear majority (> 2x)."""
    for label in (L.SUP_ARTICULAR_L, L.SUP_ARTICULAR_R, L.INF_ARTICULAR_L, L.INF_ARTICULAR_R):
        pieces, _ = ndimage.label(seg == label, structure=_CUBE)
        for k, box in enumerate(ndimage.find_objects(pieces), start=1):
            piece = pieces[box] == k
            owners = np.bincount(instance[box][piece])
            owners[0] = 0
            ranked = np.sort(owners)[::-1]
            if ranked[0] and ranked[0] > 2 * (ranked[1] if len(ranked) > 1 else 0):
                instance[box][piece] = int(np.argmax(owners))


# A vertebra that touches no border yet has under this fraction of its neighbours' median volume
# is a fragment (a speck above C2, a piece of the sacrum's top), not a vertebra.
FRAGMENT_FRACTION: Final = 0.25
# An anchor vertebra (C2) or sacrum needs at least this fraction of its neighbours' volume.
ANCHOR_FRACTION: Final = 0.5
NUMBERING_MODES: Final = ("C2", "sacrum", "count")


@dataclass(frozen=True)
class Numbering:
    """How a station's vertebrae were numbered: "C2" or "sacrum" (anchored levels) or "count", and why."""

    mode: str
    reason: str = ""


@dataclass(frozen=True)
class _Vertebra:
    id: int  # id in the merged instance mask
    mm3: float
    centre_i: float  # position along the column (axis 1) of its body, or of all of it without a body
    at_border: bool  # touches the in-plane border (axes 0, 1) of the field of view


def _vertebrae(instance: NDArray[np.integer], seg: NDArray[np.integer], voxel_mm3: float) -> list[_Vertebra]:
    """The instances top first, with what numbering needs to know of them."""
    out = []
    corpus = seg == L.CORPUS
    for k, box in enumerate(ndimage.find_objects(instance), start=1):
        if box is None:
            continue
        mine = instance[box] == k
        body = mine & corpus[box]
        where = np.argwhere(body if body.any() else mine)
        at_border = any(box[a].start == 0 or box[a].stop == instance.shape[a] for a in (0, 1))
        out.append(_Vertebra(k, float(mine.sum()) * voxel_mm3, float(where[:, 1].mean()) + box[1].start, at_border))
    return sorted(out, key=lambda v: v.centre_i)


def _neighbour_median(volumes: Sequence[float], k: int, reach: int) -> float:
    others = [*volumes[max(0, k - reach) : k], *volumes[k + 1 : k + 1 + reach]]
    return float(np.median(others)) if others else float("nan")


def _drop_fragments(vertebrae: list[_Vertebra], min_mm3: float) -> tuple[list[_Vertebra], list[_Vertebra]]:
    """(kept, dropped): pieces under `min_mm3`, and border-free pieces far smaller than their neighbours."""
    kept = [v for v in vertebrae if v.mm3 >= min_mm3]
    volumes = [v.mm3 for v in kept]
    fragments = [v for k, v in enumerate(kept)
                 if not v.at_border and v.mm3 < FRAGMENT_FRACTION * _neighbour_median(volumes, k, 2)]
    kept = [v for v in kept if v not in fragments]
    return kept, [v for v in vertebrae if v not in kept]


def _c2_problem(vertebrae: list[_Vertebra], discs: list[NDArray[np.int64]]) -> str:
    """Why the top vertebra cannot be C2 ('' when it can); `discs`: the IVDs large enough to count."""
    top = vertebrae[0]
    if top.at_border:
        return "the top vertebra touches the image border"
    if any(d[:, 1].mean() < top.centre_i for d in discs):  # C1 and C2 have no disc between them
        return "an IVD lies above the top vertebra"
    below = _neighbour_median([v.mm3 for v in vertebrae[:4]], 0, 3)
    if top.mm3 < ANCHOR_FRACTION * below:
        return f"the top vertebra ({top.mm3:.0f} mm³) is small against the next three (median {below:.0f} mm³)"
    return ""


def _sacrum_problem(vertebrae: list[_Vertebra], sacrum: NDArray[np.bool_], voxel_mm3: float) -> str:
    """Why the sacrum cannot anchor the lumbar levels ('' when it can)."""
    if not sacrum.any():
        return "no sacrum in view"
    lowest = vertebrae[-1]
    mm3 = float(sacrum.sum()) * voxel_mm3
    if mm3 < ANCHOR_FRACTION * lowest.mm3:
        return f"the sacrum ({mm3:.0f} mm³) is small against the lowest vertebra ({lowest.mm3:.0f} mm³)"
    if np.argwhere(sacrum)[:, 1].mean() <= lowest.centre_i:
        return "the sacrum is not below the lowest vertebra"
    return ""


def _choose_numbering(region: str, vertebrae: list[_Vertebra], discs: list[NDArray[np.int64]],
                     sacrum: NDArray[np.bool_], voxel_mm3: float) -> Numbering:
    """The station's anchor: C2 (cervical) or the sacrum (lumbar) when it passes its checks, else a count."""
    if not vertebrae:
        return Numbering("count", "no vertebra")
    if region == "cervical":
        problem = _c2_problem(vertebrae, discs)
        return Numbering("count", f"C2 anchor rejected: {problem}") if problem else Numbering("C2")
    if region == "lumbar":
        problem = _sacrum_problem(vertebrae, sacrum, voxel_mm3)
        return Numbering("count", f"sacrum anchor rejected: {problem}") if problem else Numbering("sacrum")
    return Numbering("count", f"{region} station: no anchor (C2 or sacrum) in view")


def vertebra_levels(n: int, mode: str) -> tuple[list[int], int]:
    """Ids of n vertebrae, top first, and the id before the top one (the disc and endplate above it are 100+/200+ that).

    A count numbers from 2, so that the disc above the top vertebra is 101, never a bare 100.

    >>> vertebra_levels(3, "C2")
    ([2, 3, 4], 1)
    >>> vertebra_levels(3, "sacrum")
    ([22, 23, 24], 21)
    >>> vertebra_levels(3, "count")
    ([2, 3, 4], 1)
    """
    if mode == "count":
        if n > L.SACRUM - 2:
            raise ValueError(f"{n} vertebrae in one station: more than a count can number below the sacrum id")
        return list(range(2, n + 2)), 1
    column = L.level_sequence()[:-1]  # C1 ... L5
    if mode == "C2":
        column = column[column.index(L.VERTEBRA_IDS["C2"]) - 1 :]
        levels = column[1 : n + 1]
    elif mode == "sacrum":
        levels = column[-n:] if n < len(column) else []
    else:
        raise ValueError(f"unknown numbering mode {mode!r}; expected one of {NUMBERING_MODES}")
    if len(levels) != n:
        raise ValueError(f"{n} vertebrae do not fit between {mode} and the end of the column")
    return levels, column[column.index(levels[0]) - 1]


def number_instances(instance: NDArray[np.integer], seg: NDArray[np.integer], region: str, *,
                     voxel_mm3: float, min_voxels: int) -> tuple[NDArray[np.uint16], Numbering]:
    """Final ids: vertebrae by level (or a count), sacrum 26, IVD 100+X and endplate 200+X after the vertebra above.

    Fragments (see `_drop_fragments`) and sacrum pieces under `min_voxels` get no id; restoring counts their voxels.
    """
    vertebrae, _ = _drop_fragments(_vertebrae(instance, seg, voxel_mm3), min_voxels * voxel_mm3)
    discs = _components(seg == L.IVD, 1)
    sacrum = np.zeros(seg.shape, bool)
    for piece in _components(seg == L.SACRUM, min_voxels):
        sacrum[tuple(piece.T)] = True
    numbering = _choose_numbering(region, vertebrae, [d for d in discs if len(d) >= min_voxels], sacrum, voxel_mm3)
    levels, before_top = vertebra_levels(len(vertebrae), numbering.mode)
    lut = np.zeros(int(instance.max()) + 1, np.uint16)  # merged id -> level; fragments -> 0
    for v, level in zip(vertebrae, levels):
        lut[v.id] = level
    out = lut[instance]
    if sacrum.any() and (not vertebrae or np.argwhere(sacrum)[:, 1].mean() > vertebrae[-1].centre_i):
        out[sacrum] = L.SACRUM  # a "sacrum" above the lowest vertebra is not one
    placed = [(v.centre_i, level) for v, level in zip(vertebrae, levels)]
    for components, offset in ((discs, L.IVD_OFFSET), (_components(seg == L.ENDPLATE, 1), L.ENDPLATE_OFFSET)):
        for comp in components:
            above = [level for i, level in placed if i < comp[:, 1].mean()]
            out[tuple(comp.T)] = offset + (above[-1] if above else before_top)
    if unknown := L.unknown_ids(out, L.INSTANCE_MASK_IDS):  # a bug, never the image's fault
        raise AssertionError(f"instance ids outside the SPINEPS scheme: {unknown}")
    return out, numbering


# Semantic labels, and the instance ids that may claim them in turn, with the shift from the
# claiming id to the claimed one. An endplate is one voxel thin: in the coarser instance grid
# it can vanish where a disc remains, so the disc it borders names it (IVD 100+X -> 200+X).
_CLAIMS: Final = (
    (L.VERTEBRA_PARTS, ((L.vertebra_ids, 0),)),
    ((L.SACRUM,), ((lambda ids: ids == L.SACRUM, 0),)),
    ((L.IVD,), ((L.ivd_ids, 0), (L.endplate_ids, L.IVD_OFFSET - L.ENDPLATE_OFFSET))),
    ((L.ENDPLATE,), ((L.endplate_ids, 0), (L.ivd_ids, L.ENDPLATE_OFFSET - L.IVD_OFFSET))),
)


def _steps_to(ids: NDArray[np.integer], vertebra: int | None, beyond: int) -> NDArray[np.int32]:
    """Chessboard steps (26-connected growth) from every voxel to `vertebra`'s voxels; `beyond` where it is absent."""
    if vertebra is None or not (ids == vertebra).any():
        return np.full(ids.shape, beyond, np.int32)
    return ndimage.distance_transform_cdt(ids != vertebra, metric="chessboard")


def split_endplates(semantic: NDArray[np.integer], instance: NDArray[np.integer], *, steps: int = 14) -> None:
    """SPINEPS 2.x's endplate split, in place on `semantic`: each endplate voxel (62) of the pair 200+X (X's
    inferior endplate and the superior one of the vertebra below X) becomes 53 (inferior) where X is the
    nearer vertebra, 52 (superior) where the vertebra below is, each within `steps` voxels (26-connected
    growth, chessboard distance); voxels neither reaches stay 62."""
    vertebrae = sorted(int(v) for v in np.unique(instance) if 0 < v < L.IVD_OFFSET)
    for k, x in enumerate(vertebrae):
        plates = (instance == L.ENDPLATE_OFFSET + x) & (semantic == L.ENDPLATE)
        found = ndimage.find_objects(plates.astype(np.uint8))
        if not found:
            continue
        box = tuple(slice(max(0, b.start - steps), b.stop + steps) for b in found[0])
        mine, ids = plates[box], instance[box]
        above = _steps_to(ids, x, steps + 1)
        below = _steps_to(ids, vertebrae[k + 1] if k + 1 < len(vertebrae) else None, steps + 1)
        region = semantic[box]
        region[mine & (above <= steps) & (above <= below)] = L.ENDPLATE_INFERIOR
        region[mine & (below <= steps) & (below < above)] = L.ENDPLATE_SUPERIOR


def claim_instances(semantic: NDArray[np.integer], instance: NDArray[np.integer], spacing: ArrayLike, *,
                    radius_mm: float) -> tuple[NDArray[np.uint16], int]:
    """Instance ids for exactly the structure voxels of `semantic` (vertebra parts, sacrum, IVD, endplate).

    Both masks arrive on one grid by separate resamplings, so their edges differ by
    a voxel or so. Each structure voxel takes the id of the nearest instance voxel
    of its kind (vertebra, sacrum, IVD, endplate) within `radius_mm`; an IVD or
    endplate voxel with none in reach takes its neighbour's (endplate 200+X, IVD
    100+X). A voxel still unclaimed is removed from `semantic` (in place), so that
    the two masks coincide; returns the ids and the number of voxels removed.
    """
    out = np.zeros(semantic.shape, np.uint16)
    unclaimed = 0
    spacing = np.asarray(spacing, float)
    margin = [int(np.ceil(radius_mm / s)) for s in spacing]
    for labels, sources in _CLAIMS:
        wanted = np.isin(semantic, labels)
        if not wanted.any():
            continue
        both = np.argwhere(wanted | np.logical_or.reduce([claims(instance) for claims, _ in sources]))
        box = tuple(slice(max(0, lo - m), hi + m + 1) for lo, hi, m in zip(both.min(0), both.max(0), margin))
        want, ids = wanted[box], instance[box]
        claimed = np.zeros(want.shape, np.uint16)
        for claims, shift in sources:
            own = claims(ids)
            todo = want & (claimed == 0)
            direct = todo & own
            claimed[direct] = ids[direct].astype(np.int32) + shift
            todo &= ~own
            if todo.any() and own.any():
                distance, nearest = ndimage.distance_transform_edt(~own, sampling=spacing, return_indices=True)
                reach = todo & (distance <= radius_mm)
                claimed[reach] = ids[tuple(axis[reach] for axis in nearest)].astype(np.int32) + shift
        lost = want & (claimed == 0)
        unclaimed += int(lost.sum())
        semantic[box][lost] = 0
        out[box][want] = claimed[want]
    return out, unclaimed


def assemble(seg: NDArray[np.integer], model: InstanceModel, predictor: Predictor, region: str) -> tuple[NDArray[np.uint16], Numbering]:
    """Semantic mask (instance space) -> numbered instance mask and how it was numbered."""
    centres = corpus_centres(seg, min_voxels=model.corpus_min_voxels)
    if len(centres) == 0:
        return np.zeros(seg.shape, np.uint16), Numbering("count", "no vertebral body (label 49) in the semantic mask: empty instance mask")
    predictions = cutout_predictions(seg, centres, model.cutout, predictor)
    merged = merge_predictions(predictions, seg.size).reshape(seg.shape)
    finished = finish_instances(merged, seg, min_voxels=model.vertebra_min_voxels)
    return number_instances(finished, seg, region, voxel_mm3=model.voxel_mm3, min_voxels=model.vertebra_min_voxels)
