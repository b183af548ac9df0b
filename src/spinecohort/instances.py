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
4. `finish_instances` and `number_instances`: clean-up, levels where an anchor
   is visible (a cervical station's top vertebra C2; S1 in a lumbar station),
   IVD 100+X and endplate 200+X after the nearest vertebra above.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from . import labels as L

__all__ = [
    "InstanceModel",
    "Predictor",
    "assemble",
    "corpus_centres",
    "cutout_predictions",
    "finish_instances",
    "merge_predictions",
    "network_input",
    "number_instances",
    "read_instance_model",
]

# A predictor maps a batch of one-hot cutouts (N, 10, *size) and their window
# origins (N, 3) in instance space to class maps (N, *size) with values 0..3.
Predictor = Callable[[NDArray[np.float32], NDArray[np.int64]], NDArray[np.uint8]]
_VERTEBRA = np.array(L.VERTEBRA_PARTS)
_CUBE = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class InstanceModel:
    """What the instance phase needs from a SPINEPS instance model folder's ``inference_config.json``."""

    path: Path
    orientation: tuple[str, str, str]
    spacing: tuple[float, float, float]
    cutout: tuple[int, int, int]
    corpus_min_voxels: int = 100
    vertebra_min_voxels: int = 250

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
        return InstanceModel(
            path=folder,
            orientation=tuple(cfg.get("model_expected_orientation", ("P", "I", "R"))),
            spacing=tuple(float(s) for s in spacing),
            cutout=tuple(int(c) for c in cfg.get("cutout_size", (248, 304, 64))),
            corpus_min_voxels=int(cfg.get("corpus_size_cleaning", 100)),
            vertebra_min_voxels=int(cfg.get("vert_size_threshold", 250)),
        )
    except (OSError, KeyError, ValueError, TypeError) as exc:
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
    """Cut a merged body in two: erode until it breaks, then cut by the plane half-way between the parts."""
    mask = np.zeros(shape, bool)
    mask[tuple(voxels.T)] = True
    parts: list[NDArray[np.int64]] = []
    eroded = mask
    for _ in range(10):
        eroded = ndimage.binary_erosion(eroded)
        parts = sorted(_components(eroded, 1), key=len, reverse=True)
        if len(parts) >= 2 or not eroded.any():
            break
    if len(parts) >= 2:
        a, b = parts[0].mean(axis=0), parts[1].mean(axis=0)
    else:  # never broke apart: halve it along the column
        centre = voxels.mean(axis=0)
        a, b = centre - [0, 1, 0], centre + [0, 1, 0]
    side = (voxels - (a + b) / 2) @ (b - a) > 0
    return [voxels[~side], voxels[side]]


def corpus_centres(seg: NDArray[np.integer], *, min_voxels: int = 100, erode: int = 1, merged_factor: float = 1.5) -> NDArray[np.float64]:
    """Vertebral-body centres (voxel coordinates), top first.

    A body larger than `merged_factor` x the mean of its up to 5 neighbours on
    each side (at least 3 neighbours) is taken to be two merged bodies and split.
    """
    corpus = ndimage.binary_erosion(seg == L.CORPUS, structure=ndimage.generate_binary_structure(3, 2), iterations=erode)
    bodies = sorted(_components(corpus, min_voxels), key=lambda v: v[:, 1].mean())
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


def _centroid_i(mask: NDArray[np.bool_]) -> float:
    return float(np.argwhere(mask)[:, 1].mean())


def vertebra_levels(n: int, region: str, *, top_is_c2: bool, has_sacrum: bool) -> tuple[list[int], str]:
    """Instance ids for n vertebrae, top first, and a note when no anchor fixes the levels."""
    if region == "lumbar" and has_sacrum:
        above_s1 = L.level_sequence()[:-1]  # C1 ... L5
        if n <= len(above_s1):
            return above_s1[-n:], ""
    if region == "cervical" and top_is_c2:
        seq = L.level_sequence(first="C2")
        if n < len(seq):
            return seq[:n], ""
    return list(range(1, n + 1)), "no anchor (C2 at the top, or the sacrum) visible: vertebra ids are a top-down count, not levels"


def number_instances(instance: NDArray[np.integer], seg: NDArray[np.integer], region: str) -> tuple[NDArray[np.uint16], str]:
    """Final ids: vertebrae by level (or a count), sacrum 26, IVD 100+X and endplate 200+X after the vertebra above."""
    ids = [int(k) for k in np.unique(instance) if k]
    centre_i = {k: c[1] for k, c in zip(ids, ndimage.center_of_mass(instance > 0, instance, ids))}
    order = sorted(ids, key=centre_i.__getitem__)
    discs = _components(seg == L.IVD, 1)
    # C1/C2 have no disc: nothing above C2.
    top_is_c2 = bool(order) and not any(c[:, 1].mean() < centre_i[order[0]] for c in discs)
    sacrum = seg == L.SACRUM
    levels, note = vertebra_levels(len(order), region, top_is_c2=top_is_c2, has_sacrum=bool(sacrum.any()))
    out = np.zeros(instance.shape, np.uint16)
    corpus = seg == L.CORPUS
    vertebrae = []  # (I position of the body, level)
    for k, level in zip(order, levels):
        mine = instance == k
        out[mine] = level
        body = mine & corpus
        vertebrae.append((_centroid_i(body if body.any() else mine), level))
    vertebrae.sort()
    out[sacrum] = L.SACRUM
    for components, offset in ((discs, L.IVD_OFFSET), (_components(seg == L.ENDPLATE, 1), L.ENDPLATE_OFFSET)):
        for comp in components:
            above = [level for i, level in vertebrae if i < comp[:, 1].mean()]
            x = above[-1] if above else (min(level for _, level in vertebrae) - 1 if vertebrae else 0)
            out[tuple(comp.T)] = offset + x
    return out, note


def assemble(seg: NDArray[np.integer], model: InstanceModel, predictor: Predictor, region: str) -> tuple[NDArray[np.uint16], str]:
    """Semantic mask (instance space) -> numbered instance mask and a note for the ledger ('' when all is well)."""
    centres = corpus_centres(seg, min_voxels=model.corpus_min_voxels)
    if len(centres) == 0:
        return np.zeros(seg.shape, np.uint16), "no vertebral body (label 49) in the semantic mask: empty instance mask"
    predictions = cutout_predictions(seg, centres, model.cutout, predictor)
    merged = merge_predictions(predictions, seg.size).reshape(seg.shape)
    finished = finish_instances(merged, seg, min_voxels=model.vertebra_min_voxels)
    return number_instances(finished, seg, region)
