"""Per-fold logit bytes at SPINEPS's resolution, with logits a trained network gives (issue 20).

Random weights give logits of no realistic structure, so this first trains a small semantic model at
(0.75, 0.75, 1.65) mm on NAKO-size phantoms (the demo architecture, fold 0 only, 500 steps: minutes on
one core; kept in --work for the next run), then predicts NAKO-size
stations of other subjects with it, as a fold job does (N4, resample, nnU-Net sliding window), and
writes each image's float16 logits with every lossless blosc2 setting below: MiB, write and read
seconds, and a check that the bytes read back are the bytes written (bit-exact, so the averaging of
stored folds stays nnU-Net's own). The first row is `io.save_logits`, what the fold jobs write.
--quick: the shipped demo model on one small image (tests/test_benchmarks.py). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spinecohort import io, preprocess
from spinecohort.phantom import PRESETS, make_subject, render_station
from spinecohort.semantic import FoldPredictor, read_model_config

ROOT = Path(__file__).resolve().parents[1]
DEMO_SEMANTIC = ROOT / "resources" / "demo_models" / "semantic"
SPACING = (0.75, 0.75, 1.65)  # mm, (P, I, R): SPINEPS's semantic grid
GOAL_MIB = 120.0
EPOCHS = 20  # x 25 steps of 2 patches (128 x 128 x 16)


def train_model(work: Path) -> Path:
    """Fold 0 of the demo architecture at SPACING, trained briefly on 4 NAKO-size phantom subjects.

    From scratch: the shipped demo model predates two labels, so its weights do not fit. Steps whose
    output exists are not rerun.
    """
    model = work / "model"
    spacing = [str(s) for s in SPACING]
    train = work / "train"
    common = ["--root", str(train), "--dataset-id", "902", "--threads", "1"]
    steps = [
        (work / "cohort" / "cohort.tsv",
         ["phantom", str(work / "cohort"), "--subjects", "4", "--seed", "101", "--first-index", "101", "--preset", "nako"]),
        (train / "nnUNet_raw" / "Dataset902_SpineCohort" / "splits_final.json",
         ["train-semantic-data", *common, "--manifest", str(work / "cohort" / "cohort.tsv"), "--spacing", *spacing, "--folds", "2"]),
        (train / "nnUNet_preprocessed" / "Dataset902_SpineCohort" / "splits_final.json",
         ["train-semantic-plan", *common, "--spacing", *spacing, "--patch-size", "128", "128", "16", "--features", "8", "16", "32", "64", "64"]),
        (train / "nnUNet_results" / "Dataset902_SpineCohort" / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth",
         ["train-semantic-fold", *common, "--fold", "0", "--epochs", str(EPOCHS), "--iterations-per-epoch", "25",
          "--val-iterations-per-epoch", "2", "--device", "cpu"]),
        (model / "inference_config.json",
         ["export-semantic-model", *common, "--folds", "1", "--out", str(model), "--spacing", *spacing, "--name", "bench_logits"]),
    ]  # fmt: skip
    for done, step in steps:
        if not done.is_file():
            print("spinecohort", step[0], flush=True)
            subprocess.run([sys.executable, "-m", "spinecohort.cli", *step], check=True, stdout=subprocess.DEVNULL)
    return model


def model_inputs(folder: Path, preset: str, subjects: int, model: Path) -> list[Path]:
    """Stations of `subjects` unseen subjects, N4-corrected and resampled to the model's grid, as NIfTI."""
    config = read_model_config(model)
    paths = []
    for s in range(subjects):
        for region in ("cervical", "thoracic", "lumbar"):
            ph = render_station(make_subject(s, 1), region, PRESETS[preset], seed=s, index=1)
            corrected = preprocess.bias_correct(ph.image, ph.affine).corrected
            image, affine = preprocess.to_model_space(corrected, ph.affine, orientation=config.orientation, spacing=config.spacing)
            paths.append(folder / f"s{s}_{region}_0000.nii.gz")
            io.save_nifti(paths[-1], image, affine, dtype=np.float32)
    return paths


def codecs() -> dict[str, object]:
    """Lossless blosc2 settings to compare; each entry's CParams."""
    import blosc2

    Z, F = blosc2.Codec.ZSTD, blosc2.Filter
    return {
        "zstd-1 + byte shuffle (as before)": blosc2.CParams(codec=Z, clevel=1, filters=[F.SHUFFLE], nthreads=2),
        "zstd-1 + bit shuffle": blosc2.CParams(codec=Z, clevel=1, filters=[F.BITSHUFFLE], nthreads=2),
        "zstd-1 + byte shuffle + bytedelta": blosc2.CParams(codec=Z, clevel=1, filters=[F.SHUFFLE, F.BYTEDELTA], nthreads=2),
        "zstd-3 + byte shuffle + bytedelta": blosc2.CParams(codec=Z, clevel=3, filters=[F.SHUFFLE, F.BYTEDELTA], nthreads=2),
        "zstd-5 + byte shuffle + bytedelta": blosc2.CParams(codec=Z, clevel=5, filters=[F.SHUFFLE, F.BYTEDELTA], nthreads=2),
    }


def measure(logits: np.ndarray, folder: Path) -> dict[str, dict[str, float]]:
    import blosc2

    rows: dict[str, dict[str, float]] = {}
    path = folder / "logits.b2nd"
    t = time.perf_counter()
    io.save_logits(path, logits)
    write = time.perf_counter() - t
    t = time.perf_counter()
    back = io.load_logits(path)
    rows["io.save_logits (the fold jobs)"] = {"mib": path.stat().st_size / 2**20, "write_s": write, "read_s": time.perf_counter() - t,
                                             "exact": bool(np.array_equal(back.view(np.uint16), logits.view(np.uint16)))}  # fmt: skip
    for name, cparams in codecs().items():
        path.unlink()
        t = time.perf_counter()
        blosc2.asarray(logits, urlpath=str(path), mode="w", cparams=cparams)
        write = time.perf_counter() - t
        t = time.perf_counter()
        back = blosc2.open(str(path))[:]
        rows[name] = {"mib": path.stat().st_size / 2**20, "write_s": write, "read_s": time.perf_counter() - t,
                      "exact": bool(np.array_equal(back.view(np.uint16), logits.view(np.uint16)))}  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "bench_logits", help="keeps the trained model")
    parser.add_argument("--subjects", type=int, default=1, help="unseen subjects predicted (3 stations each)")
    parser.add_argument("--quick", action="store_true", help="the demo model, one small station")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = DEMO_SEMANTIC if args.quick else train_model(args.work)
        inputs = model_inputs(tmp, "small" if args.quick else "nako", args.subjects, model)[: 1 if args.quick else None]
        predictor = FoldPredictor(read_model_config(model), 0, device="cpu", threads=1)
        table: dict[str, list[dict[str, float]]] = {}
        shapes = []
        for path in inputs:
            logits, _ = predictor.predict(path)
            shapes.append(list(logits.shape))
            for name, row in measure(logits, tmp).items():
                table.setdefault(name, []).append(row)
    print(f"model {model.name}, logits per fold per image {shapes} (classes, R, I, P) float16 = {np.prod(shapes[0]) * 2 / 2**20:.0f} MiB raw")
    print(f"{'lossless setting':<40}{'MiB max':>9}{'MiB median':>12}{'write s':>9}{'read s':>8}  exact")
    for name, rows in table.items():
        print(f"{name:<40}{max(r['mib'] for r in rows):>9.1f}{statistics.median(r['mib'] for r in rows):>12.1f}"
              f"{statistics.median(r['write_s'] for r in rows):>9.2f}{statistics.median(r['read_s'] for r in rows):>8.2f}  {all(r['exact'] for r in rows)}")  # fmt: skip
    ours = table["io.save_logits (the fold jobs)"]
    assert all(r["exact"] for rows in table.values() for r in rows), "a lossless setting did not read back its bytes"
    print(json.dumps({"figure": "per-fold logits, MiB per NAKO-size image (largest)", "value": round(max(r["mib"] for r in ours), 1),
                      "anchor": "raw float16 MiB", "anchor_value": round(float(np.prod(shapes[0])) * 2 / 2**20, 1),
                      "write_s": round(statistics.median(r["write_s"] for r in ours), 2), "goal": f"<= {GOAL_MIB} MiB",
                      "shape": shapes[0]}))  # fmt: skip


if __name__ == "__main__":
    main()
