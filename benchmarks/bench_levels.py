"""What numbering a subject's stations together costs, per NAKO-size subject, one core.

Goal (issue 16): <= 1 CPU-s per subject. Measured on a NAKO-preset phantom subject (three stations,
448 x 448 x 15), its reference masks numbered as the stations number themselves: the labelling
(`station_vertebrae` of the three stations, `label_subject`, `relabel` of each mask); also, outside the goal,
stitching the semantic and instance masks into one whole-spine grid (`stitch`). Anchor, in
this run: reading the subject's three vertebra masks, which the stage must do anyway. Medians of 5
process-time measurements. Run with `taskset -c 0`. `--quick`: a `small`-preset subject (160 x 160 x 14),
one measurement (tests/test_benchmarks.py). Last line: JSON.
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spinecohort import io
from spinecohort import subject_levels as SL
from spinecohort.phantom import PRESETS, make_subject, render_station
from spinecohort.stitch import Piece, stitch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_subject_levels import OWN_NUMBERING, numbered_alone  # noqa: E402  (numbered as the instance phase does)

# --quick: a few seconds on tiny inputs, so the test suite can check the script still runs.
QUICK = "--quick" in sys.argv
PRESET, REPEATS = ("small", 1) if QUICK else ("nako", 5)

subject = make_subject(0, 1)
with tempfile.TemporaryDirectory() as tmp:
    masks = {}
    for region in ("cervical", "thoracic", "lumbar"):
        ph = render_station(subject, region, PRESETS[PRESET], seed=0, index=1)
        mask, _ = numbered_alone(ph, OWN_NUMBERING[region])
        io.save_nifti(Path(tmp) / f"{region}.nii.gz", mask, ph.affine, dtype=np.uint16)
        masks[region] = (io.load_mask(Path(tmp) / f"{region}.nii.gz")[0], ph.semantic, ph.affine)
    paths = sorted(Path(tmp).glob("*.nii.gz"))

    anchor, labelling, stitching = [], [], []
    for _ in range(REPEATS):
        t0 = time.process_time()
        for p in paths:
            io.load_mask(p)
        t1 = time.process_time()
        numbered = [SL.station_vertebrae(m[0], m[1], m[2], image_id=r, region=r, mode=OWN_NUMBERING[r]) for r, m in masks.items()]
        result = SL.label_subject(numbered)
        for i, m in masks.items():
            SL.relabel(m[0], result.maps.get(i, {}))
        labelling.append(time.process_time() - t1)
        anchor.append(t1 - t0)
        t2 = time.process_time()
        stitch([Piece((m[1], SL.relabel(m[0], result.maps.get(i, {}))), m[2], result.whole_spine[i]) for i, m in masks.items()],
               ("nearest", "nearest"))
        stitching.append(time.process_time() - t2)

a, b = statistics.median(anchor), statistics.median(labelling)
print(f"{'step, one NAKO-size subject (3 stations)':<52}{'median CPU-s':>14}")
print(f"{'read the three vertebra masks (anchor)':<52}{a:>14.3f}")
print(f"{'station_vertebrae x3 + label_subject + relabel x3':<52}{b:>14.3f}")
print(f"{'stitch the whole spine (optional; whole_spine: true)':<52}{statistics.median(stitching):>14.3f}")
print(f"linked: {', '.join(k for k, v in result.links.items() if v.offset is not None)}; column {result.vertebrae}")
print(json.dumps({"figure": f"subject-level labelling per {'small' if QUICK else 'NAKO-size'} subject, one core", "labelling_cpu_s": round(b, 3),
                  "anchor_cpu_s": round(a, 3), "ratio_to_anchor": round(b / a, 2), "goal": {"cpu_s": 1.0},
                  "stitch_cpu_s": round(statistics.median(stitching), 3)}))
