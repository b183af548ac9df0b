"""What the per-level measurements cost per NAKO-size image, one core. Goal (issue 42): <= 1 CPU-s per image.
Measured on a NAKO-preset phantom subject's three stations (448 x 448 x 15), their reference masks (ids are
levels): `morphometrics.measure` per station. Anchor, in this run: reading the station's vertebra mask, which
label-levels does anyway. Medians of 5 process-time measurements. Run with `taskset -c 0`. `--quick`: a
`small`-preset subject (160 x 160 x 14), one measurement (tests/test_benchmarks.py). Last line: JSON.
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spinecohort import io
from spinecohort.morphometrics import measure
from spinecohort.phantom import PRESETS, make_subject, render_station

QUICK = "--quick" in sys.argv
PRESET, REPEATS = ("small", 1) if QUICK else ("nako", 5)
subject = make_subject(0, 1)
anchor: dict[str, list[float]] = {}
cost: dict[str, list[float]] = {}
rows: dict[str, int] = {}
with tempfile.TemporaryDirectory() as tmp:
    for region in ("cervical", "thoracic", "lumbar"):
        ph = render_station(subject, region, PRESETS[PRESET], seed=0, index=1)
        path = Path(tmp) / f"{region}.nii.gz"
        io.save_nifti(path, ph.instance, ph.affine, dtype=np.uint16)
        for _ in range(REPEATS):
            t0 = time.process_time()
            io.load_mask(path)
            t1 = time.process_time()
            table = measure(ph.instance, ph.semantic, ph.affine, region)
            anchor.setdefault(region, []).append(t1 - t0)
            cost.setdefault(region, []).append(time.process_time() - t1)
        rows[region] = len(table)
print(f"{'station, ' + PRESET + ' preset':<28}{'rows':>6}{'measure CPU-s':>15}{'read mask CPU-s':>17}")
for region in cost:
    print(f"{region:<28}{rows[region]:>6}{statistics.median(cost[region]):>15.3f}{statistics.median(anchor[region]):>17.3f}")
worst = max(statistics.median(v) for v in cost.values())
a = statistics.median([statistics.median(v) for v in anchor.values()])
print(json.dumps({"figure": f"per-level measurements per {'small' if QUICK else 'NAKO-size'} image (worst station), one core",
                  "measure_cpu_s": round(worst, 3), "anchor_cpu_s": round(a, 3), "ratio_to_anchor": round(worst / a, 2), "goal": {"cpu_s": 1.0}}))
