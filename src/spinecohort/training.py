"""Training both SPINEPS models from a training manifest (supplement A of the SPINEPS paper).

Semantic model: the images are preprocessed exactly as inference does (N4,
reorient, resample), written as an nnU-Net v2 raw dataset, planned and
preprocessed by nnU-Net, and trained fold by fold by nnU-Net's own trainer
with mirroring off (`nnUNetTrainerNoMirroring`). Folds are split by subject so
that the stations of one subject never sit on both sides of a split.

Every function here that imports nnU-Net sets its folder variables first;
nnU-Net reads them once, at import, so each runs in its own process (a
workflow job).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from . import cohort, io, layout
from . import labels as L
from .defaults import DEVICE_HELP
from .defaults import N4 as N4_DEFAULTS
from .models import SEMANTIC_INDEX, nnunet_dataset_json, semantic_inference_config

__all__ = [
    "TrainingManifestError",
    "check_training_manifest",
    "subject_folds",
    "unet_topology",
    "write_raw_dataset",
    "plan_and_preprocess",
    "train_semantic_fold",
    "export_semantic_model",
]

TRAINER = "nnUNetTrainerNoMirroring"
CONFIGURATION = "3d_fullres"
_MODEL_INDEX = {lab: k for k, lab in SEMANTIC_INDEX.items()}
log = logging.getLogger("spinecohort")


class TrainingManifestError(ValueError):
    """A training manifest that cannot be trained on; the message lists the offending rows."""


# --- the training manifest --------------------------------------------------------


def check_training_manifest(table: pd.DataFrame, *, references: Sequence[str], source: str = "training manifest") -> pd.DataFrame:
    """The manifest if every row has the `references` columns filled and only known label ids in them.

    Fails before any training starts, listing every offending row at once.
    """
    table = cohort.check_manifest(table, source=source, require_batch=False)
    allowed = {"reference_semantic": L.SEMANTIC_MASK_IDS, "reference_instance": L.INSTANCE_MASK_IDS}
    problems = []
    for n, row in enumerate(table.itertuples(index=False), start=1):  # 1-based, header excluded, as check_manifest
        for column in references:
            path = getattr(row, column, "") if column in table.columns else ""
            if not path:
                problems.append(f"row {n} ({row.image_id}): no {column}")
                continue
            try:
                if unknown := L.unknown_ids(io.load_mask(path)[0], allowed[column]):
                    problems.append(f"row {n} ({row.image_id}): {column} has unknown label ids {unknown}")
            except ValueError as exc:  # ImageError: unreadable or malformed mask
                problems.append(f"row {n} ({row.image_id}): {exc}")
    if problems:
        raise TrainingManifestError(f"{source}: {len(problems)} problem(s), nothing trained:\n  " + "\n  ".join(problems))
    return table


def subject_folds(table: pd.DataFrame, k: int, *, seed: int = 12345) -> list[dict[str, list[str]]]:
    """nnU-Net `splits_final.json` entries: K folds over subjects (all stations of a subject together)."""
    subjects = np.array(sorted(table["subject"].unique()))
    if len(subjects) < k:
        raise TrainingManifestError(f"{k} folds need at least {k} subjects, the training manifest has {len(subjects)}")
    np.random.default_rng(seed).shuffle(subjects)
    fold_of = {s: i % k for i, s in enumerate(subjects)}
    splits = []
    for fold in range(k):
        val = table["subject"].map(fold_of) == fold
        splits.append({"train": sorted(table.loc[~val, "image_id"]), "val": sorted(table.loc[val, "image_id"])})
    return splits


# --- the nnU-Net dataset ----------------------------------------------------------


def to_model_indices(reference: NDArray[np.integer]) -> NDArray[np.uint8]:
    """SPINEPS semantic ids -> the model's output indices (0 = background)."""
    lut = np.zeros(max(256, int(reference.max()) + 1), np.uint8)
    for lab, k in _MODEL_INDEX.items():
        lut[lab] = k
    return lut[reference]


def preprocess_pair(
    image_path: str, reference_path: str, *, orientation: Sequence[str], spacing: Sequence[float], n4: dict[str, Any], threads: int = 1
) -> tuple[NDArray[np.float32], NDArray[np.int32], NDArray[np.float64]]:
    """Image and reference on the model's grid, the image through the same N4 and resampling as inference."""
    from . import geometry  # SimpleITK: not at import, which every CLI start pays
    from .preprocess import bias_correct, to_model_space

    image, affine = io.load_image(image_path)
    reference, ref_affine = io.load_mask(reference_path)
    if problem := geometry.geometry_mismatch(Path(image_path), image.shape, affine, Path(reference_path), reference.shape, ref_affine):
        raise ValueError(problem)
    corrected = bias_correct(image, affine, threads=threads, **n4).corrected
    out, out_affine = to_model_space(corrected, affine, orientation=orientation, spacing=spacing, threads=threads)
    labels = geometry.resample(reference, affine, (out.shape, out_affine), kind="nearest", threads=threads)
    return out, labels, out_affine


def write_raw_dataset(
    table: pd.DataFrame, folder: str | Path, *, orientation: Sequence[str], spacing: Sequence[float], n4: dict[str, Any], threads: int = 1
) -> Path:
    """An nnU-Net v2 raw dataset (imagesTr, labelsTr, dataset.json) of the manifest's images on the model grid."""
    folder = Path(folder)
    for row in table.itertuples(index=False):
        image, labels, affine = preprocess_pair(row.image, row.reference_semantic, orientation=orientation, spacing=spacing, n4=n4, threads=threads)
        io.save_nifti(layout.model_input(folder / "imagesTr", row.image_id), image, affine, dtype=np.float32)
        io.save_nifti(folder / "labelsTr" / f"{row.image_id}.nii.gz", to_model_indices(labels), affine, dtype=np.uint8)
    dataset = nnunet_dataset_json(len(SEMANTIC_INDEX) + 1)
    dataset["numTraining"] = len(table)
    io.write_json(folder / "dataset.json", dataset)
    return folder


# --- planning -----------------------------------------------------------------------


def unet_topology(patch_zyx: Sequence[int], spacing_zyx: Sequence[float], *, max_stages: int = 6, min_size: int = 4) -> tuple[list[list[int]], list[list[int]]]:
    """Pooling strides and kernel sizes for a patch, after nnU-Net's rules.

    An axis is pooled while it halves evenly to at least `min_size` voxels and
    its spacing is at most twice the finest; a kernel is 1 along an axis that is
    still more than twice as coarse as the finest (anisotropic stations).

    >>> unet_topology((16, 64, 64), (4.4, 1.875, 1.875))
    ([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]])
    """
    size = np.array(patch_zyx, int)
    spacing = np.array(spacing_zyx, float)

    three = np.zeros(3, bool)

    def kernel() -> list[int]:
        three[:] |= spacing <= 2 * spacing.min()  # once 3 along an axis, always 3 (as nnU-Net)
        return np.where(three, 3, 1).tolist()

    strides, kernels = [[1, 1, 1]], [kernel()]
    while len(strides) < max_stages:
        pool = (size % 2 == 0) & (size // 2 >= min_size) & (spacing <= 2 * spacing.min())
        if not pool.any():
            break
        stride = np.where(pool, 2, 1)
        size //= stride
        spacing *= stride
        strides.append(stride.tolist())
        kernels.append(kernel())
    return strides, kernels


def adapt_plans(plans: dict[str, Any], *, spacing_zyx: Sequence[float], patch_zyx: Sequence[int], batch_size: int, features: Sequence[int] | None) -> dict[str, Any]:
    """nnU-Net's plans with our spacing, patch and batch size, and a U-Net whose pooling fits the patch.

    `features` gives the width of each stage (its length caps the depth); None
    keeps nnU-Net's widths (32 doubling up to 320).
    """
    config = plans["configurations"][CONFIGURATION]
    strides, kernels = unet_topology(patch_zyx, spacing_zyx, max_stages=len(features) if features else 6)
    widths = list(features[: len(strides)]) if features else [min(32 * 2**k, 320) for k in range(len(strides))]
    bad = [p for p, s in zip(patch_zyx, np.prod(strides, axis=0)) if p % s]
    if bad:
        raise ValueError(f"patch {list(patch_zyx)} does not divide by the pooling {np.prod(strides, axis=0).tolist()}")
    arch = config["architecture"]["arch_kwargs"]
    arch.update(
        n_stages=len(strides), features_per_stage=widths, kernel_sizes=kernels, strides=strides,
        n_conv_per_stage=[2] * len(strides), n_conv_per_stage_decoder=[2] * (len(strides) - 1),
    )  # fmt: skip
    config.update(spacing=[float(s) for s in spacing_zyx], patch_size=[int(p) for p in patch_zyx], batch_size=int(batch_size))
    plans["original_median_spacing_after_transp"] = [float(s) for s in spacing_zyx]
    return plans


def _set_nnunet_folders(root: Path) -> dict[str, Path]:
    """Point nnU-Net at `root`/nnUNet_{raw,preprocessed,results}; refuses if nnU-Net was imported with others."""
    import sys

    folders = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, path in folders.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    paths = sys.modules.get("nnunetv2.paths")
    if paths is not None and any(getattr(paths, n) != str(p) for n, p in folders.items()):
        raise RuntimeError("nnU-Net was imported with other nnUNet_* folders; run training in its own process")
    return folders


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def dataset_folder(parent: Path, dataset_id: int) -> Path:
    """The `DatasetXXX_<name>` folder of `dataset_id` under an nnU-Net folder (the name is nnU-Net's to keep)."""
    found = sorted(parent.glob(f"Dataset{dataset_id:03d}_*"))
    if len(found) != 1:
        raise FileNotFoundError(f"{parent}: expected one Dataset{dataset_id:03d}_* folder, found {len(found)}")
    return found[0]


def plan_and_preprocess(
    root: str | Path, dataset_id: int, *, spacing_zyx: Sequence[float], patch_zyx: Sequence[int], batch_size: int,
    features: Sequence[int] | None, splits: list[dict[str, list[str]]], processes: int = 1,
) -> Path:  # fmt: skip
    """nnU-Net fingerprint, plans (then adapted, see `adapt_plans`), our subject splits, and preprocessing."""
    folders = _set_nnunet_folders(Path(root))
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    extract_fingerprints([dataset_id], num_processes=processes, check_dataset_integrity=True, show_progress_bar=False)
    plan_experiments([dataset_id], overwrite_target_spacing=tuple(float(s) for s in spacing_zyx))
    preprocessed = dataset_folder(folders["nnUNet_preprocessed"], dataset_id)
    plans_path = preprocessed / "nnUNetPlans.json"
    plans = adapt_plans(io.read_json(plans_path), spacing_zyx=spacing_zyx, patch_zyx=patch_zyx, batch_size=batch_size, features=features)
    io.write_json(plans_path, plans)
    io.write_json(preprocessed / "splits_final.json", splits)
    preprocess([dataset_id], configurations=(CONFIGURATION,), num_processes=(processes,), show_progress_bar=False)
    return preprocessed


# --- training and export --------------------------------------------------------------


def train_semantic_fold(
    root: str | Path, dataset_id: int, fold: int, *, epochs: int, iterations_per_epoch: int, val_iterations_per_epoch: int,
    device: str = "auto", seed: int = 0, pretrained: str | Path | None = None,
) -> Path:  # fmt: skip
    """Train one fold with nnU-Net's `nnUNetTrainerNoMirroring`; returns its `checkpoint_final.pth`.

    `pretrained`: a SPINEPS-format semantic model folder to fine-tune (its fold `fold` initialises
    this fold, so each fold's validation subjects stay unseen); optimizer and schedule start afresh.
    """
    folders = _set_nnunet_folders(Path(root))
    import torch
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import nnUNetTrainerNoMirroring

    from .semantic import pick_device

    preprocessed = dataset_folder(folders["nnUNet_preprocessed"], dataset_id)
    plans = io.read_json(preprocessed / "nnUNetPlans.json")
    plans["continue_training"] = False  # nnU-Net 2.8 pops this key in __init__
    torch.manual_seed(seed * 1000 + fold)
    dataset = io.read_json(preprocessed / "dataset.json")
    trainer = nnUNetTrainerNoMirroring(plans, CONFIGURATION, fold, dataset, device=pick_device(device))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations_per_epoch
    trainer.num_val_iterations_per_epoch = val_iterations_per_epoch
    if pretrained is not None:
        trainer.initialize()
        network = getattr(trainer.network, "_orig_mod", trainer.network)
        network.load_state_dict(pretrained_weights(pretrained, fold, dataset))
    trainer.run_training()
    return Path(trainer.output_folder) / "checkpoint_final.pth"


def pretrained_weights(model: str | Path, fold: int, dataset: Mapping[str, Any]) -> dict[str, Any]:
    """Network weights of `model`'s fold `fold`, after checking it predicts the same labels as `dataset`.

    Read without running code from the file (`checkpoints.load_checkpoint`).
    """
    from .checkpoints import load_checkpoint

    model = Path(model)
    theirs = io.read_json(model / "dataset.json")["labels"]
    if theirs != dataset["labels"]:
        raise ValueError(f"{model}: pretrained model labels {theirs} differ from the training dataset's {dataset['labels']}")
    checkpoint = model / f"fold_{fold}" / "checkpoint_final.pth"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: the pretrained model has no fold {fold}")
    return load_checkpoint(checkpoint)["network_weights"]


def export_semantic_model(
    root: str | Path, dataset_id: int, folds: int, out: str | Path, *, orientation: Sequence[str], spacing: Sequence[float], name: str
) -> Path:
    """A SPINEPS-format model folder from the trained folds (plans, dataset.json, fold_k, inference_config.json).

    Checkpoints keep what inference reads and drop the optimizer state (half the size).
    """
    import torch

    from .checkpoints import load_checkpoint

    root, out = Path(root), Path(out)
    trained = dataset_folder(root / "nnUNet_results", dataset_id) / f"{TRAINER}__nnUNetPlans__{CONFIGURATION}"
    for fold in range(folds):
        ckpt = load_checkpoint(trained / f"fold_{fold}" / "checkpoint_final.pth")
        keep = {k: ckpt[k] for k in ("network_weights", "trainer_name", "init_args", "inference_allowed_mirroring_axes", "current_epoch")}
        with io.atomic_path(out / f"fold_{fold}" / "checkpoint_final.pth") as tmp:
            torch.save(keep, tmp)
    for name_ in ("plans.json", "dataset.json"):
        with io.atomic_path(out / name_) as tmp:
            shutil.copyfile(trained / name_, tmp)
    config = semantic_inference_config(orientation=orientation, spacing=spacing, folds=folds, name=name)
    io.write_json(out / "inference_config.json", config)  # last: marks the folder complete
    return out


# --- command line (one workflow job each) -----------------------------------------------


def read_training_manifest(path: str | Path, references: Sequence[str]) -> pd.DataFrame:
    path = Path(path)
    table = cohort.resolve_paths(cohort.read_manifest(path), path.parent)
    return check_training_manifest(table, references=references, source=str(path))


def _semantic_data(args: argparse.Namespace) -> None:
    table = read_training_manifest(args.manifest, ["reference_semantic"])
    n4 = {"shrink": args.shrink, "iterations": args.iterations, "bias_fwhm": args.bias_fwhm}
    folder = Path(args.root) / "nnUNet_raw" / dataset_name(args.dataset_id, args.dataset_name)
    write_raw_dataset(table, folder, orientation=args.orientation, spacing=args.spacing, n4=n4, threads=args.threads)
    io.write_json(folder / "splits_final.json", subject_folds(table, args.folds))


def _semantic_plan(args: argparse.Namespace) -> None:
    raw = Path(args.root) / "nnUNet_raw" / dataset_name(args.dataset_id, args.dataset_name)
    plan_and_preprocess(
        args.root, args.dataset_id, spacing_zyx=args.spacing[::-1], patch_zyx=args.patch_size[::-1], batch_size=args.batch_size,
        features=args.features, splits=io.read_json(raw / "splits_final.json"), processes=args.threads,
    )  # fmt: skip


def _semantic_fold(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("nnUNet_n_proc_DA", str(max(1, args.threads - 1)))
    train_semantic_fold(
        args.root, args.dataset_id, args.fold, epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
        val_iterations_per_epoch=args.val_iterations_per_epoch, device=args.device, seed=args.seed,
        pretrained=args.pretrained,
    )  # fmt: skip


def _semantic_export(args: argparse.Namespace) -> None:
    export_semantic_model(args.root, args.dataset_id, args.folds, args.out, orientation=args.orientation, spacing=args.spacing, name=args.name)


def _instance(args: argparse.Namespace) -> None:
    import torch

    from .augment import AugmentConfig
    from .instance_training import export_instance_model, table_cutouts, train_instance_network

    torch.set_num_threads(args.threads)
    table = read_training_manifest(args.manifest, ["reference_semantic", "reference_instance"])
    cutouts = table_cutouts(table, orientation=("P", "I", "R"), spacing=args.spacing, size=args.cutout, min_corpus=args.min_corpus)
    log.info("%d training cutouts from %d references", len(cutouts), len(table))
    net, losses = train_instance_network(
        cutouts, epochs=args.epochs, batch_size=args.batch_size, lr=tuple(args.lr), dim=args.dim,
        augmentation=AugmentConfig.from_mapping(args.augment), seed=args.seed, device=args.device,
    )  # fmt: skip
    export_instance_model(net, args.out, spacing=args.spacing, cutout=args.cutout, name=args.name, epochs=args.epochs,
                          lr=tuple(args.lr), final_loss=losses[-1])


def _labeling(args: argparse.Namespace) -> None:
    import torch

    from .labeling_training import export_labeling_model, head_accuracy, train_labeling_network, training_examples

    torch.set_num_threads(args.threads)
    table = read_training_manifest(args.manifest, ["reference_semantic", "reference_instance"])
    examples = training_examples(table, size=tuple(args.cutout), resolution=args.resolution_range)
    log.info("%d training cutouts from %d references", len(examples), len(table))
    net, losses = train_labeling_network(examples, epochs=args.epochs, batch_size=args.batch_size, lr=tuple(args.lr),
                                         backbone=args.backbone, seed=args.seed, device=args.device)  # fmt: skip
    log.info("training cutouts named right per head: %s", ", ".join(f"{h} {v:.3f}" for h, v in head_accuracy(net, examples).items()))
    export_labeling_model(net, args.out, size=tuple(args.cutout), resolution=args.resolution_range, name=args.name)


def add_training_parsers(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", type=Path, required=True, help="training folder (holds nnUNet_raw/_preprocessed/_results)")
        p.add_argument("--dataset-id", type=int, default=900, help="nnU-Net dataset id (default %(default)s)")
        p.add_argument("--threads", type=int, default=1, help="CPU threads (default %(default)s)")

    model_axes = "in the model's axis order (orientation), mm"
    p = sub.add_parser("train-semantic-data", help="check a training manifest; N4, resample and write the nnU-Net raw dataset")
    common(p)
    p.add_argument("--manifest", type=Path, required=True, help="training manifest TSV (reference masks in every row)")
    p.add_argument("--dataset-name", default="SpineCohort", help="nnU-Net dataset name (default %(default)s)")
    p.add_argument("--orientation", nargs=3, default=("P", "I", "R"), help="model axis order (default P I R)")
    p.add_argument("--spacing", type=float, nargs=3, required=True, help=model_axes)
    p.add_argument("--folds", type=int, default=3, help="K: folds split by subject")
    p.add_argument("--shrink", type=int, nargs=3, default=N4_DEFAULTS["shrink"], help="N4 shrink factor per axis")
    p.add_argument("--iterations", type=int, nargs="+", default=N4_DEFAULTS["iterations"], help="N4 iterations per level")
    p.add_argument("--bias-fwhm", type=float, default=N4_DEFAULTS["bias_fwhm"], help="N4 bias field FWHM (default %(default)s)")
    p.set_defaults(handler=_semantic_data)

    p = sub.add_parser("train-semantic-plan", help="nnU-Net fingerprint, plans (our patch, batch, U-Net), preprocessing")
    common(p)
    p.add_argument("--dataset-name", default="SpineCohort", help="nnU-Net dataset name (default %(default)s)")
    p.add_argument("--spacing", type=float, nargs=3, required=True, help=model_axes)
    p.add_argument("--patch-size", type=int, nargs=3, required=True, help="voxels, in the model's axis order")
    p.add_argument("--batch-size", type=int, default=2, help="patches per training step (default %(default)s)")
    p.add_argument("--features", type=int, nargs="+", default=None, help="width per U-Net stage (default nnU-Net's)")
    p.set_defaults(handler=_semantic_plan)

    p = sub.add_parser("train-semantic-fold", help="train one fold with nnU-Net (nnUNetTrainerNoMirroring)")
    common(p)
    p.add_argument("--fold", type=int, required=True, help="fold to train (0..K-1)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs (default %(default)s)")
    p.add_argument("--iterations-per-epoch", type=int, default=250, help="training steps per epoch (default %(default)s)")
    p.add_argument("--val-iterations-per-epoch", type=int, default=50, help="validation steps per epoch (default %(default)s)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--pretrained", type=Path, help="SPINEPS-format semantic model folder to fine-tune (fold k from its fold_k)")
    p.set_defaults(handler=_semantic_fold)

    p = sub.add_parser("export-semantic-model", help="SPINEPS-format model folder from the trained folds")
    common(p)
    p.add_argument("--folds", type=int, required=True, help="K: folds trained")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--orientation", nargs=3, default=("P", "I", "R"), help="model axis order (default P I R)")
    p.add_argument("--spacing", type=float, nargs=3, required=True, help=model_axes)
    p.add_argument("--name", default="spinecohort_semantic", help="log_name in inference_config.json (default %(default)s)")
    p.set_defaults(handler=_semantic_export)

    p = sub.add_parser("train-instance", help="train and export the vertebra-instance U-Net on reference cutouts")
    p.add_argument("--manifest", type=Path, required=True, help="training manifest TSV (reference masks in every row)")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--spacing", type=float, nargs=3, required=True, help="(P, I, R) mm")
    p.add_argument("--cutout", type=int, nargs=3, default=(248, 304, 64), help="(P, I, R) voxels")
    p.add_argument("--min-corpus", type=int, default=100, help="smallest body (voxels) that gets a cutout")
    p.add_argument("--epochs", type=int, default=300, help="epochs (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="cutouts per step (default %(default)s)")
    p.add_argument("--lr", type=float, nargs=2, default=(1e-4, 1e-6), help="first and last epoch's learning rate")
    p.add_argument("--dim", type=int, default=16, help="U-Net base width (multiple of 8)")
    p.add_argument("--augment", type=json.loads, default={}, help="JSON: augmentation probabilities (augment.AugmentConfig)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default %(default)s)")
    p.add_argument("--name", default="spinecohort_instance", help="log_name in inference_config.json (default %(default)s)")
    p.set_defaults(handler=_instance)
    p = sub.add_parser("train-labeling", help="train and export a SPINEPS-format labelling model on reference vertebra cutouts")
    p.add_argument("--manifest", type=Path, required=True, help="training manifest TSV (reference masks in every row)")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--resolution-range", type=json.loads, required=True,
                   help="JSON: the model's resolution_range, (P, I, R) mm, or a [min, max] pair of them")
    p.add_argument("--cutout", type=int, nargs=3, required=True, help="(P, I, R) voxels: the model's final_size")
    p.add_argument("--backbone", choices=("DENSENET121", "DENSENET169"), default="DENSENET121", help="(default %(default)s)")
    p.add_argument("--epochs", type=int, required=True, help="epochs")
    p.add_argument("--batch-size", type=int, default=8, help="cutouts per step (default %(default)s)")
    p.add_argument("--lr", type=float, nargs=2, default=(1e-3, 1e-5), help="first and last epoch's learning rate")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default %(default)s)")
    p.add_argument("--name", default="T2w_labeling_spinecohort", help="log_name in inference_config.json (default %(default)s)")
    p.set_defaults(handler=_labeling)
