"""Phantom rendering speed: a 4-subject x 3-region `small` cohort and one NAKO-size image.

Goals (issue 2): small cohort <= 20 s on one core; one NAKO-like image <= 10 s.
Anchor: writing the same number of voxels as gzip NIfTI, measured in this run.
Last line: JSON.
"""

import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from spinecohort import io  # noqa: E402
from spinecohort.phantom import PRESETS, make_subject, render_station, write_cohort  # noqa: E402


def timed(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


with tempfile.TemporaryDirectory() as tmp:
    cohort_s = timed(lambda: write_cohort(f"{tmp}/c", subjects=4, preset="small"), repeats=1)
    nako_s = timed(lambda: render_station(make_subject(0, 1), "lumbar", PRESETS["nako"], seed=0, index=1))
    anchor_s = timed(lambda: io.save_nifti(f"{tmp}/a.nii.gz", np.random.rand(448, 448, 15).astype(np.float32), np.eye(4)))
print(f"{'case':<28}{'seconds':>10}{'goal':>8}")
print(f"{'small cohort 4x3':<28}{cohort_s:>10.2f}{20:>8}")
print(f"{'one nako image':<28}{nako_s:>10.2f}{10:>8}")
print(f"{'anchor: write nako nii.gz':<28}{anchor_s:>10.2f}")
print(json.dumps({"small_cohort_s": round(cohort_s, 2), "nako_image_s": round(nako_s, 2), "anchor_write_s": round(anchor_s, 3),
                  "nako_over_anchor": round(nako_s / anchor_s, 1), "goal": {"small_cohort_s": 20, "nako_image_s": 10}}))
