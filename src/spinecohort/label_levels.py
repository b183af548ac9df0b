"""The label-levels stage's driver: one numbering per subject across its stations, the published vertebra masks.

Per subject group (`cohort.subject_groups`): each subject's stations are linked and numbered (`subject_levels`);
where a labelling model named a station's vertebrae (`labeling`, the label-vertebrae stage), its ids take
precedence as `labeling.apply_model` states. Then each station's vertebra mask, centroids, sidecar and snapshot,
and per subject a row of `layout.SUBJECT_LEVELS` (and with `whole_spine` its stitched masks).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from . import cohort, io, layout
from .labels import REGIONS
from .labels import VERTEBRA_NAMES as L_NAMES

log = logging.getLogger("spinecohort")

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from .pipeline import Outcome
    from .subject_levels import SubjectLevels


def label_levels(*, manifest: Path, batch: str, out: Path, restore: list[Path], derivatives: Path, provenance: Path,
                 whole_spine: bool = False, labeling: Sequence[Path] = (), per_station: bool = False,
                 enforce_12_thoracic: bool = False, min_margin: float | None = None) -> None:
    """Subject-level ids (`subject_levels`) for the stations of a subject group: each station's vertebra mask with
    those ids, its provenance sidecar, its snapshot, and `layout.SUBJECT_LEVELS`; the masks restore numbered by
    station stay in its folder. With `whole_spine`, each subject's stations that carry levels also as one stitched
    semantic and instance mask and snapshot (`stitch`). With `labeling` (the label-vertebrae folders of the group's
    batches), one labelling model search per subject over its linked stations (`joint_labeling`), or with
    `per_station` the model's own ids of each station (`labeling.apply_model`, SPINEPS's answer)."""
    from . import provenance as prov
    from .centroids import poi_json
    from .cohort_qc import image_measures, level_volumes
    from .joint_labeling import apply_joint
    from .labeling import apply_model, model_ids, model_posteriors, read_labeling_tables
    from .morphometrics import STATION_COLUMNS, measure
    from .pipeline import _image_folders, _level_names, _publish, group_rows, ledger_facts, run_stage, upstream_failures
    from .qc import snapshot_png
    from .subject_levels import label_subject, relabel, station_vertebrae

    rows = group_rows(manifest, batch)
    run = prov.read_run(provenance)
    folder_of = _image_folders(restore)
    own = {i: m for folder in restore for i, m in ledger_facts(folder, "numbering").items()}
    failed = upstream_failures(restore)
    table = read_labeling_tables(labeling)
    named, posteriors = model_ids(table), model_posteriors(table)
    for image_id in set(rows.image_id) - set(folder_of):
        failed[image_id] = "restored by none of the given restore folders"
    # A subject's stations one after the other, top to bottom, so that each subject's masks are read once.
    rows = rows.iloc[np.lexsort(([REGIONS.index(r) for r in rows.region], rows.session, rows.subject))]
    subjects: dict[tuple[str, str], SubjectLevels] = {}
    masks: dict[str, tuple[NDArray, NDArray, NDArray] | Exception] = {}  # the current subject's: instance, affine, semantic
    summary: list[dict[str, str]] = []
    volumes: list[dict[str, Any]] = []
    measured: list[pd.DataFrame] = []

    def read_masks(image_id: str) -> tuple[NDArray, NDArray, NDArray]:
        instance, affine = io.load_mask(folder_of[image_id] / layout.derivative_name(image_id, "vert"))
        return instance, affine, io.load_mask(folder_of[image_id] / layout.derivative_name(image_id, "spine"))[0]

    def subject(subject: str, session: str) -> SubjectLevels:
        """The subject's labelling, computed at its first station (over the stations that restore finished)."""
        if (subject, session) not in subjects:
            everyone = rows[(rows.subject == subject) & (rows.session == session)]
            masks.clear()
            stations = []
            for r in everyone[~everyone.image_id.isin(failed)].itertuples():
                try:
                    instance, affine, semantic = masks[r.image_id] = read_masks(r.image_id)
                except Exception as exc:  # this station fails alone, in its own row
                    masks[r.image_id] = exc
                    continue
                stations.append(station_vertebrae(instance, semantic, affine, image_id=r.image_id, region=r.region,
                                                  mode=own[r.image_id]))
            subjects[subject, session] = result = label_subject(stations)
            if per_station:
                apply_model(result, stations, named)
            else:
                apply_joint(result, stations, posteriors, enforce_12_thoracic=enforce_12_thoracic,
                            **({} if min_margin is None else {"min_margin": min_margin}))
            joined = ""
            if whole_spine and result.whole_spine:
                joined = _stitch_subject(out, subject, session, everyone, result, masks, derivatives)
            summary.append(_subject_row(subject, session, everyone, result) | {"whole_spine": joined})
        return subjects[subject, session]

    def work(row: pd.Series) -> Outcome:
        result = subject(row.subject, row.session)
        loaded = masks.pop(row.image_id, None)
        if isinstance(loaded, Exception):
            raise loaded
        instance, affine, semantic = loaded if loaded is not None else read_masks(row.image_id)
        if row.image_id in result.maps:
            instance = relabel(instance, result.maps[row.image_id])
        mode = result.modes[row.image_id]
        io.save_nifti(out / layout.derivative_name(row.image_id, "vert"), instance, affine, dtype=np.uint16,
                      codes=io.header_codes(row.image))
        io.write_json(out / layout.derivative_name(row.image_id, *layout.CENTROIDS), poi_json(
            instance, affine, {"source": "spinecohort", "version": run["software"]["spinecohort"], "numbering": mode}))
        io.write_json(out / layout.derivative_name(row.image_id, "vert", "msk.json"), prov.sidecar(
            run, source=cohort.manifest_entry(row.image, manifest.parent), description="vertebra instance mask (SPINEPS ids: vertebra, 100+ IVD, 200+ endplate)",
            Numbering=mode, NumberingReason=result.reasons[row.image_id], StationNumbering=own[row.image_id]))
        image, image_affine = io.load_image(row.image)
        snapshot_png(out / layout.derivative_name(row.image_id, *layout.SNAPSHOT), image, semantic, instance, image_affine,
                     title=f"{row.image_id} ({row.region}, {mode})", names=_level_names(instance, counted=mode == "count"))
        _publish(out, row, derivatives, "label-levels")
        measures = image_measures(instance, semantic, affine)
        if mode != "count":  # a count's ids are positions, not levels
            volumes.extend({"image_id": row.image_id, "region": row.region, "level": L_NAMES[k], "mm3": round(v, 1)}
                           for k, v in level_volumes(instance, affine).items())
            try:
                measured.append(measure(instance, semantic, affine, row.image_id).assign(subject=row.subject, session=row.session,
                                                                                          station=row.region))  # fmt: skip
            except Exception as exc:  # a measurement never costs an image its masks; the log says which has none
                log.warning("%s: no measurements: %s: %s", row.image_id, type(exc).__name__, exc)
        margin = {"label_margin": f"{result.margins[row.image_id]:.4f}"} if row.image_id in result.margins else {}
        return {"message": result.reasons[row.image_id], "numbering": mode, "station_numbering": own[row.image_id], **margin,
                "region": row.region, **{k: f"{v:g}" for k, v in measures.items()}}

    run_stage(layout.ledger_stage("label-levels"), rows, out, work, failed_before=failed)
    io.write_tsv(out / layout.LEVEL_VOLUMES, pd.DataFrame(volumes, columns=["image_id", "region", "level", "mm3"]))
    io.write_tsv(out / layout.MORPHOMETRICS, pd.concat(measured, ignore_index=True)[list(STATION_COLUMNS)] if measured
                 else pd.DataFrame(columns=list(STATION_COLUMNS)))  # fmt: skip
    for key in dict.fromkeys(zip(rows.subject, rows.session)):  # subjects with no station left get their row too
        subject(*key)
    io.write_tsv(out / layout.SUBJECT_LEVELS, pd.DataFrame(summary, columns=list(SUBJECT_LEVEL_COLUMNS)))


# layout.SUBJECT_LEVELS: a row per subject.
SUBJECT_LEVEL_COLUMNS: Final = ("subject", "session", "stations", "linked", "vertebrae", "thoracic", "lumbar", "levels", "note",
                                "whole_spine")


def _stitch_subject(out: Path, subject: str, session: str, stations: pd.DataFrame, result: SubjectLevels,
                    masks: dict[str, tuple[NDArray, NDArray, NDArray] | Exception], derivatives: Path) -> str:
    """The subject's whole-spine semantic and instance masks and snapshot (`stitch`), written into `out` and
    published next to its stations; returns the regions joined (``cervical+thoracic+lumbar``)."""
    from .pipeline import _level_names
    from .qc import snapshot_png
    from .stitch import Piece, stitch
    from .subject_levels import relabel

    pieces, regions = [], []
    for row in stations.itertuples():
        if row.image_id not in result.whole_spine:
            continue
        instance, affine, semantic = masks[row.image_id]  # type: ignore[misc]  # whole_spine holds read stations only
        image = io.load_image(row.image)[0]
        scaled = image / max(float(np.percentile(image, 99)), 1e-6)
        pieces.append(Piece((semantic, relabel(instance, result.maps.get(row.image_id, {})), scaled), affine,
                            result.whole_spine[row.image_id]))
        regions.append(row.region)
    (semantic, instance, image), (_, affine) = stitch(pieces, ("nearest", "nearest", "linear"))
    stem = layout.whole_spine_stem(subject, session)
    codes = io.header_codes(stations.image.iloc[0])
    for (seg, suffix), mask in zip(layout.WHOLE_SPINE[:2], (semantic, instance)):
        io.save_nifti(out / layout.derivative_name(stem, seg, suffix), mask, affine, dtype=np.uint16 if seg == "vert" else np.uint8,
                      codes=codes)
    snapshot_png(out / layout.derivative_name(stem, *layout.SNAPSHOT), image, semantic, instance, affine,
                 title=f"sub-{subject} whole spine ({' + '.join(regions)})", names=_level_names(instance, counted=False))
    for seg, suffix in layout.WHOLE_SPINE:
        name = layout.derivative_name(stem, seg, suffix)
        io.publish(out / name, derivatives / layout.subject_folder(subject, session) / name)
    return "+".join(regions)


def _subject_row(subject: str, session: str, stations: pd.DataFrame, result: SubjectLevels) -> dict[str, str]:
    """A subject's row of `layout.SUBJECT_LEVELS`: its stations, links, the column's count and each station's levels."""
    def levels(image_id: str) -> str:
        if image_id not in result.levels:
            return "failed"
        ids = result.levels[image_id]
        if result.modes[image_id] == "count":
            return f"count of {len(ids)}"
        return f"{L_NAMES[ids[0]]}-{L_NAMES[ids[-1]]}" if ids else "none"

    def number(value: int | None) -> str:
        return "" if value is None else str(value)

    return {
        "subject": subject, "session": session, "stations": " ".join(stations.region),
        "linked": " ".join(k for k, v in result.links.items() if v.offset is not None),
        "vertebrae": number(result.vertebrae), "thoracic": number(result.thoracic), "lumbar": number(result.lumbar),
        "levels": "; ".join(f"{r.region} {levels(r.image_id)}" for r in stations.itertuples()),
        "note": result.note,
    }  # fmt: skip


