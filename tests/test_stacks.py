"""One software stack and device type per cohort (issue 40): every job records its stack, summarize states where the
cohort's batches differ, and with `mixed_stacks: error` stops before writing anything."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from spinecohort import io, layout
from spinecohort.provenance import SOFTWARE
from spinecohort.stacks import differences, job_stack, mixed_message, read_stacks, stage_stack

ROOT = Path(__file__).resolve().parents[1]


def stage(root: Path, batch: str, command: str, *, device: str = "none", torch: str = "2.5.1") -> Path:
    folder = root / batch / layout.folder(command)
    folder.mkdir(parents=True)
    stack = job_stack([] if device == "none" else [device])
    stack["software"]["torch"] = torch
    io.write_json(folder / layout.STACK, stack)
    return folder / layout.LEDGER


def test_a_jobs_stack_names_the_software_python_and_device():
    stack = job_stack(["cuda", "cpu"])
    assert set(stack["software"]) == set(SOFTWARE) and stack["device"] == "cpu,cuda"
    assert job_stack([])["device"] == "none" and stack["python"].count(".") == 2


def test_one_stack_has_no_differences_and_every_difference_names_its_batches(tmp_path: Path):
    same = [stage(tmp_path, b, c, device="cpu" if c == "predict-fold" else "none") for b in ("b0001", "b0002")
            for c in ("bias-correct", "predict-fold")]  # fmt: skip
    assert differences(read_stacks(same)) == []

    mixed = [
        *same,
        stage(tmp_path, "b0003", "bias-correct", torch="2.6.0"),
        stage(tmp_path, "b0003", "predict-fold", device="cuda", torch="2.6.0"),
    ]
    assert differences(read_stacks(mixed)) == [
        "device cpu (batches b0001, b0002) / cuda (batch b0003)",
        "torch 2.5.1 (batches b0001, b0002) / 2.6.0 (batch b0003)",
    ]
    (tmp_path / "b0004" / layout.folder("restore")).mkdir(parents=True)  # written before stacks were recorded
    table = read_stacks([*mixed, tmp_path / "b0004" / layout.folder("restore") / layout.LEDGER])
    assert table[["batch", "device"]].values.tolist()[-3:] == [["b0003", "none"], ["b0003", "cuda"], ["b0004", "unrecorded"]]
    lines = differences(table)
    assert len(lines) == 2 + len(SOFTWARE) and all(line.endswith(" / unrecorded (batch b0004)") for line in lines)


def test_a_stage_keeps_the_stacks_of_the_folders_its_outputs_come_from(tmp_path: Path):
    """The fold jobs' folders are deleted once averaged: average-folds' record names both folds' stacks."""
    folds = [stage(tmp_path, "b0001", "bias-correct", device="cpu", torch="2.5.1").parent,
             stage(tmp_path, "b0002", "bias-correct", device="cuda", torch="2.6.0").parent]  # fmt: skip
    averaged, own = stage_stack(set(), folds), job_stack([])
    assert averaged["device"] == "cpu,cuda"
    assert averaged["software"]["torch"] == " + ".join(sorted({own["software"]["torch"], "2.5.1", "2.6.0"}))  # its own too
    assert averaged["python"] == own["python"] and averaged["software"]["numpy"] == own["software"]["numpy"]
    assert stage_stack({"cpu"}, [tmp_path / "gone"]) == job_stack(["cpu"])  # an upstream folder without a record


@pytest.mark.slow
def test_a_cohort_with_two_stacks_is_flagged_and_with_the_switch_refused(demo_local_run: Path, tmp_path: Path):
    """The demo run, copied; one batch's averaged folds say they ran with another torch on CUDA. summarize (the only job that
    runs again) warns in its log and on the review page and lists every folder's stack; with `mixed_stacks: error`
    it fails in one line naming the batches, and the summary it wrote before stays as it was."""
    results = tmp_path / "results"
    shutil.copytree(demo_local_run, results, symlinks=True)
    summary = results / "summary"
    assert pd.read_csv(summary / layout.STACKS, sep="\t").torch.nunique() == 1  # the demo itself: one stack, no warning
    assert "Warning" not in (summary / layout.QC_REVIEW).read_text()
    fold = results / "work" / "b0002" / layout.folder("average-folds")  # it keeps the (deleted) fold folders' stacks
    stack = json.loads((fold / layout.STACK).read_text())
    assert stack["device"] == "cpu"
    stack["software"]["torch"], stack["device"] = "2.0.0", "cuda"
    (fold / layout.STACK).write_text(json.dumps(stack))

    def summarize(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["snakemake", "--cores", "1", "--forcerun", "summarize", "--config", f"results={results}",
                               f"mixed_stacks={mode}"], cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip

    warned = summarize("warn")
    assert warned.returncode == 0, warned.stderr[-3000:]
    ran = {line.split()[1].rstrip(":") for line in warned.stderr.splitlines() if line.startswith(("rule ", "localrule "))}
    assert ran == {"summarize", "all"}, ran
    batches = ", ".join(sorted(pd.read_csv(results / "demo" / "cohort.tsv", sep="\t", dtype=str).batch.unique()))
    assert batches.count("b0") == 3  # so that the batches of the other value are all of them
    torch = stack["software"]["torch"] = json.loads((fold.parent / layout.folder("bias-correct") / layout.STACK).read_text())["software"]["torch"]
    assert torch != "2.0.0"
    torch_line = " / ".join(f"{v} {w}" for v, w in sorted({torch: f"(batches {batches})", "2.0.0": "(batch b0002)"}.items()))
    expected = mixed_message([f"device cpu (batches {batches}) / cuda (batch b0002)", f"torch {torch_line}"])
    log = (results / "logs" / "summarize.log").read_text()
    assert f"WARNING {expected}\n" in log, log[-2000:]
    assert f"<b>Warning</b>: {html.escape(expected)} ({layout.STACKS})" in (summary / layout.QC_REVIEW).read_text()
    stacks = pd.read_csv(summary / layout.STACKS, sep="\t", dtype=str)
    assert stacks[stacks.torch == "2.0.0"][["batch", "stage", "device"]].values.tolist() == [["b0002", fold.name, "cuda"]]

    refused = summarize("error")
    assert refused.returncode != 0
    last = (results / "logs" / "summarize.log").read_text().strip().splitlines()[-1]
    assert last == f"spinecohort summarize: error: {expected} (config mixed_stacks: error; rerun those batches with one stack, or set it to warn)"
    assert not (summary / "table_s1.md").exists() and not (summary / layout.STACKS).exists()  # no table of a mixed cohort
