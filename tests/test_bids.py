"""A BIDS folder in one command (issue 40): `snakemake --cores all --configfile ... --config bids=/data/rawdata`.

The unit tests build manifests from a phantom BIDS tree; the workflow test runs the README's line (its example
config names the models `t2w` and `instance`, found in $SPINEPS_SEGMENTOR_MODELS) on the demo's own BIDS tree
(its finished run copied: nothing is redone), then again after a new subject arrived (only its batch runs, with
the named models, and its masks are those of the subject whose images it copies).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinecohort import cohort, io, layout
from spinecohort.bids import cohort_manifest, select
from spinecohort.cohort import ManifestError
from spinecohort.model_names import MODELS_VARIABLE, RELEASES

ROOT = Path(__file__).resolve().parents[1]


def readme_bids_line() -> str:
    """The README's BIDS one-liner, verbatim."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if "--config bids=" in line]
    assert len(lines) == 1, lines
    return lines[0].strip().strip("`")


@pytest.fixture(scope="module")
def rawdata(small_cohort: Path) -> Path:
    return small_cohort.parent / "rawdata"


def test_filters_keep_the_participants_and_sessions_asked_for_and_a_missing_one_is_an_error(rawdata: Path):
    rows = cohort.manifest_from_bids(rawdata)
    subjects = sorted(rows.subject.unique())
    assert len(subjects) == 2 and len(rows) == 6
    assert set(select(rows, participant_label=[f"sub-{subjects[1]}"]).subject) == {subjects[1]}
    assert set(select(rows, exclude_participant_label=[subjects[1], "nobody"]).subject) == {subjects[0]}
    with pytest.raises(ManifestError, match=r"participant_label nobody: no such subject in the BIDS folder"):
        select(rows, participant_label=[subjects[0], "nobody"])
    with pytest.raises(ManifestError, match="session_label 1: no such session"):
        select(rows, session_label=[1])  # the phantoms have no sessions
    with pytest.raises(ManifestError, match="no image of the BIDS folder is left"):
        select(rows, exclude_participant_label=subjects)


def test_the_manifest_keeps_its_batches_when_subjects_arrive_and_is_not_rewritten_unchanged(rawdata: Path, tmp_path: Path):
    out = tmp_path / "results" / layout.BIDS_MANIFEST
    first = rows_of(cohort_manifest(rawdata, out, batch_size=2, exclude_participant_label=["phantom0002"]))
    assert first.batch.tolist() == ["b0001", "b0001", "b0002"] and set(first.subject) == {"phantom0001"}
    assert Path(first.image[0]).is_file()  # absolute: relative only where the images lie in results/
    stamp = out.stat().st_mtime_ns
    cohort_manifest(rawdata, out, batch_size=2, exclude_participant_label=["phantom0002"])
    assert out.stat().st_mtime_ns == stamp
    both = rows_of(cohort_manifest(rawdata, out, batch_size=2)).set_index("image_id")
    assert both.loc[first.image_id, "batch"].tolist() == first.batch.tolist()  # finished batches keep their images
    assert sorted(both[both.subject == "phantom0002"].batch) == ["b0003", "b0003", "b0004"]


def rows_of(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


@pytest.mark.slow
def test_the_readme_bids_line_runs_a_bids_folder_and_then_only_the_new_subject(demo_local_run: Path, tmp_path: Path):
    results = tmp_path / "results"
    shutil.copytree(demo_local_run, results, symlinks=True)
    rawdata, references = results / "demo" / "rawdata", results / "demo" / "derivatives" / "reference"
    line = readme_bids_line().replace("/data/rawdata", str(rawdata)).replace("--cores all", "--cores 2")
    # The demo's batch size, so that its finished batches are this cohort's.
    command = [*line.split(), f"results={results}", "batch_size=4", f"bids_options={{references: {references}}}"]
    # The README's example config names the models as SPINEPS does: the demo models under its release folders.
    models = tmp_path / "spineps_models"
    models.mkdir()
    for kind, name in (("semantic", "t2w"), ("instance", "instance"), ("labeling", "t2w_labeling")):
        (models / RELEASES[kind][name]).symlink_to(ROOT / "resources" / "demo_models" / kind)
    env = {**os.environ, MODELS_VARIABLE: str(models)}

    def run() -> set[str]:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {line.split()[1].rstrip(":") for line in proc.stderr.splitlines() if line.startswith(("rule ", "localrule "))}

    # The demo's own images as a BIDS folder: the same batches as the demo's manifest, so nothing is redone.
    assert run() <= {"all"}
    manifest = rows_of(results / layout.BIDS_MANIFEST)
    demo = rows_of(results / "demo" / "cohort.tsv")
    pd.testing.assert_frame_equal(manifest[["image_id", "batch"]], demo[["image_id", "batch"]])
    assert (manifest.reference_semantic != "").all()

    # A new subject arrives: a copy of phantom0001's three stations (and references) as phantom0099.
    for tree in (rawdata, references):
        for path in (tree / "sub-phantom0001").rglob("*.nii.gz"):
            new = tree / "sub-phantom0099" / path.relative_to(tree / "sub-phantom0001")
            new.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, new.with_name(path.name.replace("phantom0001", "phantom0099")))
    finished = {p: p.stat().st_mtime_ns for p in results.glob("work/b000[123]/*/" + layout.LEDGER)}
    ran = run()
    assert {"bias_correct", "predict_fold", "label_levels", "summarize"} <= ran
    manifest = rows_of(results / layout.BIDS_MANIFEST)
    assert sorted(manifest[manifest.subject == "phantom0099"].batch) == ["b0004"] * 3
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished batches were not redone
    # Its masks are phantom0001's, voxel for voxel (the same images through the same models), its levels too.
    derivatives = results / "derivatives" / "spinecohort"
    for mask in (derivatives / "sub-phantom0001" / "anat").glob("*_msk.nii.gz"):
        twin = derivatives / "sub-phantom0099" / "anat" / mask.name.replace("phantom0001", "phantom0099")
        assert np.array_equal(io.load_mask(twin)[0], io.load_mask(mask)[0]), twin.name
    subjects = rows_of(results / "summary" / layout.SUBJECT_LEVELS).set_index("subject")
    assert subjects.loc["phantom0099"].drop("subject", errors="ignore").equals(subjects.loc["phantom0001"])
    scores = pd.read_parquet(results / "summary" / "by_region.parquet")
    assert len(scores) > 0
