"""Training: augmentations, learning-rate schedule, cutout targets, manifest checks, nnU-Net plans."""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import pytest

from spinecohort import augment as A
from spinecohort import io, phantom, training
from spinecohort import labels as L
from spinecohort.instance_training import linear_lr, reference_cutouts


def _box(shape=(32, 40, 16), value=49, lo=(10, 12, 4), hi=(22, 28, 12)) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    seg[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return seg


# --- augmentations ----------------------------------------------------------------


def test_flip_swaps_left_right_labels_and_mirrors_the_left_right_axis():
    seg = np.zeros((8, 8, 10), np.uint8)
    seg[2, 3, 1] = L.COSTAL_L  # 43, near the R axis' start
    seg[2, 3, 7] = L.SUP_ARTICULAR_R  # 46
    seg[5, 5, 4] = L.CORPUS
    target = np.zeros_like(seg)
    target[2, 3, 1] = 1
    out, out_t = A.flip_left_right(seg, target)
    assert out[2, 3, 8] == L.COSTAL_R  # 44 at the mirrored position 10 - 1 - 1
    assert out[2, 3, 2] == L.SUP_ARTICULAR_L  # 45
    assert out[5, 5, 5] == L.CORPUS  # unpaired labels stay
    assert out_t[2, 3, 8] == 1 and out_t.sum() == 1
    assert np.array_equal(A.flip_left_right(out, out_t)[0], seg)  # an involution


@pytest.mark.parametrize("factor", [0.8, 1.2])
def test_scaling_changes_the_physical_size_by_the_factor(factor):
    seg = _box(shape=(64, 64, 64), lo=(22, 22, 22), hi=(42, 42, 42))  # 20 voxels wide, centred
    target = (seg > 0).astype(np.uint8) * 2
    out, out_t = A.scale(seg, target, factor)
    for axis in range(3):
        extent = np.ptp(np.nonzero(out)[axis]) + 1
        assert abs(extent - 20 * factor) <= 1
    assert np.array_equal(out > 0, out_t == 2)  # input and target move together
    assert abs((out > 0).sum() / (seg > 0).sum() - factor**3) < 0.1


def test_erosion_peels_one_voxel_off_the_foreground():
    seg = _box()
    out, target = A.erode(seg, seg.copy())
    assert (out > 0).sum() == 10 * 14 * 6  # 12x16x8 box -> 10x14x6
    assert set(np.unique(out)) == {0, 49}
    assert np.array_equal(target, seg)  # the target is what the network should still find


def test_down_up_sampling_makes_two_voxel_blocks():
    rng = np.random.default_rng(0)
    seg = rng.integers(41, 50, size=(16, 16, 8)).astype(np.uint8)
    out, _ = A.down_up(seg, seg, factor=2)
    assert out.shape == seg.shape
    blocks = out.reshape(8, 2, 8, 2, 4, 2)
    assert (blocks == blocks[:, :1, :, :1, :, :1]).all()  # constant in each 2x2x2 block
    assert np.array_equal(out[::2, ::2, ::2], seg[::2, ::2, ::2])


def test_label_drop_removes_exactly_one_label():
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[:3] = L.ARCUS
    seg[3:6] = L.CORPUS
    seg[6:8] = L.CANAL  # not a vertebra part: never dropped
    out, _ = A.drop_label(seg, seg, np.random.default_rng(1))
    gone = set(np.unique(seg)) - set(np.unique(out))
    assert len(gone) == 1 and gone <= {L.ARCUS, L.CORPUS}
    changed = out != seg
    assert (seg[changed] == gone.pop()).all() and (out[changed] == 0).all()


def test_vertical_crop_blanks_input_and_target_beyond_one_level():
    seg = np.full((4, 40, 4), L.CORPUS, np.uint8)
    target = np.full_like(seg, 2)
    for s in range(5):
        out, out_t = A.vertical_crop(seg, target, np.random.default_rng(s))
        kept = out.any(axis=(0, 2))
        assert np.array_equal(kept, out_t.any(axis=(0, 2)))
        # one contiguous run of rows survives, touching one end, at least half the height
        rows = np.flatnonzero(kept)
        assert rows[0] == 0 or rows[-1] == 39
        assert np.all(np.diff(rows) == 1) and 20 <= len(rows) < 40


def test_augment_applies_nothing_at_probability_zero_and_everything_at_one():
    seg = _box(shape=(32, 40, 16))
    seg[12:20, 14:20, 4:6] = L.COSTAL_L
    off = A.AugmentConfig(scale=0, erode=0, down_up=0, drop_label=0, vertical_crop=0, flip=0)
    out, _ = A.augment(seg, seg, np.random.default_rng(0), off)
    assert np.array_equal(out, seg)
    flip_only = A.AugmentConfig(scale=0, erode=0, down_up=0, drop_label=0, vertical_crop=0, flip=1)
    out, _ = A.augment(seg, seg, np.random.default_rng(0), flip_only)
    assert (out == L.COSTAL_R).sum() == (seg == L.COSTAL_L).sum() and not (out == L.COSTAL_L).any()
    with pytest.raises(ValueError, match="rotate"):
        A.AugmentConfig.from_mapping({"rotate": 0.5})


# --- learning rate ----------------------------------------------------------------------


def test_linear_learning_rate_at_start_middle_and_end():
    assert linear_lr(0, 300, 1e-4, 1e-6) == pytest.approx(1e-4)
    assert linear_lr(299, 300, 1e-4, 1e-6) == pytest.approx(1e-6)
    assert linear_lr(150, 301, 1e-4, 1e-6) == pytest.approx((1e-4 + 1e-6) / 2)
    lrs = [linear_lr(e, 300, 1e-4, 1e-6) for e in range(300)]
    assert np.all(np.diff(lrs) < 0) and np.allclose(np.diff(lrs), np.diff(lrs)[0])  # falls by the same step each epoch


# --- training cutouts ---------------------------------------------------------------------


def test_reference_cutouts_mark_above_centre_and_below():
    ph = phantom.render_station(phantom.make_subject(3, 0), "lumbar", phantom.PRESETS["small"], seed=3, index=0)
    from spinecohort import geometry

    grid = geometry.target_grid(ph.semantic.shape, ph.affine, ("P", "I", "R"), (2.5, 2.5, 4.4))
    seg = geometry.resample(ph.semantic, ph.affine, grid, kind="nearest")
    inst = geometry.resample(ph.instance, ph.affine, grid, kind="nearest")
    cutouts = list(reference_cutouts(seg, inst, (64, 80, 16)))
    bodies = [v for v in np.unique(inst) if 0 < v < 100 and ((seg == L.CORPUS) & (inst == v)).sum() >= 100]
    assert len(cutouts) == len(bodies) >= 5
    for c in cutouts:
        assert set(np.unique(c.target)) <= {0, 1, 2, 3} and (c.target == 2).any()
        assert (np.isin(c.seg[c.target > 0], L.VERTEBRA_PARTS)).all()  # targets on vertebra voxels only
        # the centre vertebra holds the cutout's middle; "above" lies superior (smaller I) of "below"
        rows = {k: np.nonzero(c.target == k)[1].mean() for k in (1, 2, 3) if (c.target == k).any()}
        assert abs(rows[2] - 40) < 8
        assert rows.get(1, -1) < rows[2] < rows.get(3, 1e9)
    # the last body (L5; the sacrum is no vertebra target) has nothing below
    assert not (cutouts[-1].target == 3).any() and (cutouts[-2].target == 3).any()


# --- the training manifest ---------------------------------------------------------------


def test_training_manifest_lists_rows_without_references_and_with_unknown_labels(tmp_path):
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    good, bad = np.zeros((8, 8, 4), np.int16), np.zeros((8, 8, 4), np.int16)
    good[2:4, 2:4, 1] = L.CORPUS
    bad[2:4, 2:4, 1] = 77  # no SPINEPS semantic id
    io.save_nifti(tmp_path / "img.nii.gz", np.random.default_rng(0).random((8, 8, 4)), affine)
    io.save_nifti(tmp_path / "good.nii.gz", good, affine)
    io.save_nifti(tmp_path / "bad.nii.gz", bad, affine)
    rows = [
        ("s1", "cervical", "good.nii.gz"),
        ("s2", "cervical", ""),
        ("s3", "lumbar", "bad.nii.gz"),
    ]
    table = pd.DataFrame(
        [{"subject": s, "region": r, "image": str(tmp_path / "img.nii.gz") + f"?{s}", "reference_semantic": str(tmp_path / p) if p else ""} for s, r, p in rows]
    )
    with pytest.raises(training.TrainingManifestError) as err:
        training.check_training_manifest(table, references=["reference_semantic"])
    message = str(err.value)
    assert "row 2 (sub-s2_chunk-cervical): no reference_semantic" in message
    assert "row 3 (sub-s3_chunk-lumbar): reference_semantic has unknown label ids [77]" in message
    assert "row 1" not in message and "nothing trained" in message


def test_subject_folds_keep_a_subjects_stations_together():
    table = pd.DataFrame({"subject": [f"s{i // 3}" for i in range(18)], "image_id": [f"i{i}" for i in range(18)]})
    splits = training.subject_folds(table, 3)
    assert len(splits) == 3
    vals = [set(s["val"]) for s in splits]
    assert set.union(*vals) == set(table.image_id) and sum(map(len, vals)) == 18  # each image validated once
    for split in splits:
        val_subjects = set(table.set_index("image_id").loc[split["val"], "subject"])
        train_subjects = set(table.set_index("image_id").loc[split["train"], "subject"])
        assert not val_subjects & train_subjects and len(val_subjects) == 2


# --- nnU-Net plans ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch, spacing",
    [((64, 256, 256), (1.65, 0.75, 0.75)), ((16, 128, 128), (4.4, 1.875, 1.875)), ((32, 64, 96), (1.0, 1.0, 1.0))],
)
def test_unet_topology_pools_every_axis_to_a_whole_size(patch, spacing):
    strides, kernels = training.unet_topology(patch, spacing)
    total = np.prod(strides, axis=0)
    assert all(p % t == 0 and p // t >= 4 for p, t in zip(patch, total))
    assert len(strides) == len(kernels) and strides[0] == [1, 1, 1]
    # the coarse through-plane axis of an anisotropic station is neither pooled nor convolved at first
    if spacing[0] > 2 * min(spacing):
        assert kernels[0][0] == 1 and strides[1][0] == 1


# --- smoke training through the rules ----------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SMOKE = {
    "n4": {"iterations": [5]},
    "training": {
        "demo": {"subjects": 2},
        "semantic": {"folds": 2, "epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1,
                     "resolution": [1.875, 1.875, 4.4], "patch_size": [64, 64, 16], "features": [4, 8, 16, 16]},
        "instance": {"resolution": [2.5, 2.5, 4.4], "cutout": [64, 80, 16], "dim": 8, "epochs": 1},
    },
}  # fmt: skip


def _snakemake(results, *extra: str, manifest: str = "demo") -> subprocess.CompletedProcess[str]:
    import yaml

    smoke = {**SMOKE, "results": str(results)}
    smoke["training"] = {**SMOKE["training"], "manifest": manifest}
    configfile = results / "smoke.yaml"
    configfile.write_text(yaml.safe_dump(smoke))
    return subprocess.run(
        ["snakemake", "train_models", "--cores", "2", "--configfile", str(configfile), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip


@pytest.mark.slow
def test_smoke_training_exports_models_the_inference_code_loads(tmp_path):
    import torch

    from spinecohort.instance_net import NetworkPredictor
    from spinecohort.instances import assemble, read_instance_model
    from spinecohort.semantic import FoldPredictor, read_model_config

    proc = _snakemake(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = tmp_path / "training" / "models"

    semantic = read_model_config(models / "semantic")
    assert semantic.folds == (0, 1) and semantic.spacing == (1.875, 1.875, 4.4) and not semantic.mirroring
    plans = io.read_json(models / "semantic" / "plans.json")["configurations"]["3d_fullres"]
    assert plans["patch_size"] == [16, 64, 64] and plans["batch_size"] == 2  # (z, y, x) = reversed (P, I, R)
    assert plans["architecture"]["arch_kwargs"]["features_per_stage"] == [4, 8, 16, 16]
    ckpt = torch.load(models / "semantic" / "fold_1" / "checkpoint_final.pth", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainerNoMirroring" and ckpt["inference_allowed_mirroring_axes"] is None
    assert "optimizer_state" not in ckpt
    # the exported fold predicts a training image (already on the model grid) with nnU-Net's predictor
    image = next((tmp_path / "training" / "nnUNet_raw").glob("Dataset900_*/imagesTr/*_0000.nii.gz"))
    logits, props = FoldPredictor(semantic, 1, device="cpu").predict(image)
    assert logits.shape[0] == len(L.SEMANTIC_LABELS) + 1 and np.isfinite(logits.astype(np.float32)).all()
    _check_fine_tuning_starts_from(models / "semantic", tmp_path / "training")

    model = read_instance_model(models / "instance")
    assert model.spacing == (2.5, 2.5, 4.4) and model.cutout == (64, 80, 16)
    predictor = NetworkPredictor(model.checkpoint, device=torch.device("cpu"))
    ref = next((tmp_path / "training" / "demo_cohort").glob("derivatives/reference/*/anat/*chunk-LWS*seg-spine_msk.nii.gz"))
    seg, affine = io.load_mask(ref)
    from spinecohort import geometry

    grid = geometry.target_grid(seg.shape, affine, model.orientation, model.spacing)
    instance, _ = assemble(geometry.resample(seg, affine, grid, kind="nearest"), model, predictor, "lumbar")
    assert instance.shape == grid[0]
    assert (tmp_path / "benchmarks" / "train" / "semantic_fold0.tsv").is_file()


FINE_TUNE_START = """
import sys, torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import nnUNetTrainerNoMirroring
from spinecohort import training
model, root = sys.argv[1:]
start = {}
nnUNetTrainerNoMirroring.run_training = lambda self: start.update(self.network.state_dict())  # the start is all we check
training.train_semantic_fold(root, 900, 1, epochs=1, iterations_per_epoch=1, val_iterations_per_epoch=1,
                             device="cpu", pretrained=model)
pretrained = torch.load(f"{model}/fold_1/checkpoint_final.pth", weights_only=True)["network_weights"]
assert start.keys() == pretrained.keys() and all(torch.equal(start[k], v) for k, v in pretrained.items())
print("fine-tuning starts from fold 1")
"""


def _check_fine_tuning_starts_from(model, root) -> None:
    """Fold 1 fine-tuned from `model` starts with exactly its fold 1 weights (own process: nnU-Net's folders)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FINE_TUNE_START, str(model), str(root)], capture_output=True, text=True)
    assert proc.returncode == 0 and "starts from fold 1" in proc.stdout, proc.stderr[-3000:]


def test_pretrained_weights_refuse_other_labels_and_missing_folds(tmp_path):
    from spinecohort.training import pretrained_weights

    demo = ROOT / "resources" / "demo_models" / "semantic"
    dataset = io.read_json(demo / "dataset.json")
    weights = pretrained_weights(demo, 2, dataset)
    assert weights["decoder.seg_layers.3.bias"].shape[0] == len(dataset["labels"])
    swapped = {**dataset, "labels": {**dataset["labels"], "background": 1, "class_1": 0}}
    with pytest.raises(ValueError, match="pretrained model labels .* differ"):
        pretrained_weights(demo, 0, swapped)
    with pytest.raises(FileNotFoundError, match="no fold 3"):
        pretrained_weights(demo, 3, dataset)


@pytest.mark.slow
def test_training_manifest_without_references_fails_before_training(tmp_path, small_cohort):
    table = pd.read_csv(small_cohort, sep="\t", dtype=str, keep_default_na=False)
    table.loc[1, "reference_semantic"] = ""
    table.loc[4, "reference_instance"] = ""
    manifest = small_cohort.parent / "training_missing.tsv"
    table.to_csv(manifest, sep="\t", index=False)
    proc = _snakemake(tmp_path, "--keep-going", manifest=str(manifest))
    assert proc.returncode != 0
    logs = "".join(p.read_text() for p in (tmp_path / "logs" / "train").glob("*.log"))
    assert f"row 2 ({table.image_id[1]}): no reference_semantic" in logs
    assert f"row 5 ({table.image_id[4]}): no reference_instance" in logs
    assert not list((tmp_path / "training").glob("nnUNet_results/*/*/fold_*/checkpoint_final.pth"))
    assert not (tmp_path / "training" / "models" / "instance" / "instance_weights.ckpt").exists()
