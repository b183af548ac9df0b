"""N4 settings on NAKO-size phantoms: CPU seconds and bias-field correlation.

Goal (issue 3): <= 15 CPU-s per NAKO-size image (448x448x15) with a bias-field
correlation >= 0.997 against full-resolution N4 of the same settings, and
>= 0.99 against the phantom's true field.
Anchor: full-resolution N4 (shrink 1,1,1) of the default settings, same run.
One thread, so CPU seconds equal wall seconds. `--quick` skips the anchor and measures the default
settings on one `small`-preset station (160 x 160 x 14; tests/test_benchmarks.py).
Last line: JSON.
"""

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from spinecohort import preprocess  # noqa: E402
from spinecohort.phantom import PRESETS, make_subject, render_station  # noqa: E402

# --quick: a few seconds on tiny inputs, so the test suite can check the script still runs.
QUICK = "--quick" in sys.argv
PRESET = PRESETS["small" if QUICK else "nako"]
DEFAULT = {"shrink": (8, 8, 1), "iterations": (50, 50, 50), "bias_fwhm": 0.15}
SETTINGS = [
    {"shrink": (4, 4, 2), "iterations": (50,) * 4, "bias_fwhm": 0.15},  # SPINEPS-like, N4 defaults
    {"shrink": (8, 8, 1), "iterations": (50, 50), "bias_fwhm": 0.3},
    {"shrink": (8, 8, 1), "iterations": (50,) * 3, "bias_fwhm": 0.2},
    {"shrink": (8, 8, 2), "iterations": (50,) * 3, "bias_fwhm": 0.15},
    DEFAULT,
]
# Two subjects x three stations; the lumbar one of subject 3 defeated a linear-intensity Otsu mask.
STATIONS = [render_station(make_subject(i, 1), region, PRESET, seed=1, index=i)
            for i in (1, 2) for region in ("cervical", "thoracic", "lumbar")]
STATIONS[5] = render_station(make_subject(3, 1), "lumbar", PRESET, seed=1, index=3)
if QUICK:  # N4 takes 1-4 CPU-s per setting even on a small station
    SETTINGS, STATIONS = [DEFAULT], STATIONS[5:]


def correlation(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return float(np.corrcoef(np.log(a[where]), np.log(b[where]))[0, 1])


def run(ph, settings):
    t = time.process_time()
    result = preprocess.bias_correct(ph.image, ph.affine, threads=1, **settings)
    return result.bias, time.process_time() - t


def label(s):
    return f"{','.join(map(str, s['shrink']))} / {len(s['iterations'])}x{s['iterations'][0]} / {s['bias_fwhm']}"


print(f"{'shrink / levels x iter / fwhm':<32}{'CPU s (median)':>16}{'r vs true: min':>16}{'median':>8}")
rows = {}
for s in SETTINGS:
    out = [run(ph, s) for ph in STATIONS]
    cpu = float(np.median([t for _, t in out]))
    r = [correlation(b, ph.bias, ph.bias_free > 150) for (b, _), ph in zip(out, STATIONS)]
    rows[label(s)] = (cpu, min(r), out)
    print(f"{label(s):<32}{cpu:>16.1f}{min(r):>16.4f}{np.median(r):>8.4f}", flush=True)

cpu, r_true, out = rows[label(DEFAULT)]
summary = {"figure": f"N4 per {'small' if QUICK else 'NAKO-size'} image, default settings", "settings": label(DEFAULT),
           "cpu_s": round(cpu, 1), "r_vs_true": round(r_true, 4), "goal": {"cpu_s": 15, "r_vs_full": 0.997, "r_vs_true": 0.99}}
if not QUICK:
    lumbar = STATIONS[5]
    full_bias, full_cpu = run(lumbar, {**DEFAULT, "shrink": (1, 1, 1)})
    r_full = correlation(out[5][0], full_bias, lumbar.bias_free > 150)
    print(f"anchor: full resolution, lumbar: {full_cpu:.1f} CPU-s, r vs true {correlation(full_bias, lumbar.bias, lumbar.bias_free > 150):.4f}")
    print(f"default vs full resolution: r = {r_full:.4f}, CPU ratio {out[5][1] / full_cpu:.3f}")
    summary |= {"anchor_full_res_cpu_s": round(full_cpu, 1), "r_vs_full": round(r_full, 4),
                "ratio_to_anchor": round(out[5][1] / full_cpu, 3)}
print(json.dumps(summary))
