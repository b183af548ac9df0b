"""Fold split cost and per-fold logits output.

Goals (issue 3):
- 3 per-fold jobs + averaging <= 1.15x the wall time of nnU-Net's in-process
  3-fold prediction of the same images (anchor, measured in this run). Each
  fold "job" here loads its fold once and predicts every image, writes blosc2
  logits; averaging reads them back and writes the segmentation, as the rules do.
- per-fold output at NAKO size (15 classes x 512x512x50 float16) <= 180 MiB and
  <= 3 s to write (anchor: nnU-Net's own .npz of the same logits).
Random-weight demo model on CPU, 2 threads. `--quick`: one image cropped to one patch, one
round, logits of 15 x 64 x 64 x 10 (tests/test_benchmarks.py). Last line: JSON.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from spinecohort import io, preprocess, semantic
from spinecohort.models import write_random_semantic_model
from spinecohort.phantom import PRESETS, make_subject, render_station

torch.set_num_threads(2)
# --quick: a few seconds on tiny inputs, so the test suite can check the script still runs.
QUICK = "--quick" in sys.argv
N_IMAGES, ROUNDS = (1, 1) if QUICK else (3, 2)
LOGITS_SHAPE = (15, 64, 64, 10) if QUICK else (15, 512, 512, 50)  # classes x NAKO size


def wall(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def synthetic_logits(shape, rng, noise):
    """Logits that vary smoothly in space, plus voxel noise of `noise` (0: saturated, piecewise constant maps)."""
    coarse = rng.normal(size=(shape[0], shape[1] // 16 + 1, shape[2] // 16 + 1, shape[3] // 5 + 1)).astype(np.float32)
    up = coarse.repeat(16, 1).repeat(16, 2).repeat(5, 3)[:, : shape[1], : shape[2], : shape[3]]
    if noise == 0:
        return np.round(np.clip(up * 4, -8, 8)).astype(np.float16)
    return (up * 4 + rng.normal(scale=noise, size=shape).astype(np.float32)).astype(np.float16)


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    folder = write_random_semantic_model(tmp / "model")
    model = semantic.read_model_config(folder)
    (tmp / "in").mkdir()
    cases = []
    for k in range(N_IMAGES):
        ph = render_station(make_subject(k, 1), ("cervical", "thoracic", "lumbar")[k % 3], PRESETS["small"], seed=k, index=1)
        img, aff = preprocess.to_model_space(ph.image, ph.affine, orientation=model.orientation, spacing=model.spacing)
        if QUICK:
            img = img[:96, :96]  # one (16, 96, 96) patch of the model: a corner, same affine
        cases.append(tmp / "in" / f"case{k}_0000.nii.gz")
        io.save_nifti(cases[-1], img, aff, dtype=np.float32)

    def fold_job(fold):
        predictor = semantic.FoldPredictor(model, fold, device="cpu", threads=2)
        for k, path in enumerate(cases):
            logits, props = predictor.predict(path)
            io.save_logits(tmp / f"f{fold}_{k}.b2nd", logits)
            io.write_json(tmp / f"f{fold}_{k}.json", props)

    def average_job():
        for k in range(N_IMAGES):
            logits = semantic.average_fold_logits([io.load_logits(tmp / f"f{f}_{k}.b2nd") for f in model.folds])
            seg = semantic.logits_to_segmentation(folder, logits, io.read_json(tmp / f"f0_{k}.json"))
            io.save_nifti(tmp / f"seg{k}.nii.gz", seg, np.eye(4), dtype=np.uint8)

    def in_process():
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, perform_everything_on_device=False,
                            device=torch.device("cpu"), verbose=False, allow_tqdm=False)
        p.initialize_from_trained_model_folder(str(folder), use_folds=tuple(model.folds))
        (tmp / "ref").mkdir(exist_ok=True)
        p.predict_from_files_sequential(str(tmp / "in"), str(tmp / "ref"))

    split_times, anchor_times = [], []
    for _ in range(ROUNDS):  # alternate, so drift on a noisy machine hits both
        _, t_anchor = wall(in_process)
        fold_times = [wall(lambda f=f: fold_job(f))[1] for f in model.folds]
        _, t_avg = wall(average_job)
        anchor_times.append(t_anchor)
        split_times.append(sum(fold_times) + t_avg)
    split, anchor = float(np.median(split_times)), float(np.median(anchor_times))

    rng = np.random.default_rng(0)
    sizes = {}
    for noise in (0.0, 0.05):
        logits = synthetic_logits(LOGITS_SHAPE, rng, noise)
        _, t_b2 = wall(lambda logits=logits: io.save_logits(tmp / "nako.b2nd", logits))
        sizes[noise] = ((tmp / "nako.b2nd").stat().st_size / 2**20, t_b2)
    mib_b2, t_b2 = sizes[0.0]
    _, t_read = wall(lambda: io.load_logits(tmp / "nako.b2nd"))
    _, t_npz = wall(lambda: np.savez_compressed(tmp / "nako.npz", probabilities=logits.astype(np.float32)))
    mib_npz = (tmp / "nako.npz").stat().st_size / 2**20

print(f"{'case':<48}{'value':>12}{'goal':>10}")
print(f"{f'{N_IMAGES} images: 3 fold jobs + averaging (s)':<48}{split:>12.2f}")
print(f"{f'{N_IMAGES} images: nnU-Net in-process 3 folds (anchor, s)':<48}{anchor:>12.2f}")
print(f"{'ratio split / in-process':<48}{split / anchor:>12.3f}{'<= 1.15':>10}")
print(f"{'NAKO-size fold logits, saturated, blosc2 (MiB)':<48}{mib_b2:>12.1f}{'<= 180':>10}")
print(f"{'  write (s)':<48}{t_b2:>12.2f}{'<= 3':>10}")
print(f"{'NAKO-size fold logits, noise 0.05 (MiB)':<48}{sizes[0.05][0]:>12.1f}{'<= 180':>10}")
print(f"{'  write (s)':<48}{sizes[0.05][1]:>12.2f}{'<= 3':>10}")
print(f"{'  read, noisy (s)':<48}{t_read:>12.2f}")
print(f"{'anchor: nnU-Net-style npz (MiB / write s)':<48}{mib_npz:>7.1f} / {t_npz:.1f}")
print(json.dumps({"figure": "fold split and per-fold logits", "split_s": round(split, 2), "anchor_in_process_s": round(anchor, 2),
                  "ratio_to_anchor": round(split / anchor, 3), "logits_mib": round(mib_b2, 1), "logits_write_s": round(t_b2, 2),
                  "noisy_logits_mib": round(sizes[0.05][0], 1), "noisy_logits_write_s": round(sizes[0.05][1], 2),
                  "anchor_npz_mib": round(mib_npz, 1), "anchor_npz_write_s": round(t_npz, 1),
                  "goal": {"ratio": 1.15, "logits_mib": 180, "logits_write_s": 3}}))
