"""Reliability of whole workflow runs (issue 8): killed jobs and reruns, determinism, hostile
inputs, a full disk and broken models.

The workflow runs are the real Snakemake; their final outputs are compared byte for byte
with the plain demo run of the `demo_local_run` fixture.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from hostile import bad_images

from spinecohort import cohort, io, layout
from spinecohort import summary as summary_module
from spinecohort.summarize import NOTHING_TO_SCORE

ROOT = Path(__file__).resolve().parents[1]
CRASH_HOOK = ROOT / "tests" / "crash"  # sitecustomize.py: SIGKILL at the n-th rename of one subcommand
# Every per-batch and cohort-wide stage, in workflow order.
STAGES = (*(stage.command for stage in layout.BATCH_STAGES if not stage.optional), *layout.COHORT_STAGES)  # the demo runs no optional stage
FINAL = ("derivatives", "scores", "summary")


def digests(results: Path) -> dict[str, str]:
    """SHA-256 of every file under the final output folders (temporary leftovers included)."""
    return {
        str(p.relative_to(results)): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in FINAL
        for p in sorted((results / folder).rglob("*"))
        if p.is_file() and p.name != ".snakemake_timestamp"
    }


def demo(results: Path, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The default demo into `results`, in its own process group (what a crash kills)."""
    return subprocess.run(
        ["snakemake", "--cores", "2", "--config", f"results={results}", *extra],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800, start_new_session=True,
    )  # fmt: skip


def assert_one_line_per_row(results: Path) -> int:
    """Every TSV the workflow wrote under `results` has one line per row and the header: `wc -l`, `cut`, `grep` and
    `awk` read it right (a quoted cell with a line break would be one row of pandas over several lines)."""
    tables = sorted(results.rglob("*.tsv"))
    for path in tables:
        rows = len(pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, skip_blank_lines=False))
        assert path.read_bytes().count(b"\n") == rows + 1, path
    return len(tables)


def _on_grid(source: str, folder: Path, name: str, codes: tuple[str, ...], spacing: tuple[float, ...], kind: str) -> Path:
    """`source` resampled onto the grid of its field of view with axes `codes` and voxel size `spacing` (mm)."""
    from spinecohort.geometry import resample, target_grid

    img = nib.load(source)
    grid = target_grid(img.shape, img.affine, codes, spacing)
    data = resample(np.asanyarray(img.dataobj), img.affine, grid, kind=kind)
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(img.get_data_dtype()), grid[1]), path)
    return path


@pytest.mark.slow
def test_a_run_killed_in_every_stage_reruns_to_the_same_bytes(demo_local_run: Path, tmp_path: Path):
    """SIGKILL the job and Snakemake mid-write in each stage in turn, rerun each time; then compare."""
    hook = {"PYTHONPATH": os.pathsep.join(filter(None, [str(CRASH_HOOK), os.environ.get("PYTHONPATH")]))}
    for stage in STAGES:
        killed = demo(tmp_path, SPINECOHORT_CRASH=f"{stage}:2", **hook)
        assert killed.returncode == -signal.SIGKILL, (stage, killed.returncode, killed.stderr[-2000:])
        assert list(tmp_path.rglob(".*.tmp*")), stage  # a temporary file, never renamed, is on disk
        assert demo(tmp_path, "--unlock").returncode == 0  # the dead Snakemake's lock stays behind
    finished = demo(tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]

    reference = digests(demo_local_run)
    assert len(reference) > 40
    assert digests(tmp_path) == reference


def test_a_deleted_derivative_is_planned_and_relinked_to_the_same_bytes(demo_local_run: Path):
    """The BIDS tree is the stages' published view: `snakemake -n` plans exactly what was deleted, nothing else reruns."""
    before = digests(demo_local_run)
    tree = demo_local_run / "derivatives" / "spinecohort"
    deleted = [next(tree.rglob("*chunk-LWS_mod-T2w_seg-vert_msk.nii.gz")), next(tree.rglob("*chunk-HWS_mod-T2w_seg-spine_snp.png"))]
    for path in deleted:
        path.unlink()
    plan = demo(demo_local_run, "-n", "--quiet", "rules")
    assert plan.returncode == 0, plan.stderr[-2000:]
    counts = dict(line.split()[:2] for line in (plan.stdout + plan.stderr).splitlines() if line.split()[1:2] and line.split()[1].isdigit())
    assert counts == {"publish_derivative": "2", "all": "1", "total": "3"}, plan.stdout
    rerun = demo(demo_local_run)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert digests(demo_local_run) == before
    made = {p.name: p for p in (demo_local_run / "work").rglob("levels/*")}  # label-levels made both
    assert all(path.samefile(made[path.name]) for path in deleted)  # a link to the stage's file, not a copy


def _variant(folder: Path, source: str, name: str, edit) -> Path:
    """A copy of the NIfTI `source` with `edit(data, affine) -> (data, affine)` applied."""
    img = nib.load(source)
    data, affine = edit(np.asanyarray(img.dataobj), img.affine.copy())
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine, img.header), path)
    return path


def _flip_first_axis(data, affine):
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    return data[::-1].copy(), affine @ flip


def _tilt(data, affine, degrees=8.0):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    rotation = np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1]])
    return data, rotation @ affine


def _unknown_label(data, affine):
    data = data.copy()
    data[tuple(np.argwhere(data > 0)[0])] = 77
    return data, affine


@pytest.mark.slow
def test_a_hostile_cohort_fails_only_its_bad_images(demo_local_run: Path, tmp_path: Path):
    """Bad images join a demo batch; each fails alone, the batch's good images come out as in a clean run."""
    demo = demo_local_run / "demo"
    table = cohort.resolve_paths(cohort.read_manifest(demo / "cohort.tsv"), demo)
    good = table[table.batch == "b0002"]  # the four lumbar stations
    template = good.iloc[0]
    folder = tmp_path / "hostile"
    folder.mkdir()
    rows, expected_failures = [], {}

    def add(name: str, image: Path | str, reason: str | None = None, **references: str) -> str:
        image_id = f"sub-{name}_acq-sag_chunk-LWS"
        rows.append({**template.to_dict(), "subject": name, "image_id": image_id, "image": str(image),
                     "reference_semantic": "", "reference_instance": "", **references})
        if reason:
            expected_failures[image_id] = (next(iter(references.values()), str(image)), reason)  # the file at fault
        return image_id

    for name, (path, reason) in bad_images(folder, Path(template.image)).items():
        add(f"bad{name.replace('_', '')}", path, reason)
    # A good image whose reference is on another grid, or holds a label id that does not exist.
    same = lambda d, a: (d, a)  # noqa: E731 (a copy: two rows may not share an image file)
    cropped = _variant(folder, template.reference_semantic, "cropped_ref", lambda d, a: (d[:, :, 1:].copy(), a))
    add("badrefgrid", _variant(folder, template.image, "refgrid", same), "is not on the grid", reference_semantic=str(cropped))
    mislabeled = _variant(folder, template.reference_semantic, "mislabeled_ref", _unknown_label)
    add("badreflabel", _variant(folder, template.image, "reflabel", same), "unknown label ids [77]", reference_semantic=str(mislabeled))
    # Valid but unusual geometry: left-right flipped voxel order, and a tilted (oblique) affine.
    references = {"reference_semantic": template.reference_semantic, "reference_instance": template.reference_instance}
    variants = {}
    for name, edit in (("flipped", _flip_first_axis), ("oblique", _tilt)):
        variants[name] = add(name, _variant(folder, template.image, name, edit),
                             **{k: str(_variant(folder, v, f"{name}_{k}", edit)) for k, v in references.items()})
    # Other valid slice layouts (N4 refused them): 1 mm slices as the first voxel axis, and isotropic 1 mm; image and
    # references resampled onto the grid (linear, nearest), each scored against its own. (N4 on every axis of every
    # layout: tests/test_foundation.py.)
    layouts = {"thinfirst": (("L", "A", "S"), (1.0, 1.875, 1.875)), "isotropic": (("A", "S", "L"), (1.0, 1.0, 1.0))}
    for name, (codes, spacing) in layouts.items():
        variants[name] = add(name, _on_grid(template.image, folder, name, codes, spacing, "linear"),
                             **{k: str(_on_grid(v, folder, f"{name}_{k}", codes, spacing, "nearest")) for k, v in references.items()})
    # The same station with other header codes (no qform, sform 'aligned'): its masks keep them.
    recoded = nib.load(_variant(folder, template.image, "recoded", same))
    recoded.set_qform(None, code=0)
    recoded.set_sform(recoded.affine, code=2)
    nib.save(recoded, folder / "recoded_codes.nii.gz")
    variants["recoded"] = add("recoded", folder / "recoded_codes.nii.gz", **references)

    manifest = folder / "cohort.tsv"
    pd.concat([good, pd.DataFrame(rows)], ignore_index=True).to_csv(manifest, sep="\t", index=False)
    results = tmp_path / "results"
    configfile = folder / "config.yaml"
    # Without the labelling model: a lumbar station alone is then numbered from its sacrum (with the model, whose
    # column has no count from C2 here, it would be counted).
    configfile.write_text(yaml.safe_dump({"demo": {"enabled": False}, "manifest": str(manifest), "results": str(results),
                                          "labeling_model": {"path": "none"}}))  # fmt: skip
    run = subprocess.run(["snakemake", "--cores", "2", "--configfile", str(configfile)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]

    # Every bad image is in the failures table with its file and reason; nothing else is.
    failures = pd.read_csv(results / "summary" / "failures.tsv", sep="\t", dtype=str).set_index("image_id")
    assert set(failures.index) == set(expected_failures), failures
    for image_id, (path, reason) in expected_failures.items():
        message = failures.loc[image_id, "message"]
        assert path in message and reason.split()[0] in message, (image_id, message)

    # The good images' masks and scores are the clean run's, byte for byte. Here the lumbar stations come
    # without their subjects' other stations: numbered by the sacrum alone, with the same ids, where the
    # demo numbers them across each subject's stations (the snapshot's title and the levels flag say so).
    clean, hostile = digests(demo_local_run), digests(results)
    mine = [k for k in clean if k.startswith("derivatives") and any(i in k for i in good.image_id)]
    assert len(mine) == len(layout.DERIVATIVES) * len(good) and all(hostile[k] == clean[k] for k in mine if k.endswith("_msk.nii.gz"))
    scores = {run: pd.read_parquet(run / "scores") for run in (demo_local_run, results)}
    scores = {run: table[table.image_id.isin(good.image_id)].sort_values(["image_id", "structure", "metric"]).reset_index(drop=True)
              for run, table in scores.items()}
    levels = {run: table.structure == "Vertebra levels" for run, table in scores.items()}
    assert set(scores[demo_local_run].flag[levels[demo_local_run]]) == {"model"}
    assert set(scores[results].flag[levels[results]]) == {"sacrum"}
    for run, table in scores.items():
        table.loc[levels[run], "flag"] = ""
    pd.testing.assert_frame_equal(scores[demo_local_run], scores[results], check_categorical=False)

    # Flipped and tilted copies of the first station segment as well as the station itself; the resampled layouts
    # (their references resampled with nearest neighbours, so blockier than the masks) nearly as well.
    scores[results] = pd.read_parquet(results / "scores")
    dsc = scores[results][(scores[results].metric == "DSC") & (scores[results].structure == "Vertebra")].set_index("image_id").value
    print("vertebra DSC per layout:", {name: round(dsc[image_id], 3) for name, image_id in variants.items()}, "station", round(dsc[template.image_id], 3))
    for name, image_id in variants.items():
        assert abs(dsc[image_id] - dsc[template.image_id]) < (0.06 if name in layouts else 0.03), (image_id, dsc[image_id], dsc[template.image_id])
    for name in layouts:  # bias-corrected on their own grid, not failed or skipped
        assert nib.load(layout.n4_image(results / "work" / "b0002" / layout.folder("bias-correct"), variants[name])).shape == nib.load(folder / f"{name}.nii.gz").shape
    # The lying headers cost the batch job no memory: its peak stays far within the job's request (3000 MB).
    from spinecohort.runtime import COST_LINE

    peak_gib = float(COST_LINE.findall((results / "logs" / "bias_correct" / "b0002.log").read_text())[-1][3])
    assert peak_gib * 1024 < 1000, peak_gib
    assert assert_one_line_per_row(results) > 10
    derivatives = results / "derivatives" / "spinecohort"
    for seg in ("spine", "vert"):
        recoded_mask = layout.derivative(derivatives, "recoded", "", variants["recoded"], seg)
        assert io.header_codes(recoded_mask) == (0, 2), seg
        flipped = layout.derivative(derivatives, "flipped", "", variants["flipped"], seg)
        assert io.header_codes(flipped) == io.header_codes(folder / "flipped.nii.gz"), seg


def _plan(configfile: Path) -> dict[str, int]:
    """Rule -> jobs that `snakemake -n` plans."""
    plan = subprocess.run(["snakemake", "-n", "--quiet", "rules", "--configfile", str(configfile)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert plan.returncode == 0, plan.stderr[-2000:]
    words = [line.split() for line in (plan.stdout + plan.stderr).splitlines()]
    return {w[0]: int(w[1]) for w in words if len(w) >= 2 and w[1].isdigit() and w[0] != "total"}


@pytest.mark.slow
def test_a_cohort_without_references_finishes_and_a_fixed_image_alone_is_redone(demo_local_run: Path, tmp_path: Path):
    """The demo's 12 stations in a manifest without reference columns, plus a new subject whose only image is a
    truncated file. Their batch stages are the demo's, copied (no batch stage reads a reference); score and
    summarize run. Then the file is replaced by a good image, `spinecohort retry` as the README shows, and the next
    run redoes that image, its subject's levels and the summaries: nothing else."""
    results = tmp_path / "results"
    shutil.copytree(demo_local_run, results, symlinks=True)
    for made_from_references in [*results.glob("work/*/scores"), results / "scores", results / "summary"]:
        shutil.rmtree(made_from_references)
    demo = results / "demo"
    table = cohort.resolve_paths(cohort.read_manifest(demo / "cohort.tsv"), demo)
    good = Path(table[table.region == "lumbar"].image.iloc[0])
    broken = tmp_path / "sub-fixed_acq-sag_chunk-LWS_T2w.nii.gz"
    broken.write_bytes(good.read_bytes()[:5000])
    fixed = "sub-fixed_acq-sag_chunk-LWS"
    new = pd.DataFrame([{"subject": "fixed", "session": "", "region": "lumbar", "image_id": fixed, "image": str(broken), "batch": "b0004"}])
    manifest = tmp_path / "cohort.tsv"  # the columns of the report: no references at all
    pd.concat([table, new])[["subject", "session", "region", "image_id", "image", "batch"]].to_csv(manifest, sep="\t", index=False)
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump({"demo": {"enabled": False}, "manifest": str(manifest), "results": str(results)}))
    run = subprocess.run(["snakemake", "--cores", "2", "--configfile", str(configfile)], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]

    summary, full = results / "summary", demo_local_run / "summary"
    failures = pd.read_csv(summary / "failures.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert failures[["image_id", "batch", "stage", "status"]].values.tolist() == [[fixed, "b0004", "bias_correct", "failed"]]
    assert str(broken) in failures.message[0]
    # QC, its flags and the subjects' levels are the full demo's for the same images; Table S1 and the levels table
    # say there is nothing to score, and the levels table still has every station's images and numbering.
    qc = pd.read_parquet(summary / layout.QC_TABLE)
    pd.testing.assert_frame_equal(qc, pd.read_parquet(full / layout.QC_TABLE))
    assert (summary / layout.QC_FLAGS).read_bytes() == (full / layout.QC_FLAGS).read_bytes()
    assert (summary / layout.QC_REVIEW).stat().st_size > 1000
    subjects = pd.read_csv(summary / layout.SUBJECT_LEVELS, sep="\t", dtype=str, keep_default_na=False).set_index("subject")
    demo_subjects = pd.read_csv(full / layout.SUBJECT_LEVELS, sep="\t", dtype=str, keep_default_na=False).set_index("subject")
    pd.testing.assert_frame_equal(subjects.loc[demo_subjects.index], demo_subjects)
    assert subjects.loc["fixed", "levels"] == "lumbar failed"
    levels, demo_levels = (pd.read_csv(folder / "levels.csv", dtype=str) for folder in (summary, full))
    pd.testing.assert_frame_equal(levels[["Station", "Images", "Numbering"]], demo_levels[["Station", "Images", "Numbering"]])
    assert set(levels["Identification rate"]) == {"–"}
    assert NOTHING_TO_SCORE in (summary / "table_s1.md").read_text() and NOTHING_TO_SCORE in (summary / "levels.md").read_text()
    assert set(pd.read_csv(summary / "table_s1.csv").iloc[:, 1:].stack()) == {"–"}
    scores = pd.read_parquet(results / "scores")
    assert scores.empty and set(summary_module.SCORE_SCHEMA.names) <= set(scores.columns)
    assert assert_one_line_per_row(results) > 10 and assert_one_line_per_row(demo_local_run) > 10

    # The fix: a good image in place of the broken file, then the README's command.
    shutil.copyfile(good, broken)
    retry = subprocess.run(["spinecohort", "retry", "--manifest", str(manifest), "--failures", str(summary / "failures.tsv")],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert retry.returncode == 0 and f"{fixed}: b0004 -> b0005" in retry.stderr, retry.stderr
    moved = cohort.read_manifest(manifest).set_index("image_id").loc[fixed]
    assert (moved.batch, moved.earlier_batches) == ("b0005", "b0004")
    per_image = ("bias_correct", "resample", "average_folds", "assemble_instances", "restore", "label_vertebrae", "label_levels", "score")
    assert _plan(configfile) == {**dict.fromkeys(per_image, 1), "predict_fold": 3, "summarize": 1, "all": 1}
    rerun = subprocess.run(["snakemake", "--cores", "2", "--configfile", str(configfile)], cwd=ROOT, capture_output=True, text=True,
                           timeout=1800)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert pd.read_csv(summary / "failures.tsv", sep="\t").empty
    assert len(pd.read_parquet(summary / layout.QC_TABLE)) == 13
    # The fixed image is the demo's lumbar station: the same masks. Alone (its subject has no other station) the
    # labelling model's column has no count from C2, so it is counted, with the reason, not numbered from the sacrum.
    tree, demo_tree = results / "derivatives" / "spinecohort", demo_local_run / "derivatives" / "spinecohort"
    source = table.set_index("image").loc[str(good)]
    mine, theirs = ({seg: nib.load(layout.derivative(root, subject, "", image_id, seg)).get_fdata() for seg in ("spine", "vert")}
                    for root, subject, image_id in ((tree, "fixed", fixed), (demo_tree, source.subject, source.image_id)))  # fmt: skip
    assert np.array_equal(mine["spine"], theirs["spine"])
    pairs = {(int(a), int(b)) for a, b in zip(mine["vert"].ravel(), theirs["vert"].ravel()) if a or b}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})  # the same vertebrae, other ids
    ledger = pd.concat(pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False) for f in results.glob(f"work/*/{layout.folder('label-levels')}/{layout.LEDGER}"))
    assert ledger.set_index("image_id").loc[fixed, "numbering"] == "count" and "counted" in ledger.set_index("image_id").loc[fixed, "message"]
    assert _plan(configfile) == {}  # finished


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_fails_the_job_and_leaves_nothing_truncated(small_cohort: Path, tmp_path: Path):
    """N4 of a batch writes onto a 2 MB tmpfs: room for one image, not four."""
    from spinecohort import io

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "n4"
        job = subprocess.run(["spinecohort", "bias-correct", "--manifest", str(small_cohort), "--batch", "b0001",
                              "--out", str(out), "--iterations", "5", "--threads", "1"],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert job.returncode != 0
        assert "bias_correct stopped at sub-" in job.stderr and f"No space left on device (writing to {out})" in job.stderr
        left = sorted(out.iterdir())
        assert not (out / "ledger.tsv").exists()  # no ledger: the stage does not look finished, nor any image failed
        assert left and not [p for p in left if ".tmp" in p.name]
        for path in left:  # what was renamed is whole
            image, _ = io.load_image(path)
            assert image.shape[2] > 1
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _broken_model(folder: Path, how: str) -> Path:
    import json
    import shutil

    model = folder / how
    shutil.copytree(ROOT / "resources" / "demo_models" / "semantic", model)
    config = json.loads((model / "inference_config.json").read_text())
    if how == "missing_fold":
        shutil.rmtree(model / "fold_2")
    elif how == "unknown_label":
        config["labels"]["3"] = 77
    elif how == "more_labels_than_outputs":
        config["labels"]["15"] = 49
    (model / "inference_config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing_fold", "fold(s) [2] asked for but missing"),
        ("unknown_label", "inference_config.json maps to unknown SPINEPS label ids [77]"),
        ("more_labels_than_outputs", "inference_config.json maps outputs [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]"
                                     " but dataset.json gives the network 15 outputs"),
    ],
)  # fmt: skip
def test_a_broken_model_stops_the_run_at_start_up(tmp_path: Path, how: str, message: str):
    model = _broken_model(tmp_path, how)
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump({"semantic_model": {"path": str(model), "folds": [0, 1, 2]}, "results": str(tmp_path / "r")}))
    run = subprocess.run(["snakemake", "--cores", "1", "--configfile", str(configfile)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode != 0
    assert f"model folder {model}: {message}" in run.stdout + run.stderr
    assert not (tmp_path / "r").exists()  # nothing ran
