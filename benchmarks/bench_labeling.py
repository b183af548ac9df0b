"""The label-vertebrae stage against SPINEPS 2.1.3's labelling phase: the same model and images, one core (issue 38).

Images: phantom stations (`phantom.write_cohort`); their reference masks stand in for the restored masks (the same
kind of masks, on the input grid). Model: a random-weight SPINEPS labelling folder made with SPINEPS's own classes
(tests/spineps_labelling_side.py make-model: DenseNet169, 152 x 168 x 32 cutouts, as released).
Ours: in this process on one thread, per image: reading the image and masks, cutouts, heads and the exact search
(`labeling.station_cutouts`, `labeling.label_station`), CPU seconds. SPINEPS: its `perform_labeling_step` in its own
environment on one thread, after its post-processing crop, CPU seconds of that call (tests/spineps_labelling_side.py
run). Both without start-up and model loading. Ratio: ours over SPINEPS's CPU-s per image (median of the rounds).
--quick: one station, one round, a DenseNet121 with 96 x 96 x 32 cutouts (tests/test_benchmarks.py). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from spineps_env import spineps_python  # noqa: E402

from spinecohort import io  # noqa: E402
from spinecohort.labeling import label_station, station_cutouts, stored_type  # noqa: E402
from spinecohort.labeling_net import load_labeling_model  # noqa: E402
from spinecohort.phantom import write_cohort  # noqa: E402

SIDE = ROOT / "tests" / "spineps_labelling_side.py"


def side(*args: object) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([spineps_python(), SIDE, *map(str, args)], capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
    return proc.stdout


def ours(model, image: Path, vert: Path, spine: Path) -> tuple[float, int]:
    """CPU seconds of labelling one station, and its vertebrae."""
    start = time.process_time()
    data, affine = io.load_image(image)
    instance, semantic = io.load_mask(vert)[0], io.load_mask(spine)[0]
    cutouts = station_cutouts(stored_type(image, data), affine, instance, semantic, orientation=model.orientation,
                              resolution_range=model.config["resolution_range"], size=model.final_size)  # fmt: skip
    label_station(cutouts, model)
    return time.process_time() - start, len(cutouts.ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one station, one round")
    parser.add_argument("--subjects", type=int, default=1, help="phantom subjects (3 stations each)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = write_cohort(work / "cohort", subjects=args.subjects, preset="small")
        rows = io_rows(manifest)[: 1 if args.quick else None]
        small = ("--backbone", "DENSENET121", "--final-size", 96, 96, 32) if args.quick else ()  # quick: that it runs
        side("make-model", work / "model", "--seed", 0, "--scale", 100, *small)
        model = load_labeling_model(work / "model")
        rounds = 1 if args.quick else args.rounds
        our_s, their_s, vertebrae = [], [], 0
        for _ in range(rounds):
            for image, vert, spine in rows:
                cpu, n = ours(model, image, vert, spine)
                our_s.append(cpu)
                vertebrae += n
                out = work / "spineps.json"
                side("run", work / "model", image, vert, spine, out)
                their_s.append(json.loads(out.read_text())["timing_s"]["labelling_cpu"])
        figures = {"images": len(rows), "rounds": rounds, "vertebrae_per_image": vertebrae / (rounds * len(rows)),
                   "ours_cpu_s_per_image": round(statistics.median(our_s), 3),
                   "spineps_cpu_s_per_image": round(statistics.median(their_s), 3),
                   "ratio": round(statistics.median(our_s) / statistics.median(their_s), 3)}  # fmt: skip
        print(f"label-vertebrae vs SPINEPS labelling, one core: {figures['ours_cpu_s_per_image']} vs "
              f"{figures['spineps_cpu_s_per_image']} CPU-s per image ({figures['vertebrae_per_image']:.1f} vertebrae): "
              f"ratio {figures['ratio']}")
        print(json.dumps(figures))


def io_rows(manifest: Path) -> list[tuple[Path, Path, Path]]:
    """(image, instance mask, semantic mask) of each station of a phantom cohort's manifest."""
    import pandas as pd

    table = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    base = manifest.parent
    return [(base / r.image, base / r.reference_instance, base / r.reference_semantic) for r in table.itertuples()]


if __name__ == "__main__":
    main()
