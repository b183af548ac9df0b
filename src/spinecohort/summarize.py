"""The summarize stage: the cohort's tables from every batch's and subject group's outputs.

It finishes with any number of score rows, none included: a cohort without reference masks (most of a
reprocessing) still gets its QC table, review page, levels, subject levels and failures, and Table S1 and the
levels table say that there is nothing to score. Rows a batch wrote for an image that the manifest has
since moved to a new batch (`spinecohort retry`) are that batch's history, not the image's state: they are
left out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from . import cohort, io, layout
from .labels import REGIONS

log = logging.getLogger("spinecohort")

NOTHING_TO_SCORE = "no image has a reference mask that could be scored: nothing to score"


def summarize(*, manifest: Path, out: Path, structures: list[str], scores: list[Path], levels: list[Path], semantic: list[Path],
              ledgers: list[Path], dataset: Path, review_images: int, provenance: Path, mixed_stacks: str = "warn",
              decisions: Path | None = None, derivatives: Path | None = None) -> None:
    from . import summary
    from .label_levels import SUBJECT_LEVEL_COLUMNS
    from .provenance import parquet_metadata, read_run
    from .review import mark_sidecars, no_decisions, read_decisions, reviewed_out
    from .stacks import MixedStacksError, differences, mixed_message, read_stacks

    review = read_decisions(decisions) if decisions else no_decisions()
    rejected = set(review.image_id[review.decision == "reject"])

    stacks = read_stacks(ledgers)
    mixed = mixed_message(lines) if (lines := differences(stacks)) else ""
    if mixed and mixed_stacks == "error":  # before anything is written: no table of a mixed cohort looks finished
        raise MixedStacksError(f"{mixed} (config mixed_stacks: error; rerun those batches with one stack, or set it to warn)")
    if mixed:
        log.warning("%s", mixed)
    out.mkdir(parents=True, exist_ok=True)
    io.write_tsv(out / layout.STACKS, stacks)
    images = cohort.read_manifest(manifest)
    batches = dict(zip(images.image_id, images.batch))
    run = read_run(provenance)
    metadata = parquet_metadata(run, assd_definition=str(run["parameters"]["metrics"]["assd"]))
    table = summary.read_scores([folder / layout.BATCH_SCORES for folder in scores])
    summary.write_partitioned(table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata}), dataset)
    rows = table.to_pandas()  # the score dataset keeps every image; the tables leave out those the review rejected
    rows = rows[~rows.image_id.isin(rejected)]
    stats = summary.by_region(rows)
    summary.write_parquet(out / "by_region.parquet", stats, metadata)
    n = rows.drop_duplicates("image_id").groupby("region").size()
    counts = ", ".join(f"{r}: n={n[r]}" for r in REGIONS if r in n) or NOTHING_TO_SCORE
    summary.write_table_s1(summary.table_s1(stats, structures), out, f"DSC and ASSD (mm), mean ± SD over images per station ({counts})")
    stations = finished_stations(levels)
    summary.write_levels_table(summary.levels_table(rows, stations[~stations.image_id.isin(rejected)]), out,
                               empty=NOTHING_TO_SCORE if rows.empty else None)  # fmt: skip
    summary.box_plots(rows, out, structures)
    io.write_tsv(out / "failures.tsv", summary.failures(ledgers, batches))
    io.write_tsv(out / layout.REVIEWED_OUT, reviewed_out(review, batches))
    if derivatives is not None:
        mark_sidecars(derivatives, images, review, out.parent / layout.REVIEW_MARKED)
    subjects = [pd.read_csv(folder / layout.SUBJECT_LEVELS, sep="\t", dtype=str, keep_default_na=False) for folder in levels]
    io.write_tsv(out / layout.SUBJECT_LEVELS, pd.concat(subjects, ignore_index=True) if subjects
                 else pd.DataFrame(columns=list(SUBJECT_LEVEL_COLUMNS)))
    qc = write_qc(out, stations, levels, semantic, review_images, metadata, batches, notice=mixed, review=review)
    write_morphometrics(out, levels, qc, rejected, metadata)
    log.info("summarised %d score rows of %d images%s", len(rows), rows["image_id"].nunique(), f" ({NOTHING_TO_SCORE})" if rows.empty else "")


def _read(path: Path, **kwargs: Any) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False, **kwargs)


STATION_COLUMNS = ["image_id", "region", "numbering", "vertebrae", "missing_ivds", "canal_gap_mm"]


def finished_stations(levels: list[Path]) -> pd.DataFrame:
    """The images label-levels finished, from its ledgers: STATION_COLUMNS (the QC measures as floats) and folder."""
    ledgers = [_read(folder / layout.LEDGER, dtype=str).assign(folder=str(folder)) for folder in levels]
    images = pd.concat(ledgers, ignore_index=True) if ledgers else pd.DataFrame(columns=["image_id", "status", "folder"])
    images = images[images.status == "ok"]
    return images.reindex(columns=[*STATION_COLUMNS, "folder"]).astype({c: float for c in STATION_COLUMNS[3:]})


def write_qc(out: Path, images: pd.DataFrame, levels: list[Path], semantic: list[Path], review_images: int,
             metadata: dict[bytes, bytes], batches: Mapping[str, str], notice: str = "", review: pd.DataFrame | None = None) -> pd.DataFrame:
    """qc.parquet, qc_flags.tsv and the review page (`cohort_qc`), from label-levels' (`images`: `finished_stations`) and
    average-folds' outputs (`batches`, image_id -> its batch in the manifest: an average-folds folder counts for the
    images its batch holds)."""
    from . import summary
    from .cohort_qc import qc_table, review_page
    from .review import on_qc_rows

    agreement = [summary.held_now(_read(folder / layout.FOLD_AGREEMENT, na_values=[""], dtype={"image_id": str}), folder.parent.name, batches)
                 for folder in semantic]
    volumes = [_read(folder / layout.LEVEL_VOLUMES, dtype={"image_id": str, "region": str, "level": str}) for folder in levels]
    table = qc_table(images[STATION_COLUMNS],
                     pd.concat(agreement, ignore_index=True) if agreement else pd.DataFrame(columns=["image_id", "structure", "dsc"]),
                     pd.concat(volumes, ignore_index=True) if volumes else pd.DataFrame(columns=["image_id", "region", "level", "mm3"]))
    check = ""
    if review is not None and len(review):
        table = on_qc_rows(table, review)
        check = write_review_check(out, table, review)
    summary.write_parquet(out / layout.QC_TABLE, table, metadata)
    io.write_tsv(out / layout.QC_FLAGS, table[table["flags"] != ""][["image_id", "region", "score", "flags"]])
    snapshots = {r.image_id: os.path.relpath(Path(r.folder) / layout.derivative_name(r.image_id, *layout.SNAPSHOT), out)
                 for r in images.itertuples()}
    with io.atomic_path(out / layout.QC_REVIEW) as tmp:
        tmp.write_text(review_page(table, snapshots, review_images, notice=notice, decisions=review, key=cohort_key(table.image_id),
                                   check=check))
    return table


def cohort_key(image_ids: pd.Series) -> str:
    """The review page's key for the decisions a browser keeps: its cohort's images (not the folder's path, so a
    rerun or a copied results folder writes the same page, byte for byte)."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:16]


def write_morphometrics(out: Path, levels: list[Path], qc: pd.DataFrame, rejected: set[str], metadata: dict[bytes, bytes]) -> None:
    """summary/morphometrics.parquet from every label-levels folder's measurements (`morphometrics.cohort_table`), one
    row group per subject group: a subject's stations lie in one group, so the overlaps are found there, and
    summarize holds one group's rows at a time (a NAKO cohort has ~200 rows per image, 18 million in all)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .morphometrics import TABLE_SCHEMA, cohort_table

    found = [folder / layout.MORPHOMETRICS for folder in levels if (folder / layout.MORPHOMETRICS).exists()]
    if missing := len(levels) - len(found):  # folders written before the measurements: their images have none
        log.warning("%d label-levels folder(s) hold no %s (written by an earlier spinecohort): rerun label_levels for their measurements",
                    missing, layout.MORPHOMETRICS)
    flags = qc.set_index("image_id")["flags"]
    schema = TABLE_SCHEMA.with_metadata(metadata)
    with io.atomic_path(out / layout.MORPHOMETRICS_TABLE) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for group in [[pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)] for path in found] or [[]]:  # none: the schema alone
            writer.write_table(pa.Table.from_pandas(cohort_table(group, flags, rejected), schema=schema, preserve_index=False))


def write_review_check(out: Path, qc: pd.DataFrame, review: pd.DataFrame) -> str:
    """The QC score against the reviewer's decisions (`review.ranking_check`): `layout.REVIEW_CHECK` per decile; the
    AUC in the log. Returns both as a paragraph of HTML for the review page."""
    import html

    from .review import ranking_check

    area, deciles = ranking_check(qc.set_index("image_id").score, review)
    io.write_tsv(out / layout.REVIEW_CHECK, deciles)
    line = f"QC score against {int(deciles.reviewed.sum())} reviewed images ({int(deciles.rejected.sum())} rejected): AUC {area:.3f}"
    log.info("%s", line)
    rates = ", ".join(f"{int(r.decile)}: {r.rejection_rate:.0%} of {int(r.reviewed)}" for r in deciles.itertuples() if r.reviewed)
    return f"<p>{html.escape(line)}; rejected per decile of the score (1: the worst tenth): {html.escape(rates)} ({layout.REVIEW_CHECK}).</p>"
