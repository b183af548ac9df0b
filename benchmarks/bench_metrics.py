"""Scoring speed: DSC + ASSD for 12 structures on 512x512x64, and a cohort-wide summary.

Goals (issue 5): <= 0.3 s per volume on one core and >= 4x faster than DeepMind
`surface-distance` (anchor, same volume, same run; `pip install surface-distance`);
summarising score files of 90,000 images <= 60 s (anchor: reading one batch file).
Run with `taskset -c 0`. `--quick`: 3 structures on 160x320x64, 1,000 images, no repeats
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

from spinecohort import metrics, summary

SPACING = (0.75, 0.75, 1.65)
# --quick: a few seconds on tiny inputs, so the test suite can check the script still runs.
QUICK = "--quick" in sys.argv
SHAPE, N_STRUCTURES = ((160, 320, 64), 3) if QUICK else ((512, 512, 64), 12)  # the column: 36 voxels per structure in z
N_IMAGES, BATCH = (1_000, 100) if QUICK else (90_000, 100)


def column_of_blobs(rng):
    """A column of N_STRUCTURES labelled ellipsoid unions (vertebra-like), and a prediction shifted/eroded/dilated with islands."""
    ref = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    for k in range(N_STRUCTURES):
        c = np.array([40 + 36 * k, 256 + rng.integers(-20, 20), 32])
        r = np.array([14, 40, 14]) + rng.integers(-3, 4, 3)
        for mask, shift in ((ref, 0), (pred, rng.integers(-2, 3))):
            cc = c + shift
            mask[((z - cc[0]) / r[0]) ** 2 + ((y - cc[1]) / r[1]) ** 2 + ((x - cc[2]) / r[2]) ** 2 <= 1] = k + 1
        island = rng.integers(20, 490, 3) * [1, 1, 0] + [0, 0, rng.integers(5, 60)]
        pred[island[0] : island[0] + 3, island[1] : island[1] + 3, island[2] : island[2] + 2] = k + 1
    return pred, ref


def timed(fn, repeats=5):
    times = []
    for _ in range(1 if QUICK else repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


pred, ref = column_of_blobs(np.random.default_rng(0))
structures = {f"s{k}": [k] for k in range(1, N_STRUCTURES + 1)}
ours_s, ours = timed(lambda: metrics.score_structures(pred, ref, SPACING, structures))

try:
    import surface_distance as sd

    def deepmind():
        out = []
        for k in range(1, N_STRUCTURES + 1):
            p, r = pred == k, ref == k
            d = sd.compute_surface_distances(r, p, SPACING)
            out.append((sd.compute_dice_coefficient(r, p), np.mean(sd.compute_average_surface_distance(d))))
        return out

    anchor_s, _ = timed(deepmind, repeats=3)
except ImportError:
    anchor_s = float("nan")
    print("surface-distance not installed: no anchor", file=sys.stderr)

# Cohort summary: one score file per batch of 100 images, 24 rows per image (12 structures x DSC/ASSD).
with tempfile.TemporaryDirectory() as tmp:
    rng = np.random.default_rng(1)
    per_image = len(summary.TABLE_S1_ROWS) * 2
    files = []
    for b in range(N_IMAGES // BATCH):
        n = BATCH * per_image
        ids = np.repeat([f"sub-{b:04d}{i:03d}" for i in range(BATCH)], per_image)
        table = pd.DataFrame({
            "subject": ids, "session": "", "region": np.repeat(rng.choice(["cervical", "thoracic", "lumbar"], BATCH), per_image),
            "image_id": ids, "batch": f"b{b:04d}", "structure": np.tile(np.repeat(summary.TABLE_S1_ROWS, 2), BATCH),
            "metric": np.tile(["DSC", "ASSD"], n // 2), "value": rng.random(n), "definition": "", "flag": "",
            "pred_voxels": 1000, "ref_voxels": 1000,
        })
        files.append(Path(tmp) / f"b{b:04d}.parquet")
        summary.write_scores(files[-1], table)

    def summarise():
        table = summary.read_scores(files)
        summary.write_partitioned(table, Path(tmp) / "dataset")
        stats = summary.by_region(table.to_pandas())
        return summary.table_s1(stats)

    summary_s, s1 = timed(summarise, repeats=3)
    one_file_s, _ = timed(lambda: summary.read_scores(files[:1]).to_pandas(), repeats=5)

print(f"{'case':<52}{'seconds':>10}{'goal':>10}")
print(f"{f'{N_STRUCTURES} structures, {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}, DSC + ASSD (ours)':<52}{ours_s:>10.3f}{'<= 0.3':>10}")
print(f"{'  anchor: DeepMind surface-distance':<52}{anchor_s:>10.3f}")
print(f"{'  speed-up over the anchor':<52}{anchor_s / ours_s:>10.1f}{'>= 4':>10}")
print(f"{f'summary of {N_IMAGES:,} images ({len(files)} files)':<52}{summary_s:>10.2f}{'<= 60':>10}")
print(f"{'  anchor: read one batch file':<52}{one_file_s:>10.4f}")
print(json.dumps({"figure": "scoring and summary speed", "score_s": round(ours_s, 3), "anchor_deepmind_s": round(anchor_s, 3),
                  "speedup": round(anchor_s / ours_s, 1), "summary_90k_s": round(summary_s, 2),
                  "anchor_one_file_s": round(one_file_s, 4), "goal": {"score_s": 0.3, "speedup": 4, "summary_90k_s": 60}}))
