"""Every layout a SPINEPS semantic model release may have loads in ours (issue 15).

Each variant is made from the shipped demo model: renamed checkpoints, a checkpoint naming a trainer
nobody has, nnU-Net's pre-2.4 plans, SPINEPS's forms of `available_folds`, label names, mirroring and
a `resolution_range` pair. Where a variant should not change the prediction, the logits are compared
bit for bit with the shipped model's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spinecohort import cohort, io, layout
from spinecohort.geometry import spacing_along, spacing_of
from spinecohort.preprocess import to_model_space
from spinecohort.semantic import FoldPredictor, ModelError, check_model, parse_available_folds, read_model_config

DEMO = Path(__file__).resolve().parents[1] / "resources" / "demo_models" / "semantic"


@pytest.fixture(scope="module")
def model_input(small_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One phantom in the demo model's space, as the resample stage writes it."""
    row = cohort.resolve_paths(cohort.read_manifest(small_cohort), small_cohort.parent).iloc[2]
    config = read_model_config(DEMO)
    image, affine = io.load_image(row.image)
    data, grid = to_model_space(image, affine, orientation=config.orientation, spacing=config.spacing)
    path = layout.model_input(tmp_path_factory.mktemp("input"), "x")
    io.save_nifti(path, data, grid, dtype=np.float32)
    return path


@pytest.fixture(scope="module")
def shipped(model_input: Path) -> np.ndarray:
    return FoldPredictor(read_model_config(DEMO), 0, device="cpu").predict(model_input)[0]


def variant(tmp_path: Path, edit_config=None) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(DEMO, folder)
    if edit_config:
        path = folder / "inference_config.json"
        path.write_text(json.dumps(edit_config(json.loads(path.read_text()))))
    return folder


def test_a_fold_with_only_checkpoint_best_loads_and_predicts_the_same(tmp_path, model_input, shipped):
    folder = variant(tmp_path)
    for fold in range(3):
        (folder / f"fold_{fold}" / "checkpoint_final.pth").rename(folder / f"fold_{fold}" / "checkpoint_best.pth")
    check_model(folder, [0, 1, 2])
    assert np.array_equal(FoldPredictor(read_model_config(folder), 0, device="cpu").predict(model_input)[0], shipped)
    (folder / "fold_2" / "checkpoint_best.pth").unlink()
    with pytest.raises(ModelError, match=r"fold\(s\) \[2\] asked for but missing"):
        check_model(folder, [0, 1, 2])


def test_the_workflow_asks_for_the_checkpoint_a_release_has(tmp_path):
    folder = variant(tmp_path)
    (folder / "fold_1" / "checkpoint_final.pth").rename(folder / "fold_1" / "checkpoint_best.pth")
    root = Path(__file__).resolve().parents[1]
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"results": str(tmp_path / "results"), "semantic_model": {"path": str(folder), "folds": [0, 1, 2]}}))
    plan = subprocess.run(["snakemake", "-n", "--cores", "1", "--configfile", config], cwd=root, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert str(folder / "fold_1" / "checkpoint_best.pth") in plan.stdout
    assert str(folder / "fold_0" / "checkpoint_final.pth") in plan.stdout


def test_a_checkpoint_naming_an_unknown_trainer_predicts_the_same(tmp_path, model_input, shipped):
    folder = variant(tmp_path)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainer_FromAnotherLab"
    torch.save(checkpoint, path)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer"):  # stock nnU-Net cannot
        nnUNetPredictor(device=torch.device("cpu")).initialize_from_trained_model_folder(str(folder), use_folds=(0,))
    assert np.array_equal(FoldPredictor(read_model_config(folder), 0, device="cpu").predict(model_input)[0], shipped)


def test_old_plans_format_predicts_the_same(tmp_path, model_input, shipped):
    folder = variant(tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    arch = configuration.pop("architecture")["arch_kwargs"]
    configuration |= {  # nnU-Net before 2.4 wrote the network's description this way
        "UNet_class_name": "PlainConvUNet", "UNet_base_num_features": arch["features_per_stage"][0],
        "unet_max_num_features": arch["features_per_stage"][-1], "n_conv_per_stage_encoder": arch["n_conv_per_stage"],
        "n_conv_per_stage_decoder": arch["n_conv_per_stage_decoder"], "conv_kernel_sizes": arch["kernel_sizes"],
        "pool_op_kernel_sizes": arch["strides"],
        "num_pool_per_axis": [sum(s[axis] > 1 for s in arch["strides"]) for axis in range(3)],
    }  # fmt: skip
    (folder / "plans.json").write_text(json.dumps(plans))
    assert np.array_equal(FoldPredictor(read_model_config(folder), 0, device="cpu").predict(model_input)[0], shipped)


@pytest.mark.parametrize(("available", "folds"), [(3, (0, 1, 2)), ("1", (1,)), ("all", ("all",)),
                                                  ([0, "1", 2], (0, 1, 2)), (["0", "2"], (0, 2))])  # fmt: skip
def test_every_form_of_available_folds(available, folds):
    assert parse_available_folds(available) == folds


def test_a_fold_all_release_loads_and_predicts_the_same(tmp_path, model_input, shipped):
    folder = variant(tmp_path, lambda c: c | {"available_folds": "all"})
    (folder / "fold_0").rename(folder / "fold_all")
    check_model(folder, ["all"])
    assert np.array_equal(FoldPredictor(read_model_config(folder), "all", device="cpu").predict(model_input)[0], shipped)


def test_label_maps_by_location_name_equal_the_ids(tmp_path):
    names = {41: "Arcus_Vertebrae", 42: "Spinosus_Process", 43: "Costal_Process_Left", 44: "Costal_Process_Right",
             45: "Superior_Articular_Left", 46: "Superior_Articular_Right", 47: "Inferior_Articular_Left",
             48: "Inferior_Articular_Right", 49: "Vertebra_Corpus_border", 60: "Spinal_Cord", 61: "Spinal_Canal",
             62: "Endplate", 100: "Vertebra_Disc", 26: "Sacrum"}  # fmt: skip
    folder = variant(tmp_path, lambda c: c | {"labels": {k: names[v] for k, v in c["labels"].items()}})
    assert check_model(folder, [0, 1, 2]).labels == read_model_config(DEMO).labels


def test_inference_augmentation_turns_on_mirroring(tmp_path, model_input, shipped):
    """A release trained with mirroring (its checkpoint allows all three axes) mirrors only when the config says so."""
    folder = variant(tmp_path)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["inference_allowed_mirroring_axes"] is None  # the demo model: nnUNetTrainerNoMirroring
    checkpoint["inference_allowed_mirroring_axes"] = (0, 1, 2)
    torch.save(checkpoint, path)
    assert np.array_equal(FoldPredictor(read_model_config(folder), 0, device="cpu").predict(model_input)[0], shipped)
    config = folder / "inference_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"inference_augmentation": True}))
    predictor = FoldPredictor(read_model_config(folder), 0, device="cpu")
    assert predictor.predictor.use_mirroring
    assert not np.array_equal(predictor.predict(model_input)[0], shipped)  # the mirrored passes are averaged in


def test_a_resolution_range_pair_clamps_each_axis_like_spineps(tmp_path, small_cohort: Path):
    pair = [[1.875, 1.875, 4.4], [3.0, 3.0, 6.0]]
    folder = variant(tmp_path, lambda c: c | {"resolution_range": pair})
    config = read_model_config(folder)
    assert config.spacing_for((1.0, 2.5, 8.0)) == (1.875, 2.5, 6.0)
    assert read_model_config(DEMO).spacing_for((1.0, 2.5, 8.0)) == (1.875, 1.875, 4.4)  # one triple: fixed

    table = cohort.resolve_paths(cohort.read_manifest(small_cohort), small_cohort.parent)
    batch = table.batch.iloc[0]
    n4 = tmp_path / "n4"
    for row in table[table.batch == batch].itertuples():  # the stage reads N4 output: here the raw images,
        image, affine = io.load_image(row.image)  # their voxels stretched to lie below, inside and above the range
        affine[:3, :3] *= [1.8, 0.4, 1.2]
        io.save_nifti(layout.n4_image(n4, row.image_id), image, affine, dtype=np.float32)
    members = table[table.batch == batch].image_id
    io.write_tsv(n4 / layout.LEDGER, pd.DataFrame({"image_id": members, "stage": "bias_correct", "status": "ok", "message": ""}))
    out = tmp_path / "resampled"
    subprocess.run(["spinecohort", "resample", "--manifest", small_cohort, "--batch", batch, "--input", n4, "--model", folder,
                    "--out", out], check=True, capture_output=True)  # fmt: skip
    ledger = pd.read_csv(out / layout.LEDGER, sep="\t", dtype=str, keep_default_na=False)
    assert set(ledger.status) == {"ok"}
    for image_id in ledger.image_id:
        source = io.load_affine(layout.n4_image(n4, image_id))
        given = spacing_along(source, config.orientation)
        expected = np.clip(given, *pair)
        assert not np.allclose(expected, given) and not np.allclose(expected, pair[0])  # the clamp matters
        assert np.allclose(spacing_of(io.load_affine(layout.model_input(out, image_id))), expected, atol=1e-4)
