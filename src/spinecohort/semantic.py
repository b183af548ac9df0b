"""Semantic phase: nnU-Net v2 per-fold logits, exact fold averaging, SPINEPS clean-up.

Fold averaging reproduces nnU-Net's in-process multi-fold prediction bit for
bit: nnU-Net sums the per-fold float16 sliding-window logits in fold order,
divides by the number of folds (still float16), then resamples and takes the
argmax. The fold jobs store exactly those float16 logits.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import labels as L

__all__ = [
    "ModelConfig",
    "ModelError",
    "read_model_config",
    "check_model",
    "FoldPredictor",
    "average_fold_logits",
    "logits_to_segmentation",
    "map_labels",
    "clean_semantic",
    "pick_device",
]

# SPINEPS removes components of these labels below ~28 mm^3 (30 voxels at its reference zoom).
SPECK_LABELS = (*L.VERTEBRA_PARTS, L.CANAL, L.IVD)
SPECK_MM3 = 27.8
FILL_LABELS = (L.CORPUS, L.CANAL, L.IVD, L.CORD)


class ModelError(ValueError):
    """A model folder that cannot be used; the message names the folder and reason."""


# A fold as SPINEPS names it: a number, or "all" (nnU-Net's model trained on every case, in fold_all/).
Fold = int | str
# A fold's weights, in SPINEPS's order of preference (some releases ship only the best checkpoint).
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")


@dataclass(frozen=True)
class ModelConfig:
    """What spinecohort reads from a SPINEPS `inference_config.json`."""

    path: Path
    orientation: tuple[str, str, str]
    spacing: tuple[float, float, float]  # the finest allowed where `resolution_range` is a [min, max] pair
    folds: tuple[Fold, ...]
    labels: dict[int, int]  # model output index -> SPINEPS id
    step_size: float = 0.5
    mirroring: bool = False
    raw: dict[str, Any] | None = None
    spacing_max: tuple[float, float, float] | None = None  # the coarsest allowed, for a [min, max] pair

    def spacing_for(self, input_spacing: ArrayLike) -> tuple[float, float, float]:
        """The model-space spacing of an image whose spacing along the model's axes is `input_spacing`:
        the fixed resolution, or for a [min, max] pair each axis clamped into it (SPINEPS's rule)."""
        if self.spacing_max is None:
            return self.spacing
        clamped = np.clip(np.asarray(input_spacing, float), self.spacing, self.spacing_max)
        return (float(clamped[0]), float(clamped[1]), float(clamped[2]))


def parse_fold(value: Any) -> Fold:
    """A fold of `available_folds` or of the config: 0, "0" -> 0; "all" -> "all"."""
    if isinstance(value, bool):
        raise ValueError(f"not a fold: {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    if value == "all":
        return "all"
    raise ValueError(f"not a fold: {value!r}")


def parse_available_folds(value: Any) -> tuple[Fold, ...]:
    """SPINEPS's `available_folds`: an int n (folds 0..n-1), one fold as a string ("all", "0"), or a list."""
    if isinstance(value, int) and not isinstance(value, bool):
        return tuple(range(value))
    if isinstance(value, str):
        return (parse_fold(value),)
    return tuple(parse_fold(v) for v in value)


def fold_checkpoint(folder: str | Path, fold: Fold) -> Path | None:
    """A fold's weights: `checkpoint_final.pth`, else `checkpoint_best.pth`; None where neither exists."""
    for name in CHECKPOINT_NAMES:
        if (path := Path(folder) / f"fold_{fold}" / name).is_file():
            return path
    return None


def _spineps_id(value: Any) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    names = {n.lower().replace(" ", "_"): k for k, n in L.SEMANTIC_NAMES.items()}
    spineps_names = {
        "arcus_vertebrae": 41, "spinosus_process": 42, "costal_process_left": 43, "costal_process_right": 44,
        "superior_articular_left": 45, "superior_articular_right": 46, "inferior_articular_left": 47,
        "inferior_articular_right": 48, "vertebra_corpus_border": 49, "spinal_cord": 60, "spinal_canal": 61,
        "endplate": 62, "vertebra_disc": 100, "sacrum": 26,
    }  # fmt: skip
    key = str(value).lower()
    if key in spineps_names:
        return spineps_names[key]
    if key in names:
        return names[key]
    raise ModelError(f"unknown label name {value!r} in inference_config.json")


def read_model_config(folder: str | Path) -> ModelConfig:
    """Read and check a SPINEPS-format model folder's `inference_config.json`.

    `resolution_range` is one triple or a [min, max] pair (see `ModelConfig.spacing_for`);
    `available_folds` any of SPINEPS's forms (`parse_available_folds`); label names are
    SPINEPS's Location names or ids.
    """
    folder = Path(folder)
    path = folder / "inference_config.json"
    if not path.is_file():
        raise ModelError(f"model folder {folder}: no inference_config.json")
    try:
        cfg = json.loads(path.read_text())
        res = cfg["resolution_range"]
        spacing, spacing_max = (res[0], res[1]) if isinstance(res[0], list) else (res, None)
        folds = parse_available_folds(cfg.get("available_folds", 1))
        labels = {int(k): _spineps_id(v) for k, v in cfg["labels"].items()}
        orientation = tuple(str(c).upper() for c in cfg["model_expected_orientation"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelError(f"{path}: malformed ({type(exc).__name__}: {exc})") from None
    if len(orientation) != 3 or len(spacing) != 3 or (spacing_max is not None and len(spacing_max) != 3):
        raise ModelError(f"{path}: orientation and resolution need three axes")
    return ModelConfig(
        path=folder,
        orientation=orientation,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        folds=folds,
        labels=labels,
        step_size=float(cfg.get("default_step_size", 0.5)),
        mirroring=bool(cfg.get("inference_augmentation", False)),
        raw=cfg,
        spacing_max=None if spacing_max is None else (float(spacing_max[0]), float(spacing_max[1]), float(spacing_max[2])),
    )


def check_model(folder: str | Path, folds: Sequence[Fold]) -> ModelConfig:
    """Start-up check of a model folder: the folds asked for exist, and its label map is SPINEPS's and fits the network.

    Reads only JSON files: cheap enough for every workflow start.
    """
    model = read_model_config(folder)
    missing = [f for f in folds if f not in model.folds or fold_checkpoint(model.path, f) is None]
    if missing:
        raise ModelError(f"model folder {model.path}: fold(s) {missing} asked for but missing (available: {list(model.folds)})")
    mapped = {k: v for k, v in model.labels.items() if k != 0}  # an explicit background entry is harmless
    unknown = sorted(set(mapped.values()) - set(L.SEMANTIC_LABELS))
    if unknown:
        raise ModelError(f"model folder {model.path}: inference_config.json maps to unknown SPINEPS label ids {unknown}")
    try:
        outputs = len(json.loads((model.path / "dataset.json").read_text())["labels"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model folder {model.path}: no readable dataset.json ({type(exc).__name__}: {exc})") from None
    if set(mapped) != set(range(1, outputs)):
        raise ModelError(
            f"model folder {model.path}: inference_config.json maps outputs {sorted(mapped)}"
            f" but dataset.json gives the network {outputs} outputs (background and 1..{outputs - 1})"
        )
    return model


def pick_device(requested: str = "auto"):
    """torch device: CUDA when present (or asked for), else CPU."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


class FoldPredictor:
    """One nnU-Net fold, loaded once, predicting float16 logits for many images."""

    def __init__(self, model: ModelConfig, fold: Fold, *, device: str = "auto", threads: int = 1) -> None:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from .runtime import tune_for

        torch.set_num_threads(threads)
        self.device = pick_device(device)
        tune_for(self.device)
        self.predictor = nnUNetPredictor(
            tile_step_size=model.step_size,
            use_gaussian=True,
            use_mirroring=model.mirroring,
            perform_everything_on_device=self.device.type == "cuda",
            device=self.device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        _initialize(self.predictor, model, fold)
        self.network_seconds = 0.0  # time in the network so far: how busy a job keeps its device
        n_out = self.predictor.label_manager.num_segmentation_heads
        if set(model.labels) - set(range(n_out)):
            raise ModelError(
                f"model folder {model.path}: inference_config.json maps outputs {sorted(model.labels)} "
                f"but the network has {n_out} outputs"
            )

    def predict(self, image_path: str | Path) -> tuple[NDArray[np.float16], dict[str, Any]]:
        """Logits (C, z, y, x) at network resolution and the properties needed to undo preprocessing."""
        data, props = self.prepare(image_path)
        return self.logits(data), props

    def prepare(self, image_path: str | Path) -> tuple[NDArray[np.float32], dict[str, Any]]:
        """nnU-Net's preprocessing of one image (reading, cropping, normalising): no network, so it can
        run in another thread while the network predicts the image before."""
        p = self.predictor
        preprocessor = p.configuration_manager.preprocessor_class(verbose=False)
        data, _, props = preprocessor.run_case([str(image_path)], None, p.plans_manager, p.configuration_manager, p.dataset_json)
        return data, _jsonable(props)

    def logits(self, data: NDArray[np.float32]) -> NDArray[np.float16]:
        """The network's sliding-window logits for a `prepare`d image."""
        import torch

        started = time.perf_counter()
        logits = self.predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        self.network_seconds += time.perf_counter() - started
        return logits.numpy().astype(np.float16, copy=False)


def _initialize(predictor: Any, model: ModelConfig, fold: Fold) -> None:
    """Load one fold into `predictor`, the network built from the plans alone.

    nnU-Net's own loader imports the trainer class the checkpoint names (unknown trainers of
    older releases fail) and unpickles with weights_only=False. Here the checkpoint is read as
    weights and plain data only (`checkpoints.load_checkpoint`), and the network is the one its
    plans describe (old pre-2.4 plans are converted by nnU-Net's PlansManager), as SPINEPS does.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from .checkpoints import CheckpointError, load_checkpoint

    path = fold_checkpoint(model.path, fold)
    if path is None:
        raise ModelError(f"model folder {model.path}: fold {fold} has none of {', '.join(CHECKPOINT_NAMES)}")
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as exc:
        raise ModelError(str(exc)) from None
    plans = PlansManager(json.loads((model.path / "plans.json").read_text()))
    dataset = json.loads((model.path / "dataset.json").read_text())
    configuration = plans.get_configuration(checkpoint.get("init_args", {}).get("configuration", _configuration_name(model.path)))
    network = get_network_from_plans(
        configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import, determine_num_input_channels(plans, configuration, dataset),
        plans.get_label_manager(dataset).num_segmentation_heads, allow_init=True, deep_supervision=False,
    )  # fmt: skip
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except (KeyError, RuntimeError) as exc:
        raise ModelError(f"{path}: weights do not fit the network of plans.json ({type(exc).__name__}: {str(exc)[:300]})") from None
    predictor.manual_initialization(network, plans, configuration, [checkpoint["network_weights"]], dataset,
                                    str(checkpoint.get("trainer_name", "")), checkpoint.get("inference_allowed_mirroring_axes"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if k != "class_locations"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def average_fold_logits(fold_logits: Sequence[NDArray[np.float16]]) -> NDArray[np.float16]:
    """Mean of the folds' float16 logits in nnU-Net's order and precision (sum in order, then divide)."""
    import torch

    if not fold_logits:
        raise ValueError("no fold logits to average")
    acc = torch.from_numpy(np.array(fold_logits[0], dtype=np.float16, copy=True))
    for logits in fold_logits[1:]:
        acc += torch.from_numpy(np.asarray(logits, dtype=np.float16))
    if len(fold_logits) > 1:
        acc /= len(fold_logits)
    return acc.numpy()


# Fold agreement looks at every AGREEMENT_STEP-th voxel along each axis (1/8 of them): each fold's own
# argmax over the whole volume would cost more than the averaging itself (benchmarks/bench_qc.py).
AGREEMENT_STEP = 2


def fold_label_maps(fold_logits: Sequence[NDArray[np.float16]], labels: dict[int, int]) -> list[NDArray[np.uint8]]:
    """Each fold's own argmax in network space, on every `AGREEMENT_STEP`-th voxel, as SPINEPS ids
    (what `metrics.fold_agreement` compares)."""
    step = slice(None, None, AGREEMENT_STEP)
    return [map_labels(np.argmax(np.asarray(f)[:, step, step, step], axis=0), labels) for f in fold_logits]


def fold_disagreement(model_folder: str | Path, fold_logits: Sequence[NDArray[np.float16]], ensemble: NDArray[np.uint8],
                      properties: dict[str, Any]) -> NDArray[np.float32]:
    """Per voxel of the model's input grid, the fraction of folds whose own segmentation (nnU-Net's conversion of
    its logits alone) differs from the ensemble's `ensemble` (the same conversion of the averaged logits): 0 where
    every fold agrees, 1 where none picks the ensemble's label. The voxel map behind `metrics.fold_agreement`."""
    votes = np.zeros(ensemble.shape, np.uint8)
    for logits in fold_logits:
        votes += logits_to_segmentation(model_folder, np.asarray(logits), properties) != ensemble
    return (votes / np.float32(len(fold_logits))).astype(np.float32)


def logits_to_segmentation(model_folder: str | Path, logits: NDArray[np.float16], properties: dict[str, Any]) -> NDArray[np.uint8]:
    """nnU-Net's own conversion (resample to the input, argmax, uncrop); returns (i, j, k) order.

    nnU-Net works in SimpleITK's (z, y, x) order; the result is transposed back
    to the nibabel order of the image that was predicted.
    """
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    plans, configuration, label_manager = _nnunet_managers(str(model_folder))
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(
        torch.from_numpy(logits), plans, configuration, label_manager, properties
    )
    return np.asarray(seg).transpose(2, 1, 0)


@functools.cache
def _nnunet_managers(folder: str):
    """nnU-Net's plans, configuration and label managers of a model folder, read once per process."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    path = Path(folder)
    plans = PlansManager(json.loads((path / "plans.json").read_text()))
    dataset = json.loads((path / "dataset.json").read_text())
    return plans, plans.get_configuration(_configuration_name(path)), plans.get_label_manager(dataset)


def _configuration_name(folder: Path) -> str:
    cfg = json.loads((folder / "inference_config.json").read_text())
    return str(cfg.get("nnunet_configuration", "3d_fullres"))


def map_labels(seg: NDArray, mapping: dict[int, int]) -> NDArray[np.uint8]:
    """Model output indices -> SPINEPS ids; unmapped indices become 0."""
    lut = np.zeros(max(int(seg.max()), max(mapping)) + 1, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut[seg]


def clean_semantic(seg: NDArray[np.uint8], spacing: ArrayLike) -> NDArray[np.uint8]:
    """SPINEPS-style clean-up of a semantic mask (after SPINEPS's `phase_semantic`).

    1. Delete 6-connected components of 41-49, 61 and 100 smaller than 27.8 mm^3.
    2. Keep the spine block: start from the largest 26-connected foreground
       component's box (3 mm margin) and add every component whose box overlaps
       the block (10 mm extra along the column); delete the rest.
    3. Fill holes in 49, 61, 100 and 60 where the hole is background.
    """
    from scipy import ndimage  # here, not at import: every CLI start reads this module (fold ids)

    seg = seg.copy()
    mm = np.asarray(spacing, float)
    min_voxels = SPECK_MM3 / float(np.prod(mm))
    six = ndimage.generate_binary_structure(3, 1)
    for lab in SPECK_LABELS:
        comp, n = ndimage.label(seg == lab, structure=six)
        if n:
            sizes = np.bincount(comp.ravel())
            small = np.flatnonzero(sizes < min_voxels)
            seg[np.isin(comp, small[small > 0])] = 0
    seg[~_spine_block(seg > 0, mm)] = 0
    for lab in FILL_LABELS:
        filled = ndimage.binary_fill_holes(seg == lab)
        seg[filled & (seg == 0)] = lab
    return seg


def _spine_block(fg: NDArray[np.bool_], spacing: NDArray[np.float64]) -> NDArray[np.bool_]:
    from scipy import ndimage

    comp, n = ndimage.label(fg, structure=np.ones((3, 3, 3)))
    if n <= 1:
        return fg
    boxes = ndimage.find_objects(comp)
    sizes = np.bincount(comp.ravel())[1:]
    margin = np.ceil(3.0 / spacing)
    # The column runs along the axis with the largest foreground extent; allow gaps along it.
    extent = [(s.stop - s.start) * sp for s, sp in zip(ndimage.find_objects(fg.astype(int))[0], spacing)]
    along = np.zeros(3)
    along[int(np.argmax(extent))] = np.ceil(10.0 / spacing[int(np.argmax(extent))])
    lo = np.array([[s.start for s in b] for b in boxes], float)
    hi = np.array([[s.stop for s in b] for b in boxes], float)
    keep = np.zeros(n, bool)
    keep[int(np.argmax(sizes))] = True
    changed = True
    while changed:
        block_lo = lo[keep].min(axis=0) - margin - along
        block_hi = hi[keep].max(axis=0) + margin + along
        overlap = ((lo < block_hi) & (hi > block_lo)).all(axis=1)
        changed = bool((overlap & ~keep).any())
        keep |= overlap
    return np.isin(comp, np.flatnonzero(keep) + 1)
