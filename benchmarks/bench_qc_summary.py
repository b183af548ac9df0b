"""What cohort QC adds to `summarize`, for a 90,000-image cohort, one core.

Goal (issue 17): <= 10 % of the stage's time. Anchor, measured in this run: what the stage does with the
scores anyway, from 90,000 images' score rows (10 structures x DSC and ASSD, and the 4 levels metrics): the
partitioned score dataset, by-region statistics, Table S1, the levels table and the box plots. QC:
`cohort_qc.qc_table` (the volume z-scores per station and level, the flags, the score, the ranking) from the
per-image measures, 14 labels' fold agreement and 12 level volumes per image, and its three files
(qc.parquet, qc_flags.tsv, the review page of the 20 worst). The stage's reading of the batches' files is
left out of both. Medians of 3. Run with `taskset -c 0`. `--quick`: 300 images, one measurement
(tests/test_benchmarks.py). Last line: JSON.
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from spinecohort import io, summary
from spinecohort.cohort_qc import qc_table, review_page
from spinecohort.labels import REGIONS

QUICK = "--quick" in sys.argv
IMAGES, REPEATS = (300, 1) if QUICK else (90_000, 3)
STRUCTURES = list(summary.TABLE_S1_ROWS)
LABELS = ("arcus", "spinous process", "costal process L", "costal process R", "superior articular L", "superior articular R",
          "inferior articular L", "inferior articular R", "corpus", "spinal cord", "spinal canal", "endplate", "IVD", "sacrum")
LEVELS = 12

rng = np.random.default_rng(0)
ids = np.array([f"sub-{k:06d}_acq-sag_chunk-{'HWS BWS LWS'.split()[k % 3]}" for k in range(IMAGES)])
regions = np.array([REGIONS[k % 3] for k in range(IMAGES)])

scores = pd.DataFrame({
    "image_id": np.repeat(ids, 2 * len(STRUCTURES)), "region": np.repeat(regions, 2 * len(STRUCTURES)),
    "structure": np.tile(np.repeat(STRUCTURES, 2), IMAGES), "metric": np.tile(["DSC", "ASSD"], IMAGES * len(STRUCTURES)),
    "value": rng.uniform(0.5, 1.0, IMAGES * 2 * len(STRUCTURES)), "flag": "",
})
level_metrics = ["id_rate", "identified", "scored", "localisation_mm"]
levels = pd.DataFrame({
    "image_id": np.repeat(ids, 4), "region": np.repeat(regions, 4), "structure": "Vertebra levels",
    "metric": np.tile(level_metrics, IMAGES), "value": rng.uniform(0, 12, IMAGES * 4), "flag": "subject",
})
scores = pd.concat([scores, levels], ignore_index=True)

# Measures as a cohort shows them: most images plausible, a few per cent flagged.
low, high = np.array([9, 10, 5])[np.arange(IMAGES) % 3], np.array([15, 16, 9])[np.arange(IMAGES) % 3]
images = pd.DataFrame({"image_id": ids, "region": regions, "numbering": "subject",
                       "vertebrae": rng.integers(low - 1, high + 1).astype(float),
                       "missing_ivds": (rng.uniform(size=IMAGES) < 0.02).astype(float), "canal_gap_mm": rng.exponential(2.0, IMAGES)})
agreement = pd.DataFrame({"image_id": np.repeat(ids, len(LABELS)), "structure": np.tile(LABELS, IMAGES),
                          "dsc": np.clip(rng.normal(0.93, 0.03, IMAGES * len(LABELS)), 0, 1).round(4)})
volumes = pd.DataFrame({"image_id": np.repeat(ids, LEVELS), "region": np.repeat(regions, LEVELS),
                        "level": np.tile([str(k) for k in range(LEVELS)], IMAGES), "mm3": rng.normal(30000, 3000, IMAGES * LEVELS)})
snapshots = {i: f"../work/b/levels/{i}_snp.png" for i in ids}

table_arrow = pa.Table.from_pandas(scores.assign(batch="b0001", subject="s", session="", definition="mean_of_means",
                                                  pred_voxels=1, ref_voxels=1), preserve_index=False)
anchor, qc = [], []
with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp)
    for k in range(REPEATS):
        t0 = time.perf_counter()
        summary.write_partitioned(table_arrow, out / f"scores{k}")
        stats = summary.by_region(scores)
        summary.write_table_s1(summary.table_s1(stats, STRUCTURES), out, "caption")
        summary.write_levels_table(summary.levels_table(scores, images), out)
        summary.box_plots(scores, out, STRUCTURES)
        t1 = time.perf_counter()
        table = qc_table(images, agreement, volumes)
        summary.write_parquet(out / "qc.parquet", table, {})
        io.write_tsv(out / "qc_flags.tsv", table[table["flags"] != ""][["image_id", "region", "score", "flags"]])
        (out / "qc_review.html").write_text(review_page(table, snapshots, 20))
        anchor.append(t1 - t0)
        qc.append(time.perf_counter() - t1)

a, q = statistics.median(anchor), statistics.median(qc)
print(f"{'step (' + str(IMAGES) + ' images)':<62}{'median s':>10}")
print(f"{'scores: dataset, by region, Table S1, levels, plots (anchor)':<62}{a:>10.2f}")
print(f"{'QC: z-scores, flags, score, ranking, its three files':<62}{q:>10.2f}")
print(json.dumps({"figure": f"cohort QC in summarize, {IMAGES} images, one core", "qc_s": round(q, 3), "anchor_s": round(a, 3),
                  "ratio_to_anchor": round(q / a, 3), "goal": {"ratio": 0.10}}))
