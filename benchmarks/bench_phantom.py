"""Phantom rendering speed: a 4-subject x 3-region `small` cohort and one NAKO-size image.

Goals (issue 2): small cohort <= 20 s on one core; one NAKO-like image <= 10 s.
Anchor: writing the same number of voxels as gzip NIfTI, measured in this run.
`--quick`: a 1-subject cohort and one `small` image (160 x 160 x 14), no repeats
(tests/test_benchmarks.py). Last line: JSON.
"""

import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from spinecohort import io  # noqa: E402
from spinecohort.phantom import PRESETS, make_subject, render_station, write_cohort  # noqa: E402

# --quick: a few seconds on tiny inputs, so the test suite can check the script still runs.
QUICK = "--quick" in sys.argv
SUBJECTS, IMAGE = (1, PRESETS["small"]) if QUICK else (4, PRESETS["nako"])


def timed(fn, repeats=3):
    times = []
    for _ in range(1 if QUICK else repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


with tempfile.TemporaryDirectory() as tmp:
    cohort_s = timed(lambda: write_cohort(f"{tmp}/c", subjects=SUBJECTS, preset="small"), repeats=1)
    nako_s = timed(lambda: render_station(make_subject(0, 1), "lumbar", IMAGE, seed=0, index=1))
    anchor_s = timed(lambda: io.save_nifti(f"{tmp}/a.nii.gz", np.random.rand(*IMAGE.shape).astype(np.float32), np.eye(4)))
print(f"{'case':<28}{'seconds':>10}{'goal':>8}")
print(f"{f'small cohort {SUBJECTS}x3':<28}{cohort_s:>10.2f}{20:>8}")
print(f"{f'one {IMAGE.name} image':<28}{nako_s:>10.2f}{10:>8}")
print(f"{f'anchor: write {IMAGE.name} nii.gz':<28}{anchor_s:>10.2f}")
print(json.dumps({"small_cohort_s": round(cohort_s, 2), "nako_image_s": round(nako_s, 2), "anchor_write_s": round(anchor_s, 3),
                  "nako_over_anchor": round(nako_s / anchor_s, 1), "goal": {"small_cohort_s": 20, "nako_image_s": 10}}))
