"""Cohort QC without references: per-image plausibility, one score per image, named flags, a review page.

Per image (stage label-levels, on the final masks): how many vertebrae the station shows, how many
pairs of neighbouring vertebrae lack the IVD between them, the longest gap of the spinal canal along
the column inside the field of view, and each vertebra's volume. Cohort-wide (summarize): volumes
against the cohort's own distribution per station and level (robust z-scores), the folds' agreement
(`metrics.fold_agreement`, written by average-folds), flags and the score.

The score ranks images for review, higher first: 1 minus the folds' agreement on the vertebral bodies
(AGREEMENT_STRUCTURE), plus FLAG_WEIGHT per SCORED_FLAGS flag. Chosen on a development cohort of
injected failures (phantom seed 7) and validated on another (`ranking_quality`, tests/test_qc_validation.py):
the bodies are what the vertebra scores are mostly made of, and every fold of any model predicts them
(the canal, cord and IVD agreements ranked worse there); missing_ivd is shown but not scored, because the
instance phase can name the disc below a vertebra the top border cuts after the level above (an open bug).
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Final

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import ndimage

from . import labels as L
from . import layout

__all__ = ["FLAGS", "image_measures", "level_volumes", "level_z", "qc_table", "ranking_quality", "review_page"]

# Vertebrae (the sacrum aside) a 300 mm sagittal station shows of an adult column.
STATION_VERTEBRAE: Final = {"cervical": (9, 15), "thoracic": (10, 16), "lumbar": (5, 9)}
CANAL_GAP_MM: Final = 10.0
AGREEMENT_STRUCTURE: Final = "corpus"  # a label of `labels.SEMANTIC_NAMES`, as `metrics.fold_agreement` names it
FOLDS_AGREE: Final = 0.85  # clean images of the development cohort: 0.83-0.96
VOLUME_Z: Final = 3.5
VOLUME_MIN_IMAGES: Final = 8  # a level's volumes need this many images with levels for a z-score
FLAG_WEIGHT: Final = 0.05
SCORED_FLAGS: Final = ("vertebra_count", "canal_gap", "volume_outlier")
FAILING_DSC: Final = 0.8  # `ranking_quality`: an image whose vertebra DSC is under this is a failure
FLAGS: Final = {
    "folds_disagree": f"the folds' agreement on the vertebral bodies (mean pairwise DSC) is under {FOLDS_AGREE}",
    "vertebra_count": "the station shows fewer or more vertebrae than a 300 mm station of an adult column",
    "missing_ivd": "two neighbouring vertebrae have no IVD between them",
    "canal_gap": f"the spinal canal (with the cord) is interrupted for more than {CANAL_GAP_MM:.0f} mm along the column",
    "volume_outlier": f"a vertebra's volume lies over {VOLUME_Z} robust SDs from the cohort's same level and station",
}


def _column_axis(affine: NDArray[np.float64]) -> int:
    """The array axis closest to the world's superior-inferior direction."""
    return int(np.argmax(np.abs(affine[2, :3]) / np.linalg.norm(affine[:3, :3], axis=0)))


def image_measures(instance: NDArray[np.integer], semantic: NDArray[np.integer], affine: NDArray[np.float64]) -> dict[str, float]:
    """vertebrae, missing_ivds and canal_gap_mm of one image's final masks (one grid).

    >>> inst = np.zeros((1, 9, 1), np.uint16); inst[0, :, 0] = [2, 2, 102, 3, 3, 4, 4, 0, 0]
    >>> sem = np.zeros_like(inst); sem[0, [0, 1, 2, 3, 7, 8], 0] = L.CANAL
    >>> axis_1_down = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -2, 0, 0], [0, 0, 0, 1]])  # 2 mm rows, top first
    >>> image_measures(inst, sem, axis_1_down)  # no IVD between 3 and 4; the canal gone for 3 rows
    {'vertebrae': 3.0, 'missing_ivds': 1.0, 'canal_gap_mm': 6.0}
    """
    axis = _column_axis(affine)
    others = tuple(a for a in range(3) if a != axis)
    vertebrae = np.unique(instance[L.vertebra_ids(instance)])
    # In column order: by the mean position along the column axis (one pass over the mask), top first.
    centres = ndimage.center_of_mass(L.vertebra_ids(instance), instance, vertebrae)
    order = [k for _, k in sorted(zip((-np.sign(affine[2, axis]) * c[axis] for c in centres), vertebrae.tolist()))]
    ivds = set(np.unique(instance[L.ivd_ids(instance)]).tolist())
    missing = sum(L.IVD_OFFSET + int(upper) not in ivds for upper in order[:-1])
    canal: NDArray[np.bool_] = np.asarray(np.isin(semantic, (L.CANAL, L.CORD)).any(axis=others))
    rows = np.flatnonzero(canal)
    gap = 0
    if len(rows):
        missing_rows = np.logical_not(canal[rows[0] : rows[-1] + 1]).astype(int)
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, missing_rows, 0])))[::2]
        gap = int(runs.max()) if len(runs) else 0
    step = float(np.linalg.norm(affine[:3, axis]))
    return {"vertebrae": float(len(vertebrae)), "missing_ivds": float(missing), "canal_gap_mm": gap * step}


def level_volumes(instance: NDArray[np.integer], affine: NDArray[np.float64]) -> dict[int, float]:
    """Volume (mm³) of each vertebra id, counted as the morphometrics count the bodies (`morphometrics.volumes`)."""
    from .morphometrics import volumes

    return volumes(instance, affine, L.vertebra_ids(instance))


def level_z(volumes: pd.DataFrame) -> pd.Series:
    """Each volume's robust z-score within its station and level: (mm3 - median) / (1.4826 MAD); NaN where
    the level has fewer than VOLUME_MIN_IMAGES volumes or its MAD is 0.

    >>> v = pd.DataFrame({"region": "lumbar", "level": "L3", "mm3": [10.0, 11.0, 9.0, 10.0, 10.0, 11.0, 9.0, 30.0]})
    >>> level_z(v).round(2).tolist()
    [0.0, 0.67, -0.67, 0.0, 0.0, 0.67, -0.67, 13.49]
    """
    # Per group with numpy (a radix argsort of small integer codes, then np.median of each slice): pandas'
    # groupby medians on the two string keys cost 0.1 s at 90,000 images (benchmarks/bench_qc_summary.py).
    region = pd.factorize(volumes.region)[0]
    level, levels = pd.factorize(volumes.level)
    group = region * len(levels) + level
    if len(group) and group.max() <= np.iinfo(np.int16).max:
        group = group.astype(np.int16)  # numpy sorts 16-bit integers by radix; wider codes keep their width
    order = np.argsort(group, kind="stable")
    mm3 = volumes.mm3.to_numpy(float)[order]
    ends = np.cumsum(np.bincount(group))
    z_sorted = np.full(len(mm3), np.nan)
    for start, end in zip(np.r_[0, ends[:-1]].tolist(), ends.tolist()):
        v = mm3[start:end]
        if len(v) < VOLUME_MIN_IMAGES:
            continue
        median = np.median(v)
        mad = 1.4826 * np.median(np.abs(v - median))
        if mad > 0:
            z_sorted[start:end] = (v - median) / mad
    z = np.empty_like(z_sorted)
    z[order] = z_sorted
    return pd.Series(z, index=volumes.index)


def qc_table(images: pd.DataFrame, agreement: pd.DataFrame, volumes: pd.DataFrame) -> pd.DataFrame:
    """One row per image: measures, flags (comma-separated names of FLAGS) and score, worst first.

    `images`: image_id, region, numbering and the `image_measures` columns; `agreement`: image_id,
    structure, dsc (fold agreement per label); `volumes`: image_id, region, level, mm3 (images with levels).
    """
    table = images.copy()
    # Lookups by reindexing, not Series.map: map on pyarrow strings converts value by value (0.2 s at 90,000 images).
    bodies = agreement[agreement.structure == AGREEMENT_STRUCTURE].groupby("image_id")["dsc"].mean()
    table["fold_agreement"] = bodies.reindex(table.image_id).to_numpy()
    table["volume_z_max"] = level_z(volumes).abs().groupby(volumes.image_id).max().reindex(table.image_id).to_numpy()
    ends = pd.DataFrame(STATION_VERTEBRAE, index=["low", "high"]).T.reindex(table.region)
    low, high = (pd.Series(ends[k].to_numpy(), index=table.index) for k in ("low", "high"))
    flags = {
        "folds_disagree": table.fold_agreement < FOLDS_AGREE,
        "vertebra_count": (table.vertebrae < low) | (table.vertebrae > high),
        "missing_ivd": table.missing_ivds > 0,
        "canal_gap": table.canal_gap_mm > CANAL_GAP_MM,
        "volume_outlier": table.volume_z_max > VOLUME_Z,
    }
    # Each image's flags as a bit pattern, named once per pattern (a row-wise join takes 13 s for 90,000 images).
    pattern = sum((flags[name].to_numpy(dtype=int) << bit for bit, name in enumerate(FLAGS)), np.zeros(len(table), int))
    patterns, which = np.unique(pattern, return_inverse=True)
    names = np.array([",".join(name for bit, name in enumerate(FLAGS) if p >> bit & 1) for p in patterns.tolist()], dtype=object)
    table["flags"] = names[which].astype(str)
    plausibility = sum(flags[name].astype(int) for name in SCORED_FLAGS)
    table["score"] = (1 - table.fold_agreement.fillna(1.0)) + FLAG_WEIGHT * plausibility
    return table.sort_values(["score", "image_id"], ascending=[False, True], kind="stable").reset_index(drop=True)


def ranking_quality(score: pd.Series, dsc: pd.Series, failing: float = FAILING_DSC) -> dict[str, float]:
    """How well `score` (higher = worse) ranks images by their true vertebra `dsc` (both by image id).

    auc: the chance that an image with DSC under `failing` scores above one without (ties count half);
    spearman: the rank correlation of score and DSC (negative is right).

    >>> dsc = pd.Series({"a": 0.95, "b": 0.9, "c": 0.6, "d": 0.3})
    >>> ranking_quality(pd.Series({"a": 0.1, "b": 0.3, "c": 0.2, "d": 0.9}), dsc)
    {'images': 4, 'failing': 2, 'auc': 0.75, 'spearman': -0.8}
    """
    from scipy import stats

    from .review import auc

    score, dsc = score.align(dsc, join="inner")
    bad = dsc < failing
    return {"images": int(len(dsc)), "failing": int(bad.sum()), "auc": round(auc(score, bad), 4),
            "spearman": round(float(stats.spearmanr(score, dsc).statistic), 4)}


def review_page(table: pd.DataFrame, snapshots: Mapping[str, str], n: int, notice: str = "",
                decisions: pd.DataFrame | None = None, key: str = "", check: str = "") -> str:
    """The review page (`review_page.html`): every image of the QC `table` worst first, `n` per page, each with its
    score, fold agreement, flags explained and snapshot (relative link), and decision buttons and keys; decisions
    already made (`decisions`) are shown, new ones kept in the browser under `key` and exported as a TSV
    (`review.read_decisions` reads it). A `notice` (e.g. that the cohort mixes software stacks) heads it, then the
    `check` of the score against the decisions (HTML)."""
    import json
    from importlib.resources import files

    def as_json(value: object) -> str:
        return json.dumps(value).replace("</", "<\\/")  # nothing in the data can close its <script> element

    rows = [{"id": r.image_id, "region": r.region, "numbering": r.numbering, "score": float(r.score),
             "fold_agreement": None if pd.isna(r.fold_agreement) else float(r.fold_agreement),
             "flags": [f for f in r.flags.split(",") if f], "snapshot": snapshots.get(r.image_id, "")}
            for r in table.itertuples()]  # fmt: skip
    decided = {} if decisions is None else {r.image_id: {"decision": r.decision, "note": r.note} for r in decisions.itertuples()}
    fill = {"__TOTAL__": str(len(table)), "__FLAG_WEIGHT__": str(FLAG_WEIGHT), "__SCORED_FLAGS__": ", ".join(SCORED_FLAGS),
            "__NOTICE__": f"<p class='warning'><b>Warning</b>: {html.escape(notice)} ({layout.STACKS}).</p>" if notice else "",
            "__CHECK__": check, "__PAGE_SIZE__": str(int(n)), "__KEY__": as_json(key), "__ROWS__": as_json(rows), "__DECIDED__": as_json(decided),
            "__FLAGS__": as_json(FLAGS)}  # fmt: skip
    template = files("spinecohort").joinpath("review_page.html").read_text()
    return re.sub(r"__[A-Z_]+__", lambda m: fill.get(m.group(0), m.group(0)), template)  # one pass: data is not rescanned


def page_rows(page: str) -> list[dict[str, object]]:
    """The image rows a review page holds (`review_page`'s `rows` element), worst first."""
    import json

    found = re.search(r'<script id="rows" type="application/json">(.*?)</script>', page, re.S)
    if found is None:
        raise ValueError("not a spinecohort review page: no rows element")
    return json.loads(found.group(1))
