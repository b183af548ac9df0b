"""Instance phase cost at NAKO size, without and with the network.

Goals (issue 4): assembly without the network forward (centres, cutouts,
merging, clean-up, numbering) for a NAKO-size image <= 5 CPU-s; forward time
per (248, 304, 64) cutout on CPU reported (SPINEPS-size network, dim 16).
Restore's id claim on the input grid (`instances.claim_instances`: every
semantic structure voxel gets an instance id) is timed against resampling the
instance mask onto that grid.
The forward uses an oracle predictor (true above/centre/below masks) so the
assembly time is that of a realistic, well-predicted image. Anchor: resampling
the semantic mask into instance space (nearest neighbour), same run.
One thread (`taskset -c 0`). `--quick`: a `small` phantom on the demo instance model's grid and
cutout, (1.875, 1.875, 2.2) mm and (72, 88, 32) (tests/test_benchmarks.py). Last line: JSON.
"""

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_instances import oracle  # noqa: E402

from spinecohort import geometry, instances  # noqa: E402
from spinecohort.instance_net import InstanceUNet  # noqa: E402
from spinecohort.models import spineps_voxels  # noqa: E402
from spinecohort.phantom import PRESETS, make_subject, render_station  # noqa: E402

torch.set_num_threads(1)
# --quick: a few seconds on tiny inputs, so the test suite can check the script still runs.
QUICK = "--quick" in sys.argv
PRESET = "small" if QUICK else "nako"
SPACING, CUTOUT = ((1.875, 1.875, 2.2), (72, 88, 32)) if QUICK else ((0.75, 0.75, 1.65), (248, 304, 64))  # quick: the demo model's
SPINEPS = instances.InstanceModel(path=".", orientation=("P", "I", "R"), spacing=SPACING, cutout=CUTOUT,  # its default thresholds
                                  corpus_size_cleaning=spineps_voxels(100, SPACING), vert_size_threshold=spineps_voxels(250, SPACING))


def cpu(fn):
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


ph = render_station(make_subject(0, 1), "lumbar", PRESETS[PRESET], seed=0, index=1)
grid = geometry.target_grid(ph.semantic.shape, ph.affine, SPINEPS.orientation, SPINEPS.spacing)
(seg, anchor_s) = cpu(lambda: geometry.resample(ph.semantic, ph.affine, grid, kind="nearest"))
ref = geometry.resample(ph.instance, ph.affine, grid, kind="nearest")
predict = oracle(ref, SPINEPS.cutout)
predict_s = [0.0]


def timed_oracle(onehot, origins):  # oracle time is not assembly time
    t = time.process_time()
    out = predict(onehot, origins)
    predict_s[0] += time.process_time() - t
    return out


(out, note), total_s = cpu(lambda: instances.assemble(seg, SPINEPS, timed_oracle, "lumbar"))
assembly_s = total_s - predict_s[0]
on_input, resample_s = cpu(lambda: geometry.resample(out, grid[1], (ph.semantic.shape, ph.affine), kind="nearest"))
(_, unclaimed), claim_s = cpu(lambda: instances.claim_instances(
    ph.semantic.copy(), on_input, geometry.spacing_of(ph.affine), radius_mm=2 * max(SPINEPS.spacing)))
n_cutouts = len(instances.corpus_centres(seg, min_voxels=SPINEPS.corpus_min_voxels))

net = InstanceUNet(dim=16).eval()
x = torch.zeros(1, 10, *SPINEPS.cutout)
with torch.inference_mode():
    net(x)  # warm-up
    _, forward_s = cpu(lambda: net(x))

print(f"{'case':<56}{'CPU s':>10}{'goal':>8}")
print(f"{f'anchor: semantic -> instance space, {seg.shape}':<56}{anchor_s:>10.2f}")
print(f"{f'assembly without forward ({n_cutouts} cutouts, {len(np.unique(out)) - 1} labels)':<56}{assembly_s:>10.2f}{'<= 5':>8}")
print(f"{f'restore: instance mask -> input grid {ph.semantic.shape}':<56}{resample_s:>10.2f}")
print(f"{f'restore: claim ids for the semantic voxels ({unclaimed} unclaimed)':<56}{claim_s:>10.2f}")
print(f"{f'forward, one {SPINEPS.cutout} cutout, dim 16, 1 thread':<56}{forward_s:>10.2f}")
print(json.dumps({"figure": f"instance phase, {'small' if QUICK else 'NAKO-size'} lumbar phantom", "assembly_cpu_s": round(assembly_s, 2),
                  "anchor_resample_cpu_s": round(anchor_s, 2), "ratio_to_anchor": round(assembly_s / anchor_s, 1),
                  "cutouts": n_cutouts, "claim_cpu_s": round(claim_s, 2), "restore_resample_cpu_s": round(resample_s, 2), "forward_per_cutout_cpu_s": round(forward_s, 2), "goal": {"assembly_cpu_s": 5}}))
