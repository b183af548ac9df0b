"""The GPU path (issue 20): images per hour of `predict-fold`, `assemble-instances` and `label-vertebrae` on a device,
how far its masks and levels agree with the CPU's, and SPINEPS's own predictor on the same models where its
environment is given. The labelling model is one of random weights in the released layout (DenseNet169, 152 x 168
x 32 cutouts, heads x100; `labeling_net.write_labeling_model`), run on the phantoms' reference masks.

NAKO-size phantoms (448x448x15), the shipped demo models. N4 and resampling run once on the CPU; then per
device (the GPU, then the CPU): the three fold jobs, averaging and the instance job, each a real
`spinecohort` process; images per hour from each job's wall time, start-up included (its log's last
line). Agreement: share of the foreground (either mask) with the same label, semantic and instance masks,
device against CPU. Overlap (issue 20): how busy fold 0's job keeps the network (its log's busy line) against the
same calls one after another in a fresh process (read, predict, write per image: the anchor), on the device; the
two must write the same bytes. `--spineps PYTHON`: `spineps dataset --no-n4 -ml none` on our N4 images on the device.
Run by benchmarks/gpu.sh. `--quick`: one small image, CPU against CPU (tests/test_benchmarks.py). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from spinecohort import io, layout
from spinecohort.labeling_net import random_labeling_net, write_labeling_model
from spinecohort.phantom import write_cohort
from spinecohort.runtime import COST_LINE, NETWORK_BUSY_LINE, keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "resources" / "demo_models"
BATCH = "b0001"


def job(stage: str, manifest: Path, out: Path, *args: str, threads: int) -> str:
    """Run one stage job over the batch; its log."""
    cmd = [sys.executable, "-m", "spinecohort.cli", stage, "--manifest", str(manifest), "--batch", BATCH,
           "--out", str(out), "--threads", str(threads), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{stage} failed:\n{proc.stderr[-3000:]}")
    return proc.stderr


def wall_of(log: str) -> float:
    """A job's wall seconds as it measured them (its cost line)."""
    return float(COST_LINE.findall(log)[-1][2])


def one_after_another(model: str, resampled: str, ids: list[str], out: str, device: str, threads: int) -> None:
    """Fold 0 without the overlap: the job's calls, image after image; prints [batch wall s, network busy share].

    Runs in a fresh process of its own (`--one-after-another`), as the job does: a warm process gets faster.
    """
    from spinecohort.semantic import FoldPredictor, read_model_config

    keep_freed_memory()  # as every job does
    predictor = FoldPredictor(read_model_config(Path(model)), 0, device=device, threads=threads)
    started = time.monotonic()
    for i in ids:
        data, props = predictor.prepare(layout.model_input(Path(resampled), i))
        logits = predictor.logits(data)
        io.write_json(layout.fold_properties(Path(out), i), props)
        io.save_logits(layout.fold_logits(Path(out), i), logits)
    wall = time.monotonic() - started
    print(json.dumps([wall, predictor.network_seconds / wall]))


def one_after_another_in_a_fresh_process(**spec: object) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--one-after-another", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall, busy = json.loads(proc.stdout.splitlines()[-1])
    return wall, busy


def references_as_restored(manifest: Path, out: Path) -> Path:
    """A restore folder that holds the phantoms' reference masks (links) and a ledger of finished images."""
    table = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    out.mkdir(parents=True)
    for row in table.itertuples():
        (out / layout.derivative_name(row.image_id, "vert")).symlink_to(manifest.parent / row.reference_instance)
        (out / layout.derivative_name(row.image_id, "spine")).symlink_to(manifest.parent / row.reference_semantic)
    io.write_tsv(
        out / layout.LEDGER, pd.DataFrame({"image_id": table.image_id, "stage": "restore", "status": "ok", "message": ""})
    )
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    foreground = (a > 0) | (b > 0)
    return float(((a == b) & foreground).sum() / max(int(foreground.sum()), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=6, help="a multiple of 3 (whole subjects)")
    parser.add_argument("--spineps", type=Path, help="the python of a SPINEPS 2.1.3 environment")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one-after-another", help=argparse.SUPPRESS)  # the anchor's own process: its arguments, JSON
    args = parser.parse_args()
    if args.one_after_another:
        return one_after_another(**json.loads(args.one_after_another))
    preset = "small" if args.quick else "nako"
    if args.quick:
        args.device, args.images = "cpu", 3
    threads = len(os.sched_getaffinity(0))
    semantic_model, instance_model = MODELS / "semantic" / "inference_config.json", MODELS / "instance" / "inference_config.json"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_cohort(tmp / "cohort", subjects=max(1, args.images // 3), preset=preset, batch_size=args.images)
        ids = [line.split("\t")[3] for line in manifest.read_text().splitlines()[1:]]
        n4, resampled = tmp / "n4", tmp / "resampled"
        restored = references_as_restored(manifest, tmp / "restored")
        labeling_model = tmp / "labeling_model"
        write_labeling_model(labeling_model, random_labeling_net(backbone="DENSENET121" if args.quick else "DENSENET169", scale=100),
                             final_size=(96, 96, 32) if args.quick else (152, 168, 32))  # fmt: skip
        job("bias-correct", manifest, n4, threads=threads)
        job("resample", manifest, resampled, "--input", str(n4), "--model", str(semantic_model), threads=threads)
        wall: dict[str, dict[str, float]] = {}
        busy: dict[str, tuple[float, float]] = {}  # device -> fold 0's (network busy share, batch wall s)
        for device in dict.fromkeys(("cpu", args.device)):  # the CPU first: the device's instance job reads its masks
            w, folds = {}, []
            for fold in range(3):
                folds.append(tmp / device / f"fold{fold}")
                log = job("predict-fold", manifest, folds[-1], "--input", str(resampled), "--model",
                          str(semantic_model), "--fold", str(fold), "--device", device, threads=threads)  # fmt: skip
                w[f"fold{fold}"] = wall_of(log)
                if fold == 0:
                    _, percent, seconds = NETWORK_BUSY_LINE.findall(log)[-1]
                    busy[device] = (int(percent) / 100, float(seconds))
            w["average"] = wall_of(job("average-folds", manifest, tmp / device / "semantic", "--folds", *map(str, folds),
                               "--resampled", str(resampled), "--model", str(semantic_model), threads=threads))  # fmt: skip
            # Every device's instance job starts from the CPU's semantic masks: their agreement is the instance phase's alone.
            w["instances"] = wall_of(job("assemble-instances", manifest, tmp / device / "instances", "--input", str(tmp / "cpu" / "semantic"),
                                 "--model", str(instance_model), "--device", device, threads=threads))  # fmt: skip
            w["labeling"] = wall_of(job("label-vertebrae", manifest, tmp / device / "labeling", "--restore", str(restored),
                                "--model", str(labeling_model), "--device", device, threads=threads))  # fmt: skip
            wall[device] = w
        anchor = tmp / "one_after_another"
        anchor_wall, anchor_busy = one_after_another_in_a_fresh_process(
            model=str(semantic_model.parent), resampled=str(resampled), ids=ids, out=str(anchor), device=args.device,
            threads=threads,
        )  # fmt: skip
        same_bytes = all(
            layout.fold_logits(anchor, i).read_bytes() == layout.fold_logits(tmp / args.device / "fold0", i).read_bytes()
            and layout.fold_properties(anchor, i).read_bytes()
            == layout.fold_properties(tmp / args.device / "fold0", i).read_bytes()
            for i in ids
        )
        semantic_agree = [agreement(io.load_mask(layout.raw_semantic(tmp / args.device / "semantic", i))[0],
                                    io.load_mask(layout.raw_semantic(tmp / "cpu" / "semantic", i))[0]) for i in ids]  # fmt: skip
        instance_agree = [agreement(io.load_mask(layout.raw_instances(tmp / args.device / "instances", i))[0],
                                    io.load_mask(layout.raw_instances(tmp / "cpu" / "instances", i))[0]) for i in ids]  # fmt: skip
        levels = {d: pd.read_csv(tmp / d / "labeling" / layout.LABELING_TABLE, sep="\t") for d in wall}
        posterior_columns = [c for c in levels["cpu"].columns if c.split("_")[0].isupper()]  # <HEAD>_<class>
        levels_equal = levels[args.device]["level_id"].tolist() == levels["cpu"]["level_id"].tolist()
        posterior_difference = float(
            np.abs(levels[args.device][posterior_columns].to_numpy() - levels["cpu"][posterior_columns].to_numpy()).max()
        )
        spineps = None
        if args.spineps:
            data = tmp / "spineps"
            for i in ids:  # our N4 images, so its predictor gets what ours got
                target = data / "rawdata" / f"sub-{i.split('_')[0].removeprefix('sub-')}" / "anat" / f"{i}_T2w.nii.gz"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(layout.n4_image(n4, i), target)
            started = time.monotonic()
            proc = subprocess.run([str(args.spineps), "-m", "spineps.entrypoint", "dataset", "-i", str(data), "-ms",
                                   str(semantic_model.parent), "-mi", str(instance_model.parent), "-ml", "none", "--no-n4"]
                                  + (["--cpu"] if args.device == "cpu" else []), capture_output=True, text=True)  # fmt: skip
            total = time.monotonic() - started
            pipeline = sum(map(float, re.findall(r"Pipeline took: ([\d.]+) seconds", proc.stdout + proc.stderr)))
            spineps = {"finished": proc.returncode == 0, "wall_s": round(total, 1), "pipeline_s": round(pipeline, 1),
                       "images_per_hour_pipeline": round(3600 * len(ids) / pipeline, 1) if pipeline else None}  # fmt: skip

    def per_hour(seconds: float) -> float:
        return round(3600 * len(ids) / seconds, 1)

    print(f"{len(ids)} {preset} images, {threads} threads; images per hour of each job (start-up included)")
    for device, w in wall.items():
        print(f"  {device:<6}" + "  ".join(f"{k} {per_hour(v)}" for k, v in w.items()))
    print(
        f"  agreement {args.device} vs cpu: semantic min {min(semantic_agree):.5f}, instances min {min(instance_agree):.5f}, "
        f"levels equal {levels_equal} (posteriors within {posterior_difference:.2g})"
    )
    job_busy, job_wall = busy[args.device]
    print(
        f"  fold 0 on {args.device}: network busy {job_busy:.0%} of {job_wall:.1f} s; one after another {anchor_busy:.0%} of "
        f"{anchor_wall:.1f} s ({job_wall / anchor_wall:.2f}x the anchor's wall); same bytes: {same_bytes}"
    )
    if spineps:
        print(f"  SPINEPS 2.1.3 on {args.device}: {spineps}")
    print(json.dumps({
        "figure": f"{args.device}: images per hour, {len(ids)} {preset} images", "device": args.device,
        "predict_fold_images_per_hour": per_hour(np.median([wall[args.device][f"fold{f}"] for f in range(3)])),
        "assemble_instances_images_per_hour": per_hour(wall[args.device]["instances"]),
        "cpu_predict_fold_images_per_hour": per_hour(np.median([wall["cpu"][f"fold{f}"] for f in range(3)])),
        "cpu_assemble_instances_images_per_hour": per_hour(wall["cpu"]["instances"]),
        "label_vertebrae_images_per_hour": per_hour(wall[args.device]["labeling"]),
        "cpu_label_vertebrae_images_per_hour": per_hour(wall["cpu"]["labeling"]),
        "semantic_agreement_min": round(min(semantic_agree), 6), "instance_agreement_min": round(min(instance_agree), 6),
        "levels_equal": levels_equal, "posterior_difference_max": posterior_difference,
        "fold_network_busy": job_busy, "one_after_another_network_busy": round(anchor_busy, 2),
        "fold_batch_wall_vs_one_after_another": round(job_wall / anchor_wall, 3), "overlap_same_bytes": same_bytes,
        "spineps": spineps,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
