"""Score rows, by-region summaries, Table S1 and the failures table; the demo run end to end."""

import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import yaml

from spinecohort import cohort, io, layout, summary
from spinecohort.cohort_qc import page_rows

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
# The supplement's Table S1: these rows, and per station a DSC and an ASSD column.
SUPPLEMENT_ROWS = ["Vertebra", "IVD", "Spinal canal", "Spinal cord", "Arcus", "Spinous process",
                   "Articularis inferior", "Articularis superior", "Costal process", "Vertebra corpus"]
SUPPLEMENT_COLUMNS = ["Structure"] + [f"{r} {m}" for r in ("Cervical", "Thoracic", "Lumbar") for m in ("DSC", "ASSD (mm)")]


def long_scores() -> pd.DataFrame:
    rows = []
    values = {"cervical": [0.9, 0.8, 0.0, np.nan], "lumbar": [0.5, 0.7, 0.6, 0.9]}
    for region, dsc in values.items():
        for k, v in enumerate(dsc):
            rows.append({"region": region, "structure": "IVD", "metric": "DSC", "value": v, "image_id": f"{region}{k}"})
    return pd.DataFrame(rows)


def test_by_region_statistics_match_numpy_and_count_exclusions():
    stats = summary.by_region(long_scores()).set_index(["region", "structure", "metric"])
    cerv = stats.loc[("cervical", "IVD", "DSC")]
    kept = np.array([0.9, 0.8, 0.0])  # the missed structure's DSC 0 counts; NaN (both empty) does not
    assert cerv["mean"] == pytest.approx(kept.mean()) and cerv["sd"] == pytest.approx(kept.std(ddof=1))
    assert (cerv["n"], cerv["n_excluded"]) == (3, 1)
    lumb = stats.loc[("lumbar", "IVD", "DSC")]
    q1, q3 = np.percentile([0.5, 0.7, 0.6, 0.9], [25, 75])
    assert lumb["median"] == pytest.approx(0.65) and lumb["iqr"] == pytest.approx(q3 - q1)


def test_table_s1_has_the_supplements_layout():
    assert list(CONFIG["metrics"]["structures"]) == SUPPLEMENT_ROWS
    table = summary.table_s1(summary.by_region(long_scores()), SUPPLEMENT_ROWS)
    assert list(table.columns) == SUPPLEMENT_COLUMNS
    assert list(table["Structure"]) == SUPPLEMENT_ROWS
    ivd = table.set_index("Structure").loc["IVD"]
    assert ivd["Lumbar DSC"] == f"{np.mean([0.5, 0.7, 0.6, 0.9]):.3f} ± {np.std([0.5, 0.7, 0.6, 0.9], ddof=1):.3f}"
    assert ivd["Thoracic DSC"] == "–"  # no thoracic images


def test_failures_table_prefers_the_failing_stage_over_later_skips(tmp_path: Path):
    restore, n4 = (tmp_path / "b0001" / layout.folder(c) / layout.LEDGER for c in ("restore", "bias-correct"))
    io.write_tsv(restore, pd.DataFrame({"image_id": ["x", "y"], "stage": ["restore"] * 2,
                                        "status": ["skipped", "ok"], "message": ["x.nii.gz: NaN voxels", ""],
                                        "numbering": ["", "C2"]}))  # a stage's fact column
    io.write_tsv(n4, pd.DataFrame({"image_id": ["x"], "stage": ["bias_correct"], "status": ["failed"],
                                   "message": ["x.nii.gz: NaN voxels"]}))
    table = summary.failures([restore, n4], {"x": "b0001", "y": "b0001"})
    assert table.values.tolist() == [["x", "b0001", "bias_correct", "failed", "x.nii.gz: NaN voxels"]]
    assert list(table.columns) == ["image_id", "batch", "stage", "status", "message"]


def test_failures_of_a_retried_image_stay_with_the_batch_it_left(tmp_path: Path):
    """x failed in b0001 and was retried in b0002 (`spinecohort retry`), where it failed again at restore; z left
    the manifest. A subject group's ledger (label-levels) speaks for its images wherever they are."""
    def ledger(unit: str, command: str, rows: list[tuple[str, str, str]]) -> Path:
        path = tmp_path / unit / layout.folder(command) / layout.LEDGER
        io.write_tsv(path, pd.DataFrame(rows, columns=["image_id", "status", "message"]).assign(stage=command))
        return path

    ledgers = [ledger("b0001", "bias-correct", [("x", "failed", "x: truncated"), ("y", "ok", ""), ("z", "failed", "z: NaN")]),
               ledger("b0002", "bias-correct", [("x", "ok", "")]),
               ledger("b0002", "restore", [("x", "failed", "x: no vertebra")]),
               ledger("b0001", "label-levels", [("x", "skipped", "x: no vertebra"), ("y", "failed", "y: no C2")])]
    table = summary.failures(ledgers, {"x": "b0002", "y": "b0001"})
    assert table[["image_id", "batch", "stage", "message"]].values.tolist() == [
        ["x", "b0002", "restore", "x: no vertebra"], ["y", "b0001", "label-levels", "y: no C2"]]


@pytest.fixture
def scored_batch(small_cohort: Path, tmp_path: Path):
    """The phantom references as 'predictions' for batch b0001, one reference moved to another grid, one removed."""
    table = cohort.resolve_paths(cohort.read_manifest(small_cohort), small_cohort.parent)
    batch = table[table.batch == "b0001"].reset_index(drop=True)
    restore, levels = tmp_path / "restore", tmp_path / "levels"  # the semantic masks, the vertebra masks
    for folder, seg, column in ((restore, "spine", "reference_semantic"), (levels, "vert", "reference_instance")):
        folder.mkdir()
        for _, row in batch.iterrows():
            (folder / layout.derivative_name(row.image_id, seg)).write_bytes(Path(row[column]).read_bytes())
    shifted = tmp_path / "shifted_ref.nii.gz"
    ref = nib.load(batch.reference_semantic[0])
    nib.save(nib.Nifti1Image(np.asarray(ref.dataobj)[:, :-2], ref.affine), shifted)
    edited = pd.read_csv(small_cohort, sep="\t", dtype=str, keep_default_na=False)
    edited.loc[edited.image_id == batch.image_id[0], "reference_semantic"] = str(shifted)
    edited.loc[edited.image_id == batch.image_id[1], ["reference_semantic", "reference_instance"]] = ""
    manifest = small_cohort.parent / "edited.tsv"
    edited.to_csv(manifest, sep="\t", index=False)
    io.write_tsv(restore / "ledger.tsv", pd.DataFrame({"image_id": batch.image_id, "stage": "restore", "status": "ok", "message": ""}))
    io.write_tsv(levels / "ledger.tsv", pd.DataFrame({"image_id": batch.image_id, "stage": "label_levels", "status": "ok", "message": "",
                                                      "numbering": ["count", *["subject"] * (len(batch) - 1)]}))
    return manifest, batch, restore, levels, shifted


def test_score_stage_scores_references_and_fails_a_grid_mismatch_alone(scored_batch, tmp_path: Path):
    manifest, batch, restore, levels, shifted = scored_batch
    out = tmp_path / "scores"
    structures = '{"Vertebra": [41, 42, 43, 44, 45, 46, 47, 48, 49], "IVD": [100], "Nothing": [90]}'
    subprocess.run(["spinecohort", "score", "--manifest", manifest, "--batch", "b0001", "--input", restore, "--levels", levels,
                    "--structures", structures, "--out", out], check=True, capture_output=True)
    ledger = pd.read_csv(out / "ledger.tsv", sep="\t", dtype=str, keep_default_na=False).set_index("image_id")
    mismatch = ledger.loc[batch.image_id[0]]
    assert mismatch.status == "failed"
    assert str(shifted) in mismatch.message and "shape (160, 158, 14)" in mismatch.message and "(160, 160, 14)" in mismatch.message
    assert batch.image_id[1] not in ledger.index  # no reference: no row, no error
    scores = pd.read_parquet(out / "scores.parquet")
    scored = set(batch.image_id[2:])
    assert set(scores.image_id) == scored and len(scored) >= 1
    real = scores[scores.structure.isin(["Vertebra", "IVD"])]
    assert (real[real.metric == "DSC"].value == 1.0).all() and (real[real.metric == "ASSD"].value == 0.0).all()
    panoptic = scores[scores.structure.isin(["Vertebra instances", "IVD instances"])].set_index(["image_id", "structure", "metric"])
    assert len(panoptic) == len(scored) * 2 * 7
    assert (panoptic.value.xs("PQ", level="metric") == 1.0).all() and (panoptic.value.xs("instance ASSD", level="metric") == 0.0).all()
    assert panoptic.flag.str.fullmatch(r"tp=\d+ fp=0 fn=0").all()
    levels = scores[scores.structure == "Vertebra levels"].set_index(["image_id", "metric"]).value.unstack()
    assert (levels.id_rate == 1.0).all() and (levels.localisation_mm == 0.0).all() and (levels.identified == levels.scored).all()
    assert len(levels) == len(scored) and (levels.scored >= 5).all()
    nothing = scores[scores.structure == "Nothing"]
    assert (nothing.flag == "both_empty").all() and nothing.value.isna().all()
    assert set(scores.definition[scores.metric == "ASSD"]) == {"mean_of_means"}


@pytest.mark.slow
def test_demo_run_writes_partitioned_scores_table_s1_and_plots(demo_local_run: Path):
    """The default demo through every rule, with the shipped demo models."""
    tmp_path = demo_local_run
    summ = tmp_path / "summary"
    for name in ("by_region.parquet", "table_s1.md", "table_s1.csv", "table_s1.tex", "boxplot_dsc.png", "boxplot_assd.png",
                 "failures.tsv"):
        assert (summ / name).stat().st_size > 0, name
    table = pd.read_csv(summ / "table_s1.csv")
    assert list(table.columns) == SUPPLEMENT_COLUMNS and list(table.Structure) == SUPPLEMENT_ROWS
    assert "\\begin{tabular}" in (summ / "table_s1.tex").read_text()
    dataset = ds.dataset(tmp_path / "scores", format="parquet", partitioning="hive").to_table().to_pandas()
    assert set(dataset.region) == {"cervical", "thoracic", "lumbar"}
    assert dataset.image_id.nunique() == 3 * CONFIG["demo"]["subjects"]
    by_region = pd.read_parquet(summ / "by_region.parquet")
    assert set(by_region.structure) == set(SUPPLEMENT_ROWS) | {"Vertebra instances", "IVD instances", "Vertebra levels"}
    assert (by_region.n + by_region.n_excluded == CONFIG["demo"]["subjects"]).all()


@pytest.mark.slow
def test_the_demo_fold_agreement_is_the_folds_pairwise_dice(demo_local_run: Path, tmp_path: Path):
    """Per image and model label, MedPy's DSC of every pair of the folds' own masks (every 2nd voxel), averaged;
    the worst label in the ledger.

    The demo's fold logits are temporary: the folds are predicted again here, on the stage's own input.
    """
    from medpy.metric import binary as medpy

    from spinecohort.labels import SEMANTIC_NAMES
    from spinecohort.semantic import AGREEMENT_STEP, read_model_config

    model = Path(__file__).parents[1] / "resources" / "demo_models" / "semantic"
    lut = read_model_config(model).labels
    work = demo_local_run / "work" / "b0001"
    for fold in range(3):
        subprocess.run(["spinecohort", "predict-fold", "--manifest", demo_local_run / "demo" / "cohort.tsv", "--batch", "b0001",
                        "--input", work / layout.folder("resample"), "--model", model, "--fold", str(fold),
                        "--out", tmp_path / f"fold{fold}"], check=True, capture_output=True)  # fmt: skip
    folder = work / layout.folder("average-folds")
    table = pd.read_csv(folder / layout.FOLD_AGREEMENT, sep="\t").set_index(["image_id", "structure"]).dsc
    ledger = pd.read_csv(folder / layout.LEDGER, sep="\t", keep_default_na=False).set_index("image_id")
    for image_id in ledger.index:
        ids = [np.vectorize(lambda k: lut.get(int(k), 0))(io.load_logits(layout.fold_logits(tmp_path / f"fold{f}", image_id))
                             [:, ::AGREEMENT_STEP, ::AGREEMENT_STEP, ::AGREEMENT_STEP].argmax(0))
               for f in range(3)]  # fmt: skip
        for label in set(lut.values()):
            masks = [m == label for m in ids]
            pairs = [medpy.dc(a, b) for i, a in enumerate(masks) for b in masks[i + 1:] if a.any() or b.any()]
            expected = np.mean(pairs) if pairs else np.nan
            assert table[image_id, SEMANTIC_NAMES[label]] == pytest.approx(expected, abs=5e-5, nan_ok=True), (image_id, label)
        worst = table[image_id].dropna().idxmin()
        assert (ledger.loc[image_id, "fold_agreement_worst"], ledger.loc[image_id, "fold_agreement"]) == (worst, table[image_id, worst])
    assert (table < 1).any() and (table > 0.9).any()  # three models, not one fold compared with itself


@pytest.mark.slow
def test_the_demos_uncertainty_maps_point_at_its_errors(demo_local_run: Path):
    """`…_seg-spine_unc.nii.gz` (the fraction of folds disagreeing with the ensemble) on each image's grid, in
    [0, 1], against the phantom references: voxels whose foreground the published mask gets wrong carry far
    more disagreement than the voxels it gets right (measured: 0.29 against 0.007, AUC 0.85)."""
    from scipy.stats import mannwhitneyu

    from spinecohort.pipeline import derivative_path

    manifest = demo_local_run / "demo" / "cohort.tsv"
    table = cohort.resolve_paths(cohort.read_manifest(manifest), manifest.parent)
    tree = demo_local_run / "derivatives" / "spinecohort"
    wrong, right = [], []
    for _, row in table.iterrows():
        unc, affine = io.load_image(derivative_path(tree, row, "spine", "unc.nii.gz"))
        image, image_affine = io.load_image(row.image)
        assert unc.shape == image.shape and np.allclose(affine, image_affine) and 0 <= unc.min() and unc.max() <= 1
        errors = (io.load_mask(derivative_path(tree, row, "spine"))[0] > 0) != (io.load_mask(row.reference_semantic)[0] > 0)
        assert unc[errors].mean() > 10 * unc[~errors].mean(), row.image_id
        wrong.append(unc[errors])
        right.append(unc[~errors])
    wrong, right = np.concatenate(wrong), np.concatenate(right)
    assert mannwhitneyu(wrong, right).statistic / (len(wrong) * len(right)) > 0.8


@pytest.mark.slow
def test_the_demo_qc_flags_exactly_the_misnamed_discs_and_the_review_page_links_the_worst(demo_local_run: Path):
    """No reference is read to flag; the references say which flags are right. The demo's discs all carry
    their own level (the references say so), so none is flagged; a disc named after the level above, as an
    earlier instance model named the disc below a vertebra the top border cuts, is seen in every lumbar mask."""
    from spinecohort import labels as L
    from spinecohort.cohort_qc import image_measures

    table = pd.read_parquet(demo_local_run / "summary" / layout.QC_TABLE)
    manifest = demo_local_run / "demo" / "cohort.tsv"
    rows = cohort.resolve_paths(cohort.read_manifest(manifest), manifest.parent).set_index("image_id")
    assert sorted(table.image_id) == sorted(rows.index) and table.score.is_monotonic_decreasing
    misnamed = set()
    for image_id, row in rows.iterrows():
        ids, affine = io.load_mask(next(demo_local_run.glob(f"work/*/levels/{layout.derivative_name(image_id, 'vert')}")))
        reference = io.load_mask(row.reference_instance)[0]
        named = {int(k): int(np.bincount(ids[reference == k]).argmax()) for k in np.unique(reference[L.ivd_ids(reference)])}
        if any(got not in (0, k) for k, got in named.items()):  # a disc in view under another disc's id
            misnamed.add(image_id)
        elif row.region == "lumbar":
            semantic = io.load_mask(next(demo_local_run.glob(f"work/*/restore/{layout.derivative_name(image_id, 'spine')}")))[0]
            upper = sorted(np.unique(ids[L.vertebra_ids(ids)]))[1]  # the 2nd vertebra: its disc lies between two
            renamed = np.where(ids == L.IVD_OFFSET + upper, L.IVD_OFFSET + upper - 1, ids)  # as the bug names it
            assert image_measures(ids, semantic, affine)["missing_ivds"] == 0
            assert image_measures(renamed, semantic, affine)["missing_ivds"] == 1
    flagged = set(table.image_id[table["flags"].str.contains("missing_ivd")])
    assert flagged == misnamed, (flagged, misnamed)
    assert set(table.image_id[:len(flagged)]) == flagged  # they lead the ranking
    # The folds agree on the demo's vertebral bodies (one of them predicts no spinal cord at all, which the score ignores).
    assert not table["flags"].str.contains("folds_disagree").any() and (table.fold_agreement > 0.85).all()
    review = (demo_local_run / "summary" / layout.QC_REVIEW).read_text()
    rows = page_rows(review)
    assert [r["id"] for r in rows] == table.image_id.tolist()  # every image, worst first
    for row in rows[:3]:
        assert row["snapshot"].endswith(f"{row['id']}_mod-T2w_seg-spine_snp.png")
        assert (demo_local_run / "summary" / row["snapshot"]).read_bytes()[:4] == b"\x89PNG"
    flags = pd.read_csv(demo_local_run / "summary" / layout.QC_FLAGS, sep="\t")
    assert list(flags.image_id) == list(table.image_id[table["flags"] != ""])


def test_qc_flags_and_score_follow_their_definitions():
    from spinecohort.cohort_qc import FLAG_WEIGHT, qc_table

    images = pd.DataFrame({"image_id": ["a", "b", "c"], "region": ["lumbar", "thoracic", "cervical"], "numbering": "C2",
                           "vertebrae": [7.0, 3.0, 12.0], "missing_ivds": [0.0, 0.0, 2.0], "canal_gap_mm": [0.0, 22.0, 4.0]})
    agreement = pd.DataFrame({"image_id": ["a", "a", "b", "b", "c", "c"], "structure": ["corpus", "arcus", "corpus", "IVD", "corpus", "sacrum"],
                              "dsc": [0.96, 0.1, 0.92, 0.2, 0.5, 0.0]})  # only the bodies count
    volumes = pd.DataFrame({"image_id": [f"x{k}" for k in range(9)] + ["a"], "region": "lumbar", "level": "L3",
                            "mm3": [30000.0 + 100 * k for k in range(9)] + [60000.0]})
    table = qc_table(images, agreement, volumes).set_index("image_id")
    assert table["flags"].to_dict() == {"a": "volume_outlier", "b": "vertebra_count,canal_gap", "c": "folds_disagree,missing_ivd"}
    # missing_ivd is shown, not scored (the instance phase's disc naming at a cut vertebra is an open bug)
    assert table.score.round(6).to_dict() == {"a": round(0.04 + FLAG_WEIGHT, 6), "b": round(0.08 + 2 * FLAG_WEIGHT, 6), "c": 0.5}
    assert list(table.index) == ["c", "b", "a"]  # worst first


@pytest.mark.slow
def test_the_demo_derivatives_say_what_made_them(demo_local_run: Path):
    """BIDS dataset_description.json, a sidecar next to every published mask, and parquet key-value metadata,
    all naming this version, the shipped models and the ASSD definition."""
    import json
    from importlib.metadata import version

    import pyarrow.parquet as pq

    derivatives = demo_local_run / "derivatives" / "spinecohort"
    description = json.loads((derivatives / layout.DATASET_DESCRIPTION).read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"].startswith("1.")
    assert description["GeneratedBy"][0] == {**description["GeneratedBy"][0], "Name": "spinecohort", "Version": version("spinecohort")}
    models = {kind: json.loads((ROOT / "resources" / "demo_models" / kind / "inference_config.json").read_text())["log_name"]
              for kind in ("semantic", "instance")}  # fmt: skip
    manifest = cohort.read_manifest(demo_local_run / "demo" / "cohort.tsv")  # its entries as written: relative
    ledgers = pd.concat([pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False)
                         for f in (demo_local_run / "work").glob(f"*/{layout.folder('label-levels')}/{layout.LEDGER}")])  # fmt: skip
    numbering = dict(zip(ledgers.image_id, ledgers.numbering))
    for row in manifest.itertuples():
        for seg in ("spine", "vert"):
            mask = layout.derivative(derivatives, row.subject, row.session, row.image_id, seg)
            side = json.loads(mask.with_name(mask.name.replace(".nii.gz", ".json")).read_text())
            assert side["Sources"] == [row.image] and not Path(row.image).is_absolute() and side["GeneratedBy"]["Version"] == version("spinecohort")
            assert {k: side["Provenance"]["models"][k]["log_name"] for k in models} == models
            assert side["Provenance"]["parameters"]["n4"] == CONFIG["n4"]
            if seg == "vert":
                assert side["Numbering"] == numbering[row.image_id]
    for table in (demo_local_run / "summary" / "by_region.parquet", demo_local_run / "summary" / layout.QC_TABLE,
                  *(demo_local_run / "scores").glob("region=*/*.parquet")):  # fmt: skip
        meta = pq.read_schema(table).metadata
        assert meta[b"spinecohort.version"].decode() == version("spinecohort"), table
        assert meta[b"spinecohort.assd_definition"].decode() == CONFIG["metrics"]["assd"], table
        assert json.loads(meta[b"spinecohort.provenance"])["models"]["semantic"]["log_name"] == models["semantic"]


@pytest.mark.slow
def test_the_docs_example_outputs_are_what_the_demo_writes(demo_local_run: Path):
    """Every file the README and the docs pages show exists; those under docs/examples/ are the demo's own (the
    centroids exactly, the snapshots pixel for pixel up to PNG rounding), so a change of the outputs shows here."""
    import json

    import matplotlib.image

    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)]+)\)", readme))
    for doc in (ROOT / "docs").glob("*.md"):  # the pages link relative to docs/
        linked |= {f"docs/{p}" for p in re.findall(r"\]\(([^)#:]+\.(?:png|json|svg))\)", doc.read_text())}
    assert all((ROOT / p).is_file() for p in linked), sorted(p for p in linked if not (ROOT / p).is_file())
    examples = sorted((ROOT / "docs" / "examples").iterdir())
    assert {f"docs/examples/{p.name}" for p in examples} <= linked and len(examples) == 5
    derivatives = demo_local_run / "derivatives" / "spinecohort"
    for example in examples:
        made = next(derivatives.rglob(example.name))
        if example.suffix == ".json":
            assert json.loads(example.read_text()) == json.loads(made.read_text()), example.name
        else:
            committed, ours = matplotlib.image.imread(example), matplotlib.image.imread(made)
            assert committed.shape == ours.shape and np.abs(committed - ours).max() <= 2 / 255, example.name
