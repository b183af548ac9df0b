"""The measurements from the predicted masks against the same measurements from the reference masks (Bland-Altman
per station and measure), for a finished run whose manifest has references: prints a Markdown table.

    python scripts/morphometrics_agreement.py results            # the demo (results/demo/cohort.tsv)
    python scripts/morphometrics_agreement.py results cohort.tsv
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from spinecohort import cohort, io, layout
from spinecohort.morphometrics import agreement, measure


def reference_measures(manifest: Path, predicted: pd.DataFrame) -> pd.DataFrame:
    """`measure` on each measured image's reference masks (their ids are the true levels)."""
    table = cohort.resolve_paths(cohort.read_manifest(manifest), manifest.parent).set_index("image_id")
    frames = []
    for image_id in predicted.image_id.unique():
        row = table.loc[image_id]
        if row.reference_semantic and row.reference_instance:
            instance, affine = io.load_mask(row.reference_instance)
            frames.append(measure(instance, io.load_mask(row.reference_semantic)[0], affine, image_id))
    return pd.concat(frames, ignore_index=True)


def main(results: Path, manifest: Path) -> str:
    predicted = pd.read_parquet(results / "summary" / layout.MORPHOMETRICS_TABLE)
    table = agreement(predicted, reference_measures(manifest, predicted))
    lines = ["| station | structure | measure | unit | pairs | reference mean | bias | 95 % limits of agreement |", "|---|---|---|---|---:|---:|---:|---|"]
    lines += [f"| {r.station} | {r.structure} | {r.measure} | {r.unit} | {r.pairs} | {r.reference_mean:.2f} | {r.bias:+.2f} | "
              f"{r.lower:+.2f} to {r.upper:+.2f} |" for r in table.itertuples()]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    results = Path(sys.argv[1])
    print(main(results, Path(sys.argv[2]) if len(sys.argv) > 2 else results / "demo" / "cohort.tsv"))
