"""Dry-run (`snakemake -n`) of a generated 90,000-image manifest at several batch sizes.

Goal (issue 3): <= 15 s wall and <= 1 GB peak memory at the default cohort batch
size (`spinecohort manifest --batch-size`, config/example_cohort.yaml).
Anchor: the same dry-run of a 900-image manifest, measured in this run, so the
ratio shows how the cost grows with the cohort. The last case repeats the default with a
finished cohort's restore folders and BIDS tree on disk: what checking the published view
(`get_missing_derivatives`) adds at start-up. Run with `taskset -c 0`. `--quick`: 300 images,
anchor 30, the default batch only (tests/test_benchmarks.py). Last line: JSON.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from spinecohort import cohort, layout

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = 150
# --quick: a few seconds on tiny inputs, so the test suite can check the script still runs.
QUICK = "--quick" in sys.argv
SUBJECTS, ANCHOR_SUBJECTS = (100, 10) if QUICK else (30_000, 300)  # three images each
BATCH_SIZES = (DEFAULT,) if QUICK else (100, 150, 200)


def manifest(n_subjects: int, folder: Path, batch_size: int) -> Path:
    """A NAKO-sized manifest; the images need not exist for a dry-run."""
    regions = ("cervical", "thoracic", "lumbar")
    rows = [
        {"subject": f"{100000 + i}", "session": "", "region": r, "image": f"rawdata/sub-{100000 + i}/{r}.nii.gz",
         "image_id": f"sub-{100000 + i}_{r}", "reference_semantic": "", "reference_instance": ""}
        for i in range(n_subjects) for r in regions
    ]
    table = cohort.assign_batches(pd.DataFrame(rows), batch_size=batch_size)
    path = folder / f"cohort_{n_subjects}_{batch_size}.tsv"
    table.to_csv(path, sep="\t", index=False)
    return path


def fake_model(folder: Path) -> Path:
    """The demo models' JSON (the start-up check reads it) with empty checkpoints (a dry-run only checks they exist)."""
    import shutil

    demo = ROOT / "resources" / "demo_models"
    for part in ("semantic", "instance"):
        for config in (demo / part).glob("*.json"):
            (folder / part).mkdir(parents=True, exist_ok=True)
            shutil.copy(config, folder / part / config.name)
    for name in [*(f"semantic/fold_{f}/checkpoint_final.pth" for f in range(3)), "instance/instance_weights.ckpt"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    return folder


def dry_run(path: Path, model: Path, results: Path, batch_size: int) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in GB of the snakemake process, and the job count."""
    config = path.with_suffix(".yaml")
    config.write_text(json.dumps({"manifest": str(path), "results": str(results), "batch_size": batch_size,
                                  "demo": {"enabled": False}, "semantic_model": {"path": str(model / "semantic"), "folds": [0, 1, 2]},
                                  "instance_model": {"path": str(model / "instance")}}))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--cores", "1", "--directory", str(ROOT),
           "--configfile", str(config)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kb >= before, "run the big case after the anchor: ru_maxrss is a maximum over children"
    total = next(line.split()[-1] for line in out.stdout.splitlines() if line.startswith("total"))
    return wall, peak_kb / 1e6, int(total)


def publish_everything(path: Path, results: Path) -> int:
    """What a finished run leaves for the Snakefile's published-view check: every restore and label-levels
    folder holding each image's derivatives, each linked into the BIDS tree. Returns the file count."""
    table = cohort.read_manifest(path)
    group_of = {i: g for g, ids in cohort.subject_groups(table).items() for i in ids}
    n = 0
    for r in table.itertuples():
        tree = results / "derivatives" / "spinecohort" / layout.subject_folder(r.subject, r.session)
        tree.mkdir(parents=True, exist_ok=True)
        for kind in layout.DERIVATIVES:
            unit = group_of[r.image_id] if layout.stage(kind.stage).per_subject else r.batch
            made = results / "work" / unit / layout.folder(kind.stage)
            made.mkdir(parents=True, exist_ok=True)
            name = layout.derivative_name(r.image_id, kind.seg, kind.suffix)
            (made / name).touch()
            os.link(made / name, tree / name)
            n += 1
    return n


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    model = fake_model(tmp / "model")
    dry_run(manifest(ANCHOR_SUBJECTS, tmp, DEFAULT), model, tmp / "warm", DEFAULT)  # first run pays the .pyc and file caches
    small = dry_run(manifest(ANCHOR_SUBJECTS, tmp, DEFAULT), model, tmp / "res_small", DEFAULT)
    big = {b: dry_run(manifest(SUBJECTS, tmp, b), model, tmp / f"res_{b}", b) for b in BATCH_SIZES}
    published = publish_everything(manifest(SUBJECTS, tmp, DEFAULT), tmp / f"res_{DEFAULT}")
    checked = dry_run(manifest(SUBJECTS, tmp, DEFAULT), model, tmp / f"res_{DEFAULT}", DEFAULT)

print(f"{'manifest':<30}{'jobs':>8}{'wall s':>10}{'peak GB':>10}")
print(f"{f'{3 * ANCHOR_SUBJECTS:,} images, batch {DEFAULT} (anchor)':<30}{small[2]:>8}{small[0]:>10.2f}{small[1]:>10.2f}")
for b, (wall, gb, jobs) in big.items():
    print(f"{f'{3 * SUBJECTS:,} images, batch {b}':<30}{jobs:>8}{wall:>10.2f}{gb:>10.2f}{'  <- default' if b == DEFAULT else ''}")
print(f"{f'  + {published:,} derivatives checked':<30}{checked[2]:>8}{checked[0]:>10.2f}{checked[1]:>10.2f}")
wall, gb, jobs = big[DEFAULT]
print(json.dumps({"figure": f"dry-run, {3 * SUBJECTS:,} images, batch {DEFAULT}", "wall_s": round(wall, 2), "peak_gb": round(gb, 2),
                  "jobs": jobs, "anchor_900_images_wall_s": round(small[0], 2), "ratio_to_anchor": round(wall / small[0], 2),
                  "published_view_check_s": round(checked[0] - wall, 2),
                  "goal": {"wall_s": 15, "peak_gb": 1}}))
