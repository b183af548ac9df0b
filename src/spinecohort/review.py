"""A reviewer's decisions (config `qc.decisions`), read back into the cohort's tables, and the QC score checked
against them.

The decisions file is a TSV with a header: `image_id`, `decision` (`accept`, `reject` or `fix`: the
segmentation is wrong and the image should be redone after a fix) and an optional `note`. Rejected images leave
Table S1, the by-region summary and the levels table; rejected and "needs fix" images are listed in
`layout.REVIEWED_OUT` with the reviewer's note; every image's QC row carries its decision. From the reviewed
images (`ranking_check`) come the QC ranking's AUC against the decisions and the rejection rate per decile of
the score, so a user sees whether the top of the list is where the failures are on their own cohort.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from . import io, layout

DECISIONS: Final = ("accept", "reject", "fix")
COLUMNS: Final = ("image_id", "decision", "note")
DECILES: Final = 10
SIDECAR_KEY: Final = "QCReview"  # in a published mask sidecar: the review's decision and note


class DecisionsError(ValueError):
    """A decisions file the workflow cannot read; the message names the rows."""


def no_decisions() -> pd.DataFrame:
    return pd.DataFrame(columns=list(COLUMNS), dtype=str)


def read_decisions(path: str | Path) -> pd.DataFrame:
    """The decisions (COLUMNS, one row per image). Unknown decisions and images decided twice are errors naming their
    rows (a reviewer who changed their mind edits the row)."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if missing := [c for c in COLUMNS[:2] if c not in table]:
        raise DecisionsError(f"decisions {path}: no column {', '.join(missing)} (columns: image_id, decision, note)")
    table = table.reindex(columns=list(COLUMNS), fill_value="")
    table["decision"] = table.decision.str.strip().str.lower()
    problems = [f"row {i + 2}: decision {d!r} is not one of {', '.join(DECISIONS)}" for i, d in table.decision.items() if d not in DECISIONS]
    problems += [f"row {i + 2}: {image_id} is decided twice" for i, image_id in table.image_id[table.image_id.duplicated()].items()]
    if problems:
        raise DecisionsError(f"decisions {path}: " + "; ".join(problems[:20]))
    return table


def auc(score: pd.Series, bad: pd.Series) -> float:
    """The chance that a bad image scores above a good one (higher score = worse; ties count half); NaN unless both
    kinds are there. Both series by image id."""
    score, bad = score.align(bad, join="inner")
    flags = bad.to_numpy(dtype=bool)
    worse = score.to_numpy()[flags][:, None] - score.to_numpy()[~flags][None, :]
    return float(((worse > 0) + 0.5 * (worse == 0)).mean()) if flags.any() and (~flags).any() else float("nan")


def ranking_check(score: pd.Series, decisions: pd.DataFrame) -> tuple[float, pd.DataFrame]:
    """The QC `score` (by image id, the whole cohort) against the decisions: the AUC of the score for rejection among
    the accepted and rejected images, and per decile of the cohort's score (1: the worst tenth) the images, how many
    were reviewed, rejected, and the rejection rate among the reviewed (NaN where none was)."""
    decided = decisions.set_index("image_id").decision.reindex(score.index)
    reviewed = decided.isin(["accept", "reject"])
    area = auc(score[reviewed], decided[reviewed] == "reject")
    # Deciles by rank, worst first; ties keep the cohort's order (qc_table sorts by score, then image id).
    order = np.argsort(-score.to_numpy(), kind="stable")
    decile = np.empty(len(score), dtype=int)
    decile[order] = np.arange(len(score)) * DECILES // max(len(score), 1) + 1
    table = pd.DataFrame({"decile": decile, "reviewed": reviewed.to_numpy(), "rejected": (decided == "reject").to_numpy()})
    deciles = table.groupby("decile").agg(images=("reviewed", "size"), reviewed=("reviewed", "sum"), rejected=("rejected", "sum"))
    deciles["rejection_rate"] = deciles.rejected / deciles.reviewed.where(deciles.reviewed > 0)
    return area, deciles.reset_index()


def on_qc_rows(qc: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """The QC table with each image's `review` (its decision, or empty) and `review_note`."""
    by_image = decisions.set_index("image_id")
    return qc.assign(review=by_image.decision.reindex(qc.image_id).fillna("").to_numpy(),
                     review_note=by_image.note.reindex(qc.image_id).fillna("").to_numpy())  # fmt: skip


def reviewed_out(decisions: pd.DataFrame, batches: Mapping[str, str]) -> pd.DataFrame:
    """The images the review takes out of the tables (rejected) or sends back (fix), with their batch and note."""
    out = decisions[decisions.decision != "accept"]
    return out.assign(batch=[batches.get(i, "") for i in out.image_id])[["image_id", "batch", "decision", "note"]]


def mark_sidecars(derivatives: Path, manifest: pd.DataFrame, decisions: pd.DataFrame, state: Path) -> None:
    """The published mask sidecars of rejected and "needs fix" images carry the decision and note (`SIDECAR_KEY`);
    images an earlier run marked whose decision is gone, or is now accept, lose it. `state` lists the marked images:
    it outlives summarize's outputs, which Snakemake removes before each run. A marked sidecar becomes a file of its
    own; the stage's copy in the work folder stays as the stage wrote it."""
    wanted = {r.image_id: {"decision": r.decision, "note": r.note} for r in decisions.itertuples() if r.decision != "accept"}
    before = set(state.read_text().split()) if state.exists() else set()
    rows = manifest.drop_duplicates("image_id").set_index("image_id")
    for image_id in sorted((before | set(wanted)) & set(rows.index)):
        row = rows.loc[image_id]
        for seg in ("spine", "vert"):
            path = layout.derivative(derivatives, row.subject, row.session, image_id, seg, "msk.json")
            if not path.exists():
                continue
            sidecar = io.read_json(path)
            had = sidecar.pop(SIDECAR_KEY, None)
            if image_id in wanted:
                sidecar[SIDECAR_KEY] = wanted[image_id]
            if had != sidecar.get(SIDECAR_KEY):
                io.write_json(path, sidecar)
    with io.atomic_path(state) as tmp:
        tmp.write_text("".join(f"{i}\n" for i in sorted(wanted)))
