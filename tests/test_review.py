"""A reviewer's decisions (issue 43): read, checked, and the QC score measured against them (known answers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinecohort.review import DecisionsError, auc, ranking_check, read_decisions


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "decisions.tsv"
    path.write_text(text)
    return path


def test_decisions_are_read_with_an_optional_note_and_bad_rows_are_named(tmp_path: Path):
    table = read_decisions(write(tmp_path, "image_id\tdecision\na\taccept\nb\t Reject \n"))
    assert table.values.tolist() == [["a", "accept", ""], ["b", "reject", ""]]
    with pytest.raises(DecisionsError, match=r"row 3: decision 'maybe' is not one of accept, reject, fix; row 4: a is decided twice"):
        read_decisions(write(tmp_path, "image_id\tdecision\tnote\na\taccept\t\nb\tmaybe\t\na\treject\tcut\n"))
    with pytest.raises(DecisionsError, match="no column decision"):
        read_decisions(write(tmp_path, "image_id\tverdict\na\taccept\n"))


def test_the_auc_counts_pairs_and_ties_half():
    score = pd.Series({"a": 0.9, "b": 0.5, "c": 0.5, "d": 0.1})
    # bad a, c; good b, d: pairs (a>b 1, a>d 1, c=b 0.5, c>d 1) -> 3.5 / 4
    assert auc(score, pd.Series({"a": True, "b": False, "c": True, "d": False})) == 0.875
    assert np.isnan(auc(score, pd.Series({"a": True, "b": True})))


def test_ranking_check_on_a_constructed_cohort():
    """20 images, score 20..1 (worst first): deciles of two. Reviewed: the top six and two at the bottom. Rejected:
    images 1, 2, 4 (of the top) and 19; accepted: 3, 5, 6 and 20; image 7 'fix' is not a review of the ranking."""
    score = pd.Series({f"i{k:02d}": float(21 - k) for k in range(1, 21)})
    decisions = pd.DataFrame({"image_id": ["i01", "i02", "i03", "i04", "i05", "i06", "i07", "i19", "i20"],
                              "decision": ["reject", "reject", "accept", "reject", "accept", "accept", "fix", "reject", "accept"],
                              "note": ""})  # fmt: skip
    area, deciles = ranking_check(score, decisions)
    # rejected scores 20, 19, 17, 2 against accepted 18, 16, 15, 1: 20 beats 4, 19 beats 4, 17 beats 3, 2 beats 1
    assert area == 12 / 16
    assert deciles.images.tolist() == [2] * 10
    assert deciles.reviewed.tolist() == [2, 2, 2, 0, 0, 0, 0, 0, 0, 2]
    assert deciles.rejected.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert deciles.rejection_rate.tolist()[:3] == [1.0, 0.5, 0.0] and deciles.rejection_rate.isna().sum() == 6
    assert deciles.rejection_rate.iloc[-1] == 0.5


def test_reviewed_out_sidecars_say_so_until_the_decision_is_gone(tmp_path: Path):
    from spinecohort import io, layout
    from spinecohort.review import SIDECAR_KEY, mark_sidecars

    manifest = pd.DataFrame({"image_id": ["a", "b", "c"], "subject": ["1", "1", "2"], "session": ["", "", "x"]})
    derivatives, state = tmp_path / "derivatives", tmp_path / "marked.txt"
    paths = {(i, seg): layout.derivative(derivatives, r.subject, r.session, i, seg, "msk.json")
             for i, r in manifest.set_index("image_id").iterrows() for seg in ("spine", "vert")}  # fmt: skip
    for (image_id, seg), path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_json(path, {"Sources": [image_id], "seg": seg})
    decisions = pd.DataFrame({"image_id": ["a", "b", "c"], "decision": ["reject", "accept", "fix"], "note": ["merged", "", "motion"]})
    mark_sidecars(derivatives, manifest, decisions, state)
    assert io.read_json(paths["a", "vert"]) == {"Sources": ["a"], "seg": "vert", SIDECAR_KEY: {"decision": "reject", "note": "merged"}}
    assert io.read_json(paths["c", "spine"])[SIDECAR_KEY] == {"decision": "fix", "note": "motion"}
    assert SIDECAR_KEY not in io.read_json(paths["b", "spine"]) and state.read_text() == "a\nc\n"
    mark_sidecars(derivatives, manifest, decisions[decisions.image_id == "c"], state)  # a's decision withdrawn
    assert io.read_json(paths["a", "vert"]) == {"Sources": ["a"], "seg": "vert"} and state.read_text() == "c\n"


@pytest.mark.slow
def test_a_reviewer_rejects_in_the_browser_and_the_image_leaves_the_tables(demo_local_run: Path, tmp_path: Path):
    """The demo run, copied. In a headless Chromium the reviewer opens the review page, rejects the worst image (r),
    accepts the next (a), sends the third back for a fix (f) and exports (e). With that file as `qc.decisions` only
    summarize reruns; Table S1 and the by-region summary are those of the score rows without the rejected image
    (its station's n drops by one), the levels table counts it no more, and the listing, QC rows and check say why."""
    import subprocess

    from browser import chromium
    from selenium.webdriver.common.by import By

    from spinecohort import layout, summary

    root = Path(__file__).resolve().parents[1]
    results = tmp_path / "results"
    shutil.copytree(demo_local_run, results, symlinks=True)
    out, full = results / "summary", demo_local_run / "summary"
    with chromium() as browser:
        browser.get((out / layout.QC_REVIEW).as_uri())
        body = browser.find_element(By.TAG_NAME, "body")
        shown = [row.get_attribute("data-image-id") for row in browser.find_elements(By.CSS_SELECTOR, "#images tr")]
        for key in "rafe":
            body.send_keys(key)
        progress = browser.find_element(By.ID, "progress").text
        exported = browser.find_element(By.ID, "export").get_attribute("value")
    rejected, accepted, fix = shown[:3]
    assert progress == "reviewed 3 / 12, rejected 1, needs fix 1"
    assert exported == f"image_id\tdecision\tnote\n{rejected}\treject\t\n{accepted}\taccept\t\n{fix}\tfix\t\n"
    decisions = write(tmp_path, exported)

    overlay = tmp_path / "review.yaml"  # as a user sets it in their config file
    overlay.write_text(f"qc: {{review_images: 20, decisions: {decisions}}}\n")
    proc = subprocess.run(["snakemake", "--cores", "1", "--configfile", "config/config.yaml", overlay, "--config", f"results={results}"],
                          cwd=root, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = {line.split()[1].rstrip(":") for line in proc.stderr.splitlines() if line.startswith(("rule ", "localrule "))}
    assert ran == {"summarize", "all"}, ran

    manifest = pd.read_csv(results / "demo" / "cohort.tsv", sep="\t", dtype=str, keep_default_na=False)
    region = manifest.set_index("image_id").region[rejected]
    scores = pd.read_parquet(results / "scores")
    assert rejected in set(scores.image_id)  # the score dataset keeps every image
    pd.testing.assert_frame_equal(pd.read_parquet(out / "by_region.parquet"), summary.by_region(scores[scores.image_id != rejected]),
                                  check_dtype=False, check_categorical=False)  # parquet reads strings back as categories  # fmt: skip
    assert not pd.read_parquet(out / "by_region.parquet").equals(pd.read_parquet(full / "by_region.parquet"))
    n = int((manifest.region == region).sum())
    assert f"{region}: n={n - 1}" in (out / "table_s1.md").read_text() and f"{region}: n={n}" in (full / "table_s1.md").read_text()
    levels, demo_levels = (pd.read_csv(f / "levels.csv", dtype=str).set_index("Station").Images.astype(int) for f in (out, full))
    assert (demo_levels - levels).to_dict() == {s: int(s.lower() == region) for s in demo_levels.index}  # "fix" is no rejection

    listed = pd.read_csv(out / layout.REVIEWED_OUT, sep="\t", dtype=str, keep_default_na=False)
    batch = dict(zip(manifest.image_id, manifest.batch))
    assert listed.values.tolist() == [[rejected, batch[rejected], "reject", ""], [fix, batch[fix], "fix", ""]]
    qc = pd.read_parquet(out / layout.QC_TABLE).set_index("image_id")
    assert qc.loc[[rejected, accepted, fix], "review"].tolist() == ["reject", "accept", "fix"] and (qc.review != "").sum() == 3
    check = pd.read_csv(out / layout.REVIEW_CHECK, sep="\t")
    assert check.images.sum() == len(manifest) and check.reviewed.sum() == 2 and check.rejected.sum() == 1
    assert check.rejected.iloc[0] == 1  # the worst image was the rejected one: the first decile
    page = (out / layout.QC_REVIEW).read_text()
    assert "QC score against 2 reviewed images (1 rejected): AUC 1.000" in page  # the rejected one ranked above the accepted
    row = manifest.set_index("image_id").loc[rejected]
    sidecar = layout.derivative(results / "derivatives" / "spinecohort", row.subject, row.session, rejected, "vert", "msk.json")
    assert json.loads(sidecar.read_text())["QCReview"] == {"decision": "reject", "note": ""}


def test_the_reviewed_out_listing_feeds_retry_and_only_a_fixed_image_moves(tmp_path: Path):
    """The fix path: reviewed_out.tsv is retry's --failures table; of a rejected and a "needs fix" image, the one whose
    file the user replaced after the listing was written moves to a new batch."""
    import os

    from spinecohort import cohort
    from spinecohort.review import reviewed_out

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"")
    manifest = pd.DataFrame({"image_id": ["a", "b", "c"], "image": [f"{n}.nii.gz" for n in "abc"], "region": ["lumbar"] * 3,
                             "subject": ["1", "2", "3"], "session": [""] * 3, "batch": ["b0001"] * 3, "earlier_batches": [""] * 3,
                             "reference_semantic": [""] * 3, "reference_instance": [""] * 3})  # fmt: skip
    decisions = pd.DataFrame({"image_id": ["a", "b", "c"], "decision": ["reject", "fix", "accept"], "note": ["", "motion", ""]})
    listing = tmp_path / "reviewed_out.tsv"
    reviewed_out(decisions, dict(zip(manifest.image_id, manifest.batch))).to_csv(listing, sep="\t", index=False)
    written = listing.stat().st_mtime
    os.utime(tmp_path / "b.nii.gz", (written + 10, written + 10))  # the user replaced b's image
    failed = pd.read_csv(listing, sep="\t", dtype=str, keep_default_na=False)
    chosen = cohort.retry_candidates(cohort.resolve_paths(manifest, tmp_path), failed, changed_after=written)
    assert chosen == ["b"]
    assert cohort.retry(manifest, chosen, batch_size=10).set_index("image_id").batch.to_dict() == {"a": "b0001", "b": "b0002", "c": "b0001"}
