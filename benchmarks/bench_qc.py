"""What the fold-agreement QC adds to `average_folds`, per NAKO-size image, one core.

Goal (issue 17): <= 10 % of the stage's time. Anchor, measured in this run: the stage's own work
on three folds' float16 logits (15 classes x 50 x 512 x 512) that it cannot do without, reading
them (blosc2), the exact average and its argmax; the stage also resamples and cleans the mask, so
the true ratio is lower. QC: each fold's own argmax, SPINEPS ids, and the mean pairwise DSC of
every label. Medians of 3. Run with `taskset -c 0`. `--quick`: 15 x 10 x 64 x 64 logits, one
measurement (tests/test_benchmarks.py). Last line: JSON.
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from spinecohort import io
from spinecohort.labels import SEMANTIC_NAMES
from spinecohort.metrics import fold_agreement
from spinecohort.semantic import average_fold_logits, fold_label_maps, read_model_config

torch.set_num_threads(1)
# --quick: a few seconds on tiny inputs, so the test suite can check the script still runs.
QUICK = "--quick" in sys.argv
SHAPE, REPEATS = ((15, 10, 64, 64), 1) if QUICK else ((15, 50, 512, 512), 3)  # quick: y, x still multiples of the noise blocks (8)
LABELS = read_model_config(Path(__file__).resolve().parents[1] / "resources" / "demo_models" / "semantic").labels
STRUCTURES = {SEMANTIC_NAMES[i]: [i] for i in sorted(set(LABELS.values()))}


def fold_logits(rng: np.random.Generator, seed_field: np.ndarray) -> np.ndarray:
    """A fold's logits: one smooth class field shared by the folds, plus fold noise (they mostly agree)."""
    noise = rng.normal(scale=0.6, size=(SHAPE[0], SHAPE[1], SHAPE[2] // 8, SHAPE[3] // 8)).astype(np.float32)
    noise = noise.repeat(8, 2).repeat(8, 3)
    return (seed_field + noise).astype(np.float16)


rng = np.random.default_rng(0)
field = rng.normal(size=(SHAPE[0], SHAPE[1] // 5 + 1, SHAPE[2] // 32 + 1, SHAPE[3] // 32 + 1)).astype(np.float32) * 3
field = field.repeat(5, 1).repeat(32, 2).repeat(32, 3)[:, : SHAPE[1], : SHAPE[2], : SHAPE[3]]
with tempfile.TemporaryDirectory() as tmp:
    paths = [Path(tmp) / f"fold{k}.b2nd" for k in range(3)]
    for path in paths:
        io.save_logits(path, fold_logits(rng, field))
    anchor, qc = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        logits = [io.load_logits(p) for p in paths]
        torch.from_numpy(average_fold_logits(logits)).argmax(dim=0)
        t1 = time.perf_counter()
        fold_agreement(fold_label_maps(logits, LABELS), STRUCTURES)
        anchor.append(t1 - t0)
        qc.append(time.perf_counter() - t1)

a, q = statistics.median(anchor), statistics.median(qc)
print(f"{'step':<52}{'median s':>10}")
print(f"{'read 3 folds + average + argmax (anchor)':<52}{a:>10.2f}")
print(f"{'fold agreement (3 argmax, ids, pairwise DSC)':<52}{q:>10.2f}")
print(json.dumps({"figure": f"fold-agreement QC per {'tiny' if QUICK else 'NAKO-size'} image, one core", "qc_s": round(q, 2), "anchor_s": round(a, 2),
                  "ratio_to_anchor": round(q / a, 3), "goal": {"ratio": 0.10}}))
