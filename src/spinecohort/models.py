"""Building SPINEPS-format nnU-Net model folders (plans, dataset.json, inference_config.json).

`write_random_semantic_model` makes a real nnU-Net v2 trained-model folder with
randomly initialised weights: every file format is the real one, only the
segmentations are meaningless. Tests use it for the mechanics; the demo uses
trained models (resources/demo_models).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from . import io
from . import labels as L

__all__ = ["nnunet_plans", "nnunet_dataset_json", "semantic_inference_config", "write_random_semantic_model"]

# Model output index k + 1 predicts SEMANTIC_LABELS[k].
SEMANTIC_INDEX = {k + 1: lab for k, lab in enumerate(L.SEMANTIC_LABELS)}


def nnunet_dataset_json(n_classes: int, *, channel: str = "T2w") -> dict[str, Any]:
    labels = {"background": 0}
    labels.update({f"class_{k}": k for k in range(1, n_classes)})
    return {"channel_names": {"0": channel}, "labels": labels, "numTraining": 0, "file_ending": ".nii.gz"}


def nnunet_plans(
    *,
    spacing_zyx: Sequence[float],
    patch_zyx: Sequence[int],
    features: Sequence[int] = (4, 8, 16, 32),
    strides: Sequence[Sequence[int]] = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2)),
    batch_size: int = 2,
    name: str = "Dataset900_SpineCohortDemo",
) -> dict[str, Any]:
    """A one-configuration (3d_fullres) nnU-Net v2 plans dict with a PlainConvUNet.

    Spacing and patch are in nnU-Net's (z, y, x) order, the reverse of the
    NIfTI axes.
    """
    n = len(features)
    kernel = [[3, 3, 3]] * n
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": list(features),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": kernel,
            "strides": [list(s) for s in strides],
            "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    resampling = {
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
    }
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size,
        "patch_size": list(patch_zyx),
        "median_image_size_in_voxels": list(patch_zyx),
        "spacing": [float(s) for s in spacing_zyx],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "architecture": arch,
        "batch_dice": False,
        **resampling,
    }
    return {
        "dataset_name": name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [float(s) for s in spacing_zyx],
        "original_median_shape_after_transp": list(patch_zyx),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": config},
        "experiment_planner_used": "spinecohort",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0, "percentile_99_5": 1.0, "std": 1.0}
        },
    }


def semantic_inference_config(
    *, orientation: Sequence[str], spacing: Sequence[float], folds: int, name: str
) -> dict[str, Any]:
    """SPINEPS `inference_config.json` for a T2w semantic nnU-Net (mirroring off)."""
    return {
        "log_name": name,
        "modality": "T2w",
        "acquisition": "sag",
        "modeltype": "nnunet",
        "model_expected_orientation": list(orientation),
        "resolution_range": [float(s) for s in spacing],
        "available_folds": folds,
        "inference_augmentation": False,
        "default_step_size": 0.5,
        "labels": {str(k): v for k, v in SEMANTIC_INDEX.items()},
    }


def write_random_semantic_model(
    out: str | Path,
    *,
    orientation: Sequence[str] = ("P", "I", "R"),
    spacing: Sequence[float] = (2.0, 2.0, 4.4),
    patch_zyx: Sequence[int] = (16, 96, 96),
    features: Sequence[int] = (4, 8, 16, 32),
    strides: Sequence[Sequence[int]] = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2)),
    folds: int = 3,
    seed: int = 0,
) -> Path:
    """Write an nnU-Net v2 model folder with random weights (one seed per fold).

    Checkpoints hold what nnU-Net's predictor reads: `network_weights`,
    `trainer_name`, `init_args.configuration` and
    `inference_allowed_mirroring_axes` (None: mirroring off).
    """
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    out = Path(out)
    n_classes = len(SEMANTIC_INDEX) + 1
    plans = nnunet_plans(spacing_zyx=list(spacing)[::-1], patch_zyx=patch_zyx, features=features, strides=strides)
    dataset = nnunet_dataset_json(n_classes)
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    io.write_json(out / "plans.json", plans)
    io.write_json(out / "dataset.json", dataset)
    for fold in range(folds):
        torch.manual_seed(seed * 1000 + fold)
        net = nnUNetTrainer.build_network_architecture(manager, configuration, 1, n_classes, enable_deep_supervision=False)
        checkpoint = {
            "network_weights": net.state_dict(),
            "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "3d_fullres", "fold": fold},
            "inference_allowed_mirroring_axes": None,
        }
        with io.atomic_path(out / f"fold_{fold}" / "checkpoint_final.pth") as tmp:
            torch.save(checkpoint, tmp)
    config = semantic_inference_config(orientation=orientation, spacing=spacing, folds=folds, name="spinecohort_random_demo")
    io.write_json(out / "inference_config.json", config)  # last: marks the folder complete
    return out


SPINEPS_GRID_MM3: Final = 0.75 * 0.75 * 1.65  # the voxel of SPINEPS's instance models


def spineps_voxels(voxels: int, spacing: Sequence[float]) -> int:
    """A SPINEPS size threshold given in voxels of its (0.75, 0.75, 1.65) mm grid, as voxels of `spacing`.

    >>> spineps_voxels(100, (1.875, 1.875, 2.2)), spineps_voxels(250, (1.875, 1.875, 2.2))
    (12, 30)
    """
    return max(round(voxels * SPINEPS_GRID_MM3 / float(np.prod(spacing))), 1)


def instance_inference_config(*, spacing: Sequence[float], cutout: Sequence[int], name: str) -> dict[str, Any]:
    """SPINEPS `inference_config.json` for a vertebra-instance U-Net (input: the semantic mask)."""
    return {
        "log_name": name,
        "modality": "SEG",
        "acquisition": "sag",
        "modeltype": "unet",
        "model_expected_orientation": ["P", "I", "R"],
        "resolution_range": [float(s) for s in spacing],
        "available_folds": 1,
        "inference_augmentation": False,
        "default_step_size": 0.5,  # unused by a cutout U-Net, but SPINEPS requires the key
        "expected_inputs": ["seg"],
        "cutout_size": [int(c) for c in cutout],
        # Voxels at this model's resolution (SPINEPS 2.1.3 reads them so): its defaults, 100 and 250 voxels
        # of its (0.75, 0.75, 1.65) mm grid, as the same volumes on ours.
        "corpus_size_cleaning": spineps_voxels(100, spacing),
        "vert_size_threshold": spineps_voxels(250, spacing),
        "labels": {"0": 0, "1": 1, "2": 2, "3": 3},
    }


def write_random_instance_model(
    out: str | Path, *, spacing: Sequence[float] = (2.0, 2.0, 4.4), cutout: Sequence[int] = (64, 64, 16), dim: int = 8,
    seed: int = 0,
) -> Path:
    """Write a SPINEPS-format instance model folder with random weights (Lightning checkpoint layout)."""
    import torch

    from .instance_net import InstanceUNet, save_instance_checkpoint

    out = Path(out)
    torch.manual_seed(seed)
    with io.atomic_path(out / "instance_weights.ckpt") as tmp:
        save_instance_checkpoint(tmp, InstanceUNet(dim=dim))
    config = instance_inference_config(spacing=spacing, cutout=cutout, name="spinecohort_random_instance_demo")
    io.write_json(out / "inference_config.json", config)  # last: marks the folder complete
    return out
