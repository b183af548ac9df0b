"""Levels against the phantoms' truth (issue 39): each station alone with a labelling model (our search, with the
station's own anchor; and SPINEPS's per-station answer), one search per subject over its linked stations
(`joint_labeling`), and the links without a model.

A phantom cohort with ribs and transitional vertebrae (anomaly mixed: by subject none, T13, none, L6, 11 thoracic),
each station moved by its own rigid motion, is written; every station's reference masks are numbered as the
instance phase numbers a station alone (from C2, a count, from the sacrum) and stand for its restored masks, so the
labelling is measured apart from the segmentation. Prints a Markdown table; the last line is JSON.

    python scripts/labeling_evaluation.py resources/demo_models/labeling --subjects 40
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from spinecohort import cohort, io
from spinecohort import labels as L
from spinecohort import subject_levels as SL
from spinecohort.instances import vertebra_levels
from spinecohort.joint_labeling import apply_joint, label_column
from spinecohort.labeling import label_station, station_cutouts, stored_type
from spinecohort.labeling_net import load_labeling_model
from spinecohort.phantom import TRUTH_FILE, write_cohort

OWN = {"cervical": "C2", "thoracic": "count", "lumbar": "sacrum"}  # how the instance phase numbers each station alone
# Each station alone with the model (our search: its own anchor, an open top), SPINEPS's own per-station answer,
# one search per subject, the links without a model.
WAYS = ("alone, model", "alone, SPINEPS's search", "joint", "links, no model")
MIN_BODY = 10  # corpus voxels: smaller vertebrae are not kept (as the instance phase drops fragments)


def numbered_alone(instance: np.ndarray, semantic: np.ndarray, affine: np.ndarray, mode: str) -> tuple[np.ndarray, dict[int, int]]:
    """The reference numbered as its station alone would be, and its ids' true levels."""
    kept = [int(k) for k in np.unique(instance[L.vertebra_ids(instance)]) if ((instance == k) & (semantic == L.CORPUS)).sum() >= MIN_BODY]
    kept.sort(key=lambda k: -(affine[2, :3] @ np.argwhere(instance == k).mean(axis=0)))  # top first: world S (RAS+) falls
    ids, _ = vertebra_levels(len(kept), mode)
    lut = np.zeros(L.ENDPLATE_OFFSET + L.IVD_OFFSET, np.uint16)
    lut[L.SACRUM] = L.SACRUM
    for true, new in zip(kept, ids):
        lut[true], lut[L.IVD_OFFSET + true], lut[L.ENDPLATE_OFFSET + true] = new, L.IVD_OFFSET + new, L.ENDPLATE_OFFSET + new
    return lut[instance], dict(zip(ids, kept))


def evaluate(model_folder: Path, work: Path, *, subjects: int, seed: int, first_index: int, motion_mm: float, motion_deg: float) -> pd.DataFrame:
    """Per subject, station and way: vertebrae, named right, claimed wrong; with the subject's column facts."""
    manifest = write_cohort(work, subjects=subjects, seed=seed, first_index=first_index, anomaly="mixed", ribs=True,
                            rudimentary_t12=0.1, lumbar_ribs=0.1, motion_mm=motion_mm, motion_deg=motion_deg)  # fmt: skip
    truth_table = pd.read_csv(work / TRUTH_FILE, sep="\t", dtype=str, keep_default_na=False).set_index("subject")
    table = cohort.resolve_paths(cohort.read_manifest(manifest), manifest.parent)
    model = load_labeling_model(model_folder)
    rows = []
    for subject, group in table.groupby("subject", sort=True):
        stations, truth, alone, posteriors = [], {}, {}, {}
        for r in group.itertuples():
            reference, affine = io.load_mask(r.reference_instance)
            semantic = io.load_mask(r.reference_semantic)[0]
            mask, truth[r.image_id] = numbered_alone(reference, semantic, affine, OWN[r.region])
            station = SL.station_vertebrae(mask, semantic, affine, image_id=r.image_id, region=r.region, mode=OWN[r.region])
            stations.append(station)
            cutouts = station_cutouts(stored_type(r.image, io.load_image(r.image)[0]), affine, mask, semantic, orientation=model.orientation,
                                      resolution_range=model.config["resolution_range"], size=model.final_size)  # fmt: skip
            named = label_station(cutouts, model)
            alone[r.image_id] = dict(zip(named.ids, named.levels))
            posteriors[r.image_id] = {k: {h: v[j].astype(np.float64) for h, v in named.posteriors.items()} for j, k in enumerate(named.ids)}
        links = SL.label_subject(stations)
        joint = SL.label_subject(stations)
        apply_joint(joint, stations, posteriors)
        chained = len(stations) == 3 and all(v.offset is not None for v in links.links.values())
        for s in stations:
            own = label_column([s], {s.image_id: 0}, posteriors)
            answers = {"alone, model": own.ids[s.image_id] if own else [], "alone, SPINEPS's search": [alone[s.image_id].get(k) for k in s.ids],
                       "joint": joint.levels[s.image_id], "links, no model": links.levels[s.image_id]}  # fmt: skip
            counted = {"alone, model": own is None or own.undecided(s.image_id), "alone, SPINEPS's search": False, "joint": joint.modes[s.image_id] == "count",
                       "links, no model": links.modes[s.image_id] == "count"}  # fmt: skip
            for way, ids in answers.items():
                true = [truth[s.image_id][k] for k in s.ids]
                claimed = [] if counted[way] else ids
                rows.append({"subject": subject, "region": s.region, "way": way, "transitional": truth_table.loc[subject, "transitional"],
                             "chained": chained, "vertebrae": len(true), "right": sum(a == b for a, b in zip(claimed, true)),
                             "wrong": sum(a != b for a, b in zip(claimed, true)),
                             "transitional_named": any(k in (L.VERTEBRA_IDS["T13"], L.VERTEBRA_IDS["L6"]) for k in claimed),
                             "margin": {"joint": joint.margins.get(s.image_id, np.nan), "alone, model": own.margins[s.image_id] if own else np.nan}.get(way, np.nan)})  # fmt: skip
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per way: identification rate per station type, wrong claims, transitional subjects named right, false claims."""
    out = []
    for way in WAYS:
        mine = rows[rows.way == way]
        by_subject = mine.groupby("subject").agg(transitional=("transitional", "first"), chained=("chained", "first"),
                                                 right=("right", "sum"), vertebrae=("vertebrae", "sum"), wrong=("wrong", "sum"),
                                                 named=("transitional_named", "any"))  # fmt: skip
        anomalous = by_subject[(by_subject.transitional != "") & by_subject.chained]
        normal = by_subject[by_subject.transitional == ""]
        rate = {r: mine[mine.region == r].right.sum() / mine[mine.region == r].vertebrae.sum() for r in L.REGIONS}
        out.append({"way": way, **{f"{r} identification": round(v, 3) for r, v in rate.items()},
                    "claims contradicted": int(mine.wrong.sum()),
                    "transitional named right (complete chain)": f"{int((anomalous.right == anomalous.vertebrae).sum())}/{len(anomalous)}",
                    "normal subjects given T13/L6": f"{int(normal.named.sum())}/{len(normal)}"})  # fmt: skip
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a SPINEPS labelling model folder")
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--seed", type=int, default=401)
    parser.add_argument("--first-index", type=int, default=401, help="subject numbers apart from the training cohort's")
    parser.add_argument("--motion-mm", type=float, default=5.0, help="per-station patient motion, up to (mm)")
    parser.add_argument("--motion-deg", type=float, default=2.0, help="and up to (degrees)")
    parser.add_argument("--rows", type=Path, help="write every station's rows here (TSV)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = evaluate(args.model, Path(work), subjects=args.subjects, seed=args.seed, first_index=args.first_index,
                        motion_mm=args.motion_mm, motion_deg=args.motion_deg)  # fmt: skip
    if args.rows:
        io.write_tsv(args.rows, rows)
    table = summary(rows)
    print(table.to_markdown(index=False))
    print(json.dumps(table.to_dict(orient="records")))


if __name__ == "__main__":
    main()
