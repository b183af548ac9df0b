"""A BIDS folder as the cohort (config `bids`): its manifest, built when the workflow starts.

`snakemake --cores all --config bids=/data/rawdata` needs no `spinecohort manifest` step: the main Snakemake
process lists the folder's sagittal T2w stations (`cohort.manifest_from_bids`), keeps the participants and
sessions the BIDS-app filters select (`select`), and writes `results/cohort.tsv` (`write_manifest`), where
every image of the previous run keeps its batch and new images fill new batches, so that finished batches are
not redone. The file is rewritten only when its content changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from . import cohort, io

# config `bids_options` keys that select rows, as BIDS apps name their options (labels without sub-/ses-)
FILTERS = {"participant_label": "subject", "exclude_participant_label": "subject",
           "session_label": "session", "exclude_session_label": "session"}  # fmt: skip


def _labels(values: Iterable[object], prefix: str) -> set[str]:
    """Labels as given on the command line or in YAML (`01`, `sub-01`; a bare number is read as an int)."""
    return {str(v).removeprefix(prefix) for v in values}


def select(rows: pd.DataFrame, *, source: str = "the BIDS folder", **filters: Iterable[object]) -> pd.DataFrame:
    """The rows the `FILTERS` keep. A participant or session asked for by name that is not there is an error (a typo
    would silently process nothing of it); one excluded that is not there is not."""
    for key, values in filters.items():
        column = FILTERS[key]
        labels = _labels(values, "sub-" if column == "subject" else "ses-")
        if not labels:
            continue
        if key.startswith("exclude_"):
            rows = rows[~rows[column].isin(labels)]
            continue
        if missing := sorted(labels - set(rows[column])):
            raise cohort.ManifestError(f"{key} {', '.join(missing)}: no such {column} in {source}")
        rows = rows[rows[column].isin(labels)]
    if rows.empty:
        raise cohort.ManifestError(f"no image of {source} is left after the participant and session filters")
    return rows


def write_manifest(rows: pd.DataFrame, out: Path, *, batch_size: int, previous: pd.DataFrame | None) -> pd.DataFrame:
    """The checked, batched manifest of `rows` at `out` (paths relative to its folder), keeping `previous` batches;
    the file is left alone when it already says this."""
    rows = cohort.relative_paths(rows.drop(columns="batch", errors="ignore"), out.parent)
    table = cohort.check_manifest(cohort.assign_batches(rows, batch_size=batch_size, previous=previous), source=str(out))
    if not out.exists() or not cohort.read_manifest_table(out).equals(table.astype(str)):
        io.write_tsv(out, table)
    return table


def cohort_manifest(root: str | Path, out: Path, *, batch_size: int, references: str = "", **filters: Iterable[object]) -> Path:
    """Write (or keep) the manifest of the BIDS folder `root` at `out`; the previous one there gives the batches."""
    rows = select(cohort.manifest_from_bids(root, references=references or None), source=str(root), **filters)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(rows, out, batch_size=batch_size, previous=cohort.read_manifest(out) if out.exists() else None)
    return out
