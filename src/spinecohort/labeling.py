"""The label-vertebrae stage: a SPINEPS labelling model names every vertebra of a station (SPINEPS 2.x's third phase).

Per image, on its input grid, as SPINEPS 2.1.3 prepares it (facts in docs/levels.md; our own code):

1. the raw image (not N4-corrected, in its stored number type) and the restored masks, cropped to the semantic
   mask plus 1.5 mm; the vertebra ids kept on corpus voxels only;
2. reoriented to the model's orientation (P, I, R), cropped to the corpora plus 128 mm, resampled to the model's
   resolution (cubic spline for the image, nearest for the mask; voxel 0 stays where it is);
3. per vertebra, top first, a cutout of the model's `final_size` centred on its corpus's bounding-box centre
   (zeros outside the image), z-scored over its non-zero voxels;
4. the heads' posteriors (`labeling_net`), SPINEPS's scores and the exact path search (`label_search`).

The stage writes `layout.LABELING_TABLE`: per vertebra (its restore id) the model's level and every head's
posteriors; the ledger carries the station's levels. `label_levels` decides what the published masks say
(`numbering_precedence`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from . import io, layout
from .labels import CORPUS, VERTEBRA_NAMES, vertebra_ids

log = logging.getLogger("spinecohort")

POSTCROP_MM: Final = 1.5  # SPINEPS crops the image to its semantic mask plus this before labelling
CROP_MM: Final = 128.0  # and then to the corpora plus this, in voxels of the finest spacing
RESAMPLE_TOLERANCE: Final = 1e-3  # mm: closer to the model's resolution than this on every axis is not resampled
ENLARGE: Final = 32  # SPINEPS cuts 64 voxels more in P and I and trims 32 per side (room for a rotation it skips)
# Class names of each head, for the table's columns (<HEAD>_<class>).
HEAD_CLASSES: Final = {
    "REGION": ("cervical", "thoracic", "lumbar"),
    "VERTREL": ("none", "last_C", "first_T", "last_T", "first_L", "last_L"),
    "VERTGRP": ("C1-2", "C3-5", "C6-7", "T1-2", "T3-4", "T5-7", "T8-9", "T10-11", "T12", "L1-2", "L3-4", "L5"),
    "VERTT13": ("no", "T13"),
    "FULLYVISIBLE": ("cut", "whole"),
}


def _crop_box(mask: NDArray[np.bool_], margin: int) -> tuple[slice, ...]:
    """The bounding box of `mask` plus `margin` voxels on every side, clipped to the array."""
    where = np.argwhere(mask)
    lo, hi = where.min(axis=0), where.max(axis=0)
    return tuple(slice(max(int(a) - margin, 0), min(int(b) + margin + 1, n)) for a, b, n in zip(lo, hi, mask.shape))


def _cropped_affine(affine: NDArray[np.float64], box: tuple[slice, ...]) -> NDArray[np.float64]:
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ [s.start for s in box] + affine[:3, 3]
    return out


def _zoom(affine: NDArray[np.float64]) -> NDArray[np.float64]:
    """Voxel sizes as SPINEPS reads them back from a header: float32, rounded to 7 decimals."""
    return np.round(np.linalg.norm(affine[:3, :3], axis=0).astype(np.float32).astype(np.float64), 7)


def target_spacing(resolution_range: list, zoom: NDArray[np.float64]) -> NDArray[np.float64]:
    """The model's resolution for an image: a fixed triple, or each axis clamped into a [min, max] pair."""
    if len(resolution_range) != 2:
        return np.asarray(resolution_range, dtype=np.float64)
    low, high = (np.asarray(r, dtype=np.float64) for r in resolution_range)
    return np.maximum(np.minimum(zoom, high), low)


def _rescaled(data: NDArray, affine: NDArray[np.float64], target: NDArray[np.float64], order: int) -> NDArray:
    """`data` on the grid of spacing `target` that keeps voxel 0 in place (scipy's spline; the number type kept)."""
    from scipy.ndimage import affine_transform

    zoom = _zoom(affine)
    if np.isclose(target, zoom, atol=RESAMPLE_TOLERANCE).all():
        return data
    shape = tuple(int(v) for v in np.rint(np.asarray(data.shape) * zoom / target))
    exact = np.linalg.norm(affine[:3, :3], axis=0)
    return affine_transform(data, np.diag(target / exact), 0.0, output_shape=shape, order=order, mode="nearest")


def _cutout(image: NDArray, centre: NDArray[np.int64], size: tuple[int, int, int]) -> NDArray[np.float32]:
    """The window around `centre`, zeros outside the image, z-scored over its non-zero voxels."""
    import torch

    half = [(size[0] + 2 * ENLARGE) // 2 - ENLARGE, (size[1] + 2 * ENLARGE) // 2 - ENLARGE, size[2] // 2]
    out = np.zeros([2 * h for h in half], dtype=image.dtype)
    src, dst = [], []
    for c, h, n in zip(centre, half, image.shape):
        lo, hi = int(c) - h, int(c) + h
        src.append(slice(max(lo, 0), min(hi, n)))
        dst.append(slice(max(lo, 0) - lo, min(hi, n) - lo))
    out[tuple(dst)] = image[tuple(src)]
    x = torch.from_numpy(out.astype(np.float32))
    inside = x != 0
    if inside.any():  # SPINEPS's reductions (float32, torch, population std), so the inputs match it bit for bit
        values = x[inside]
        mean, std = values.mean().item(), values.std(unbiased=False).item()
        x[inside] = (values - mean) / (std if std != 0 else 1.0)
    return x.numpy()


@dataclass(frozen=True)
class Cutouts:
    """The network's inputs for a station: one cutout per vertebra, top first, and the vertebrae's restore ids."""

    ids: list[int]
    arrays: NDArray[np.float32]  # (vertebrae, *final_size)


def station_cutouts(image: NDArray, affine: NDArray[np.float64], instance: NDArray[np.integer], semantic: NDArray[np.integer],
                    *, orientation: str, resolution_range: list, size: tuple[int, int, int]) -> Cutouts:
    """SPINEPS's labelling inputs for a station (module doc, steps 1-3); `image` in its stored number type."""
    from scipy import ndimage

    from .geometry import reorient  # here: it imports SimpleITK, which a CLI start need not pay for

    box = _crop_box(semantic > 0, int(POSTCROP_MM / _zoom(affine).min()))
    affine = _cropped_affine(affine, box)
    corpus = np.where((semantic[box] == CORPUS) & vertebra_ids(instance[box]), instance[box], 0)
    img, pir = reorient(image[box], affine, orientation)
    seg, _ = reorient(corpus, affine, orientation)
    if not seg.any():
        return Cutouts([], np.zeros((0, *size), dtype=np.float32))
    zoom = _zoom(pir)
    crop = _crop_box(seg > 0, int(CROP_MM / zoom.min()))
    pir = _cropped_affine(pir, crop)
    target = target_spacing(resolution_range, zoom)
    img, seg = _rescaled(img[crop], pir, target, 3), _rescaled(seg[crop], pir, target, 0)
    boxes = ndimage.find_objects(seg)  # every vertebra's corpus box in one pass; box k-1 is id k's (None: absent)
    ids = [k for k, box in enumerate(boxes, start=1) if box is not None]
    centres = [np.array([b.start + (b.stop - b.start) // 2 for b in boxes[k - 1]]) for k in ids]
    return Cutouts(ids, np.stack([_cutout(img, c, size) for c in centres]))


def stored_type(path: str | Path, image: NDArray[np.float32]) -> NDArray:
    """The image in the number type its file stores, as SPINEPS reads it (scaled integers truncated)."""
    dtype = nib.load(str(path)).get_data_dtype()  # type: ignore[attr-defined]
    return image.astype(dtype) if dtype.kind in "iu" else image


@dataclass(frozen=True)
class StationLabels:
    """The model's answer for a station: per vertebra (restore id, top first) its id and posteriors."""

    ids: list[int]
    levels: list[int]
    posteriors: dict[str, NDArray[np.float32]]  # head -> (vertebrae, classes)
    cost: float


def label_station(cutouts: Cutouts, model, *, enforce_12_thoracic: bool = False) -> StationLabels:
    """Heads, scores and the exact search for one station's cutouts (`model`: a `labeling_net.LabelingModel`)."""
    import torch

    from .label_search import Moves, ids_from_path, scores, search

    heads = {k: v.numpy() for k, v in model.posteriors(torch.from_numpy(cutouts.arrays)).items()}
    s = scores(heads)
    path, cost = search(s, Moves(s.axis, enforce_12_thoracic=enforce_12_thoracic))
    return StationLabels(cutouts.ids, ids_from_path(path, s.axis), heads, cost)


def labeling_rows(image_id: str, result: StationLabels) -> pd.DataFrame:
    """The table's rows of a station: image_id, vertebra (restore id), level_id, level, then <HEAD>_<class>."""
    from .label_search import class_names

    table = pd.DataFrame({"image_id": image_id, "vertebra": result.ids, "level_id": result.levels,
                          "level": [VERTEBRA_NAMES[i] for i in result.levels]})  # fmt: skip
    for head, values in result.posteriors.items():
        names = {"VERT": class_names(24), "VERTEX": class_names(26)}.get(head) or HEAD_CLASSES.get(head) or range(values.shape[1])
        for k, name in enumerate(names):
            table[f"{head}_{name}"] = np.round(values[:, k].astype(np.float64), 6)
    return table


def read_labeling_tables(folders: Sequence[Path]) -> pd.DataFrame:
    """The stage folders' tables (`layout.LABELING_TABLE`) as one."""
    tables = [pd.read_csv(path, sep="\t", dtype={"image_id": str}) for folder in folders
              if (path := folder / layout.LABELING_TABLE).exists() and path.stat().st_size]  # fmt: skip
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["image_id", "vertebra", "level_id", "level"])


def model_ids(table: pd.DataFrame) -> dict[str, dict[int, int]]:
    """image_id -> {restore id: the model's id}."""
    return {str(i): dict(zip(rows.vertebra.astype(int), rows.level_id.astype(int))) for i, rows in table.groupby("image_id", sort=False)}


Posteriors = dict[int, dict[str, NDArray[np.float64]]]  # restore id -> head -> its posteriors


def model_posteriors(table: pd.DataFrame) -> dict[str, Posteriors]:
    """image_id -> {restore id: {head: posteriors}}, from the table's <HEAD>_<class> columns (in class order)."""
    heads: dict[str, list[str]] = {}
    for column in table.columns[4:]:
        heads.setdefault(column.split("_", 1)[0], []).append(column)
    return {str(i): {int(v): {h: row[c].to_numpy(np.float64) for h, c in heads.items()} for v, row in rows.set_index("vertebra").iterrows()}
            for i, rows in table.groupby("image_id", sort=False)}  # fmt: skip


def label_vertebrae(*, manifest: Path, batch: str, out: Path, threads: int, restore: Path, model: Path, device: str,
                    enforce_12_thoracic: bool = False) -> None:
    """The stage's driver: every restored image of the batch labelled by the model (module doc)."""
    import torch

    from .labeling_net import load_labeling_model
    from .pipeline import batch_rows, run_stage
    from .runtime import tune_for
    from .semantic import pick_device

    torch.set_num_threads(threads)
    loaded = load_labeling_model(model, device=pick_device(device))
    tune_for(loaded.device)
    log.info("labelling model %s on device %s", model, loaded.device)
    tables: list[pd.DataFrame] = []

    def work(row: pd.Series) -> dict[str, str]:
        instance, affine = io.load_mask(restore / layout.derivative_name(row.image_id, "vert"))
        semantic = io.load_mask(restore / layout.derivative_name(row.image_id, "spine"))[0]
        image = stored_type(row.image, io.load_image(row.image)[0])
        cutouts = station_cutouts(image, affine, instance, semantic, orientation=loaded.orientation,
                                  resolution_range=loaded.config["resolution_range"], size=loaded.final_size)
        missing = sorted(set(np.unique(instance[vertebra_ids(instance)]).tolist()) - set(cutouts.ids))
        if not cutouts.ids:
            return {"message": "no vertebra with a corpus to label", "levels": ""}
        result = label_station(cutouts, loaded, enforce_12_thoracic=enforce_12_thoracic)
        tables.append(labeling_rows(row.image_id, result))
        names = [VERTEBRA_NAMES[i] for i in result.levels]
        note = f"vertebrae {missing} have no corpus voxels: the model names the others only" if missing else ""
        return {"message": note, "levels": " ".join(names), "path_cost": f"{result.cost:.4f}"}

    run_stage(layout.ledger_stage("label-vertebrae"), batch_rows(manifest, batch), out, work, upstream=[restore])
    io.write_tsv(out / layout.LABELING_TABLE, pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["image_id", "vertebra", "level_id", "level"]))


# Numbering precedence, in one place. A station's published ids come from, first to last:
#   1. the labelling model: by default one search over the subject's linked stations, C2 and the sacrum as
#      constraints (`joint_labeling.apply_joint`; a station whose column lacks both anchors and whose margin is small
#      is counted instead); with per_station, each station's own answer (SPINEPS 2.x's, `apply_model`), which must
#      name every vertebra of the station, else the station keeps what 2-4 give;
#   2. the subject's links: a station linked to an anchored one takes that anchor's levels (`subject_levels`);
#   3. the station's own anchor: its C2 (cervical) or sacrum (lumbar);
#   4. a count from the top (ids are positions, not levels).
# Where the model's ids differ from what 2-3 give, the model's stand and the ledger's message says so with both.
def apply_model(result, stations, named: dict[str, dict[int, int]]) -> None:
    """Put the labelling model's ids into `result` (`subject_levels.SubjectLevels`) for `stations` it named fully.

    A disagreement with the links or anchors is recorded as the station's reason; the subject's whole-spine
    stitching (which joins stations by their links) is then dropped, with a note, rather than built from ids that
    the links contradict."""
    for s in stations:
        model = named.get(s.image_id)
        if model is None:
            continue
        if set(model) != set(s.ids):
            result.reasons[s.image_id] = (f"the labelling model named {len(set(model) & set(s.ids))} of its {len(s.ids)} vertebrae: "
                                          f"{result.modes[s.image_id]} numbering kept")
            continue
        before = result.levels[s.image_id]
        after = [model[k] for k in s.ids]
        mode = result.modes[s.image_id]
        if mode != "count" and before != after:
            result.reasons[s.image_id] = (f"labelling model {level_span(after)} and {mode} numbering {level_span(before)} differ: "
                                          "the model's ids stand")
            if s.image_id in result.whole_spine:
                result.whole_spine = {}
                result.note = "; ".join(filter(None, [result.note, "not stitched: a labelling model's ids contradict the links"]))
        else:
            result.reasons[s.image_id] = ""
        result.maps[s.image_id] = {s.before_top: level_above(after[0]), **model}
        result.modes[s.image_id] = "model"
        result.levels[s.image_id] = after


def level_above(top: int) -> int:
    """The level above a vertebra (T12 above T13 and above L1): its top IVD and endplate carry it."""
    from .labels import VERTEBRA_IDS, level_sequence

    column = level_sequence(first="C1", thoracic=13, lumbar=6)
    return VERTEBRA_IDS["T12"] if top in (VERTEBRA_IDS["T13"], VERTEBRA_IDS["L1"]) else column[max(column.index(top) - 1, 0)]


def level_span(ids: list[int]) -> str:
    """`T11-L5`: a station's levels, first to last."""
    return f"{VERTEBRA_NAMES[ids[0]]}-{VERTEBRA_NAMES[ids[-1]]}" if ids else "none"
