"""Batch drivers: each workflow stage runs over one batch of the manifest.

Every image is processed on its own: a failure is written to the stage's
ledger (``<out>/ledger.tsv``: image_id, stage, status, message, then the
stage's own fact columns, e.g. ``numbering``) and the batch goes on. Later
stages skip images that an earlier stage failed, carrying the
reason along. Files are written atomically (see `io.atomic_path`).
"""

from __future__ import annotations

import argparse
import errno
import functools
import inspect
import itertools
import json
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import cohort, io, layout
from .bias_correction import bias_correct_batch
from .defaults import ASSD_DEFINITIONS, DEVICE_HELP, MAX_VOXELS
from .defaults import N4 as N4_DEFAULTS
from .label_levels import label_levels
from .labeling import label_vertebrae
from .labels import IVD_OFFSET, SACRUM, SEMANTIC_NAMES
from .labels import VERTEBRA_NAMES as L_NAMES
from .runtime import DEVICES_USED
from .semantic import Fold, parse_fold
from .stacks import stage_stack
from .summarize import summarize

if TYPE_CHECKING:
    from numpy.typing import NDArray


log = logging.getLogger("spinecohort")

LEDGER = layout.LEDGER
# What a stage's work returns for an image: nothing, a note (the ledger message), or
# the message and fact columns of the stage's ledger ({"message": …, "numbering": …}).
Outcome = str | dict[str, str] | None


def model_folder(path: str | Path) -> Path:
    """A model folder given as itself or as its inference_config.json (what the rules have as input)."""
    path = Path(path)
    return path.parent if path.is_file() else path


def batch_rows(manifest: Path, batch: str) -> pd.DataFrame:
    table = cohort.resolve_paths(cohort.read_manifest(manifest), manifest.parent)
    rows = table[table["batch"] == batch]
    if rows.empty:
        raise cohort.ManifestError(f"{manifest}: no images in batch {batch!r}")
    return rows


def upstream_failures(upstream: list[Path]) -> dict[str, str]:
    """image_id -> reason, for images an earlier stage did not finish."""
    failed: dict[str, str] = {}
    for folder in upstream:
        ledger = pd.read_csv(folder / LEDGER, sep="\t", dtype=str, keep_default_na=False)
        for r in ledger[ledger["status"] != "ok"].itertuples():
            failed.setdefault(r.image_id, r.message)
    return failed


def ledger_facts(folder: Path, column: str) -> dict[str, str]:
    """image_id -> a fact column of a stage's ledger (absent when no image got that far)."""
    ledger = pd.read_csv(folder / LEDGER, sep="\t", dtype=str, keep_default_na=False)
    return dict(zip(ledger.image_id, ledger[column])) if column in ledger else {}


# Errors of the output storage, not of the image: the job fails (a rerun redoes it)
# instead of recording a good image as failed.
STORAGE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(stage: str, done: int, total: int, elapsed: float, worked: int) -> str:
    """`stage: 12/150 images, 3 min 10 s so far, about 36 min 25 s left`: the rest at the pace of the `worked` images so far."""
    left = elapsed / worked * (total - done)
    return f"{stage}: {done}/{total} images, {_duration(elapsed)} so far, about {_duration(left)} left"


def run_stage(
    stage: str,
    rows: pd.DataFrame,
    out: Path,
    work: Callable[[pd.Series], Outcome | Future[Outcome]],
    *,
    upstream: list[Path] = (),  # type: ignore[assignment]
    failed_before: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Apply `work` to every row; record ok/failed/skipped per image in `out/ledger.tsv`.

    `work` may return a note (e.g. "no anchor visible"), kept as the message of an ok row,
    or a dict of the message and fact columns (empty in rows that lack them), or a Future of either: the
    image's last step (e.g. writing its outputs) then runs on while the next image's work runs, and its
    row is recorded when it ends, a failure still its own. Images an `upstream` ledger
    (or `failed_before`, image_id -> reason) does not have as ok are skipped with the reason.
    """
    out.mkdir(parents=True, exist_ok=True)
    failed_before = failed_before if failed_before is not None else upstream_failures(list(upstream))
    records: list[dict[str, str]] = []
    unfinished: tuple[pd.Series, dict[str, str], Future[Outcome]] | None = None
    started, worked = time.monotonic(), 0
    for k, (_, row) in enumerate(rows.iterrows(), start=1):
        record = {"image_id": row.image_id, "stage": stage}
        records.append(record)
        if row.image_id in failed_before:
            record.update(status="skipped", message=failed_before[row.image_id])
            continue
        if worked:  # a long batch is never silent until it ends
            log.info("%s", progress_line(stage, k - 1, len(rows), time.monotonic() - started, worked))
        worked += 1
        running = _record(stage, row, out, record, functools.partial(work, row))
        if unfinished:
            _record(stage, unfinished[0], out, unfinished[1], unfinished[2].result)
        unfinished = (row, record, running) if running else None
    if unfinished:
        _record(stage, unfinished[0], out, unfinished[1], unfinished[2].result)
    ledger = pd.DataFrame(records, columns=list(dict.fromkeys([*layout.LEDGER_COLUMNS, *(k for r in records for k in r)]))).fillna("")
    io.write_json(out / layout.STACK, stage_stack(DEVICES_USED, upstream))  # before the ledger, which marks the stage finished
    io.write_tsv(out / LEDGER, ledger)
    log.info("%s: %d ok, %d failed, %d skipped", stage, *(int((ledger.status == s).sum()) for s in ("ok", "failed", "skipped")))
    return ledger


def _record(stage: str, row: pd.Series, out: Path, record: dict[str, str], call: Callable[[], Outcome | Future[Outcome]]) -> Future[Outcome] | None:
    """Fill `record` with how `call` went for `row`'s image; a Future it returns is given back, unrecorded."""
    try:
        outcome = call()
        if isinstance(outcome, Future):
            return outcome
        facts = outcome if isinstance(outcome, dict) else {"message": outcome or ""}
        record.update({"status": "ok", "message": "", **facts})
    except Exception as exc:  # one image must never cost the batch
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRORS:  # nor be blamed for the storage
            raise OSError(exc.errno, f"{stage} stopped at {row.image_id}: {exc.strerror} (writing to {exc.filename or out})") from exc
        message = str(exc) if isinstance(exc, ValueError) else f"{row.image}: {type(exc).__name__}: {exc}"
        log.error("%s failed in %s: %s\n%s", row.image_id, stage, message, traceback.format_exc())
        record.update(status="failed", message=message)
    return None


def _resample(*, manifest: Path, batch: str, out: Path, threads: int, input: Path, model: Path) -> None:
    from .geometry import spacing_along
    from .preprocess import to_model_space
    from .semantic import read_model_config

    config = read_model_config(model)

    def work(row: pd.Series) -> None:
        image, affine = io.load_image(layout.n4_image(input, row.image_id))
        spacing = config.spacing_for(spacing_along(affine, config.orientation))
        resampled, resampled_affine = to_model_space(image, affine, orientation=config.orientation, spacing=spacing, threads=threads)
        io.save_nifti(layout.model_input(out, row.image_id), resampled, resampled_affine, dtype=np.float32)

    run_stage(layout.ledger_stage("resample"), batch_rows(manifest, batch), out, work, upstream=[input])


def _predict_fold(
    *, manifest: Path, batch: str, out: Path, threads: int, input: Path, model: Path, fold: Fold, device: str
) -> None:
    """While the network predicts image k, image k+1 is read and preprocessed and image k-1's logits
    written, each in a thread of its own: the device is kept busy. The same calls in the same order per
    image as one after another, so the same bytes."""
    from .runtime import network_busy_line
    from .semantic import FoldPredictor, read_model_config

    predictor = FoldPredictor(read_model_config(model), fold, device=device, threads=threads)
    log.info("fold %s on device %s", fold, predictor.device)
    rows = batch_rows(manifest, batch)
    failed_before = upstream_failures([input])
    following = dict(itertools.pairwise(i for i in rows.image_id if i not in failed_before))
    ahead: dict[str, Future[tuple[NDArray[np.float32], dict[str, Any]]]] = {}

    def write(image_id: str, logits: NDArray[np.float16], props: dict[str, Any]) -> None:
        io.write_json(layout.fold_properties(out, image_id), props)
        io.save_logits(layout.fold_logits(out, image_id), logits)

    started = time.monotonic()
    with ThreadPoolExecutor(1, "read") as reader, ThreadPoolExecutor(1, "write") as writer:

        def read(image_id: str) -> Future[tuple[NDArray[np.float32], dict[str, Any]]]:
            return reader.submit(predictor.prepare, layout.model_input(input, image_id))

        def work(row: pd.Series) -> Future[Outcome]:
            prepared = ahead.pop(row.image_id, None) or read(row.image_id)
            if row.image_id in following:
                ahead[following[row.image_id]] = read(following[row.image_id])
            data, props = prepared.result()  # its failure is this image's
            return writer.submit(write, row.image_id, predictor.logits(data), props)

        run_stage(layout.ledger_stage("predict-fold", fold=fold), rows, out, work, failed_before=failed_before)
    wall = time.monotonic() - started
    log.info("%s", network_busy_line(fold, predictor.network_seconds, wall))


def _average_folds(
    *, manifest: Path, batch: str, out: Path, model: Path, folds: list[Path], resampled: Path, uncertainty: bool = False
) -> None:
    """Also writes how much the folds agree (`metrics.fold_agreement` of their own argmax masks, in network
    space): per label the model outputs in `layout.FOLD_AGREEMENT`, the worst as ledger facts. Per label, not
    per scored structure: the scoring config must not make the semantic phase rerun. With `uncertainty`, the
    voxel map of fold disagreement too (`semantic.fold_disagreement`; restore brings it onto the input grid)."""
    from .geometry import spacing_of
    from .metrics import fold_agreement
    from .semantic import (
        average_fold_logits,
        clean_semantic,
        fold_disagreement,
        fold_label_maps,
        logits_to_segmentation,
        map_labels,
        read_model_config,
    )

    config = read_model_config(model)
    structures = {SEMANTIC_NAMES[i]: [i] for i in sorted(set(config.labels.values()) - {0})}
    agreement: list[dict[str, Any]] = []

    def work(row: pd.Series) -> Outcome:
        logits = [io.load_logits(layout.fold_logits(folder, row.image_id)) for folder in folds]
        props = io.read_json(layout.fold_properties(folds[0], row.image_id))
        seg = logits_to_segmentation(config.path, average_fold_logits(logits), props)
        affine = io.load_affine(layout.model_input(resampled, row.image_id))
        if uncertainty:
            io.save_nifti(layout.raw_uncertainty(out, row.image_id), fold_disagreement(config.path, logits, seg, props), affine,
                          dtype=np.float32)
        seg = clean_semantic(map_labels(seg, config.labels), spacing_of(affine))
        io.save_nifti(layout.raw_semantic(out, row.image_id), seg, affine, dtype=np.uint8)
        if len(logits) < 2:
            return None
        dsc = fold_agreement(fold_label_maps(logits, config.labels), structures)
        agreement.extend({"image_id": row.image_id, "structure": k, "dsc": round(v, 4)} for k, v in dsc.items())
        worst = min((k for k in dsc if not np.isnan(dsc[k])), key=dsc.__getitem__, default=None)
        return {"message": "", "fold_agreement": f"{dsc[worst]:.4f}" if worst else "", "fold_agreement_worst": worst or ""}

    run_stage(layout.ledger_stage("average-folds"), batch_rows(manifest, batch), out, work, upstream=folds)
    io.write_tsv(out / layout.FOLD_AGREEMENT, pd.DataFrame(agreement, columns=["image_id", "structure", "dsc"]))


def _assemble_instances(
    *, manifest: Path, batch: str, out: Path, threads: int, input: Path, model: Path, device: str
) -> None:
    import torch

    from .geometry import resample, target_grid
    from .instance_net import NetworkPredictor
    from .instances import assemble, read_instance_model
    from .runtime import tune_for
    from .semantic import pick_device

    torch.set_num_threads(threads)
    config = read_instance_model(model)
    predictor = NetworkPredictor(config.checkpoint, device=pick_device(device))
    tune_for(predictor.device)
    log.info("instance model %s on device %s", config.checkpoint, predictor.device)

    def work(row: pd.Series) -> Outcome:
        seg, affine = io.load_mask(layout.raw_semantic(input, row.image_id))
        grid = target_grid(seg.shape, affine, config.orientation, config.spacing)
        instance, numbering = assemble(resample(seg, affine, grid, kind="nearest"), config, predictor, row.region)
        io.save_nifti(layout.raw_instances(out, row.image_id), instance, grid[1], dtype=np.uint16)
        return {"message": numbering.reason, "numbering": numbering.mode}

    run_stage(layout.ledger_stage("assemble-instances"), batch_rows(manifest, batch), out, work, upstream=[input])


def derivative_path(root: Path, row: pd.Series, seg: str, suffix: str = "msk.nii.gz") -> Path:
    """`layout.derivative` of a manifest row."""
    return layout.derivative(root, row.subject, row.session, row.image_id, seg, suffix)


def _level_names(instance: np.ndarray, counted: bool) -> dict[int, str]:
    """The snapshot legend's vertebra names: levels (C2 … L5, S1), or '#k' (k-th from the top) where the ids are a
    count from 2. IVDs and endplates need none: they wear their vertebra's colour."""
    return {int(v): f"#{int(v) - 1}" if counted and v != SACRUM else L_NAMES.get(int(v), str(v))
            for v in np.unique(instance) if 0 < v < IVD_OFFSET}


def _publish(out: Path, row: pd.Series, derivatives: Path, command: str) -> None:
    """Publish the image's results that stage `command` keeps in `out` into the BIDS tree (`io.publish`): the work
    folder is what Snakemake knows, the Snakefile relinks what goes missing from the tree (rule publish_derivative)."""
    for made in layout.DERIVATIVES:
        name = layout.derivative_name(row.image_id, made.seg, made.suffix)
        if made.stage == command and (not made.optional or (out / name).exists()):
            io.publish(out / name, derivative_path(derivatives, row, made.seg, made.suffix))


def _restore(*, manifest: Path, batch: str, out: Path, input: Path, instances: Path, derivatives: Path, provenance: Path) -> None:
    """Writes each image's masks on its own grid into `out` under their BIDS names (the vertebra mask numbered by
    its station alone) and publishes the semantic mask with its provenance sidecar."""
    from . import provenance as prov
    from .geometry import resample, spacing_of
    from .instances import claim_instances, split_endplates

    numbering = ledger_facts(instances, "numbering")
    run = prov.read_run(provenance)

    def work(row: pd.Series) -> Outcome:
        image, affine = io.load_image(row.image)
        seg, seg_affine = io.load_mask(layout.raw_semantic(input, row.image_id))
        semantic = resample(seg, seg_affine, (image.shape, affine), kind="nearest")
        vert, vert_affine = io.load_mask(layout.raw_instances(instances, row.image_id))
        # Ids on the input grid, for exactly the semantic mask's structure voxels (SPINEPS's masks coincide too).
        instance, unclaimed = claim_instances(semantic, resample(vert, vert_affine, (image.shape, affine), kind="nearest"),
                                              spacing_of(affine), radius_mm=2 * max(spacing_of(vert_affine)))
        split_endplates(semantic, instance)
        codes = io.header_codes(row.image)  # the masks say where they lie as the input does
        io.save_nifti(out / layout.derivative_name(row.image_id, "spine"), semantic, affine, dtype=np.uint8, codes=codes)
        io.save_nifti(out / layout.derivative_name(row.image_id, "vert"), instance, affine, dtype=np.uint16, codes=codes)
        io.write_json(out / layout.derivative_name(row.image_id, "spine", "msk.json"), prov.sidecar(
            run, source=cohort.manifest_entry(row.image, manifest.parent), description="semantic mask (SPINEPS labels), on the input image's grid"))
        if (raw := layout.raw_uncertainty(input, row.image_id)).exists():  # average-folds --uncertainty
            unc, unc_affine = io.load_image(raw)
            io.save_nifti(out / layout.derivative_name(row.image_id, "spine", "unc.nii.gz"),
                          np.clip(resample(unc, unc_affine, (image.shape, affine), kind="linear"), 0.0, 1.0), affine,
                          dtype=np.float32, codes=codes)
        _publish(out, row, derivatives, "restore")
        note = f"{unclaimed} structure voxels no instance claims: removed from both masks" if unclaimed else ""
        return {"message": note, "numbering": numbering[row.image_id], "unclaimed_voxels": str(unclaimed)}

    run_stage(layout.ledger_stage("restore"), batch_rows(manifest, batch), out, work, upstream=[input, instances])


def group_rows(manifest: Path, group: str) -> pd.DataFrame:
    """The manifest rows of a subject group (`cohort.subject_groups`): every station of its subjects."""
    table = cohort.resolve_paths(cohort.read_manifest(manifest), manifest.parent)
    members = cohort.subject_groups(table).get(group)
    if not members:
        raise cohort.ManifestError(f"{manifest}: no subject group {group!r}")
    return table[table["image_id"].isin(members)]


def _image_folders(folders: Sequence[Path]) -> dict[str, Path]:
    """image_id -> the folder (of several stage folders) whose ledger holds it."""
    return {image_id: folder for folder in folders for image_id in ledger_facts(folder, "image_id")}


def _score(*, manifest: Path, batch: str, out: Path, input: Path, levels: list[Path], structures: dict[str, list[int]],
           assd: str) -> None:
    from .summary import image_score_rows, instance_score_rows, level_score_rows, write_scores

    rows = batch_rows(manifest, batch)
    vertebrae = _image_folders(levels)
    numbering = {i: m for folder in levels for i, m in ledger_facts(folder, "numbering").items()}
    with_reference = rows[(rows["reference_semantic"] != "") | (rows["reference_instance"] != "")]
    log.info("%d of %d images have a reference mask", len(with_reference), len(rows))
    parts = []

    def work(row: pd.Series) -> None:
        scored = []  # kept only if both references score: a failed image has no rows
        if row.reference_semantic:
            pred = input / layout.derivative_name(row.image_id, "spine")
            scored.append(image_score_rows(row, pred, Path(row.reference_semantic), structures, assd))
        if row.reference_instance:
            pred = vertebrae[row.image_id] / layout.derivative_name(row.image_id, "vert")
            scored.append(instance_score_rows(row, pred, Path(row.reference_instance), assd))
            scored.append(level_score_rows(row, pred, Path(row.reference_instance), numbering[row.image_id],
                                           Path(row.reference_semantic) if row.reference_semantic else None))
        parts.extend(scored)

    run_stage(layout.ledger_stage("score"), with_reference, out, work, upstream=[input, *levels])
    write_scores(out / layout.BATCH_SCORES, pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())


def _option(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, kwargs


_MODEL = _option("--model", type=model_folder, required=True, help="model folder or its inference_config.json")
_DEVICE = _option("--device", default="auto", help=DEVICE_HELP)
_PROVENANCE = _option("--provenance", type=Path, required=True, help=f"the run's {layout.PROVENANCE} (spinecohort describe)")
_ENFORCE_12 = _option("--enforce-12-thoracic", action="store_true", help="no T13, no 11-thoracic column (SPINEPS's option)")
_BATCH_OPTIONS = (
    _option("--manifest", type=Path, required=True, help="cohort manifest TSV"),
    _option("--batch", required=True, help="batch id, e.g. b0001"),
    _option("--out", type=Path, required=True, help=f"output folder of this stage (holds {layout.LEDGER})"),
    _option("--threads", type=int, default=1, help="CPU threads"),
)
# Every stage command of `layout`: its driver (keyword arguments named after the options), help and own
# options. Per-batch stages also take `_BATCH_OPTIONS`; a driver receives the options its signature names.
STAGE_COMMANDS: dict[str, tuple[Callable[..., None], str, tuple[tuple[tuple[str, ...], dict[str, Any]], ...]]] = {
    "bias-correct": (bias_correct_batch, "N4 bias-field correction of a batch", (
        _option("--shrink", type=int, nargs=3, default=N4_DEFAULTS["shrink"], help="in-plane, in-plane, through-plane"),
        _option("--iterations", type=int, nargs="+", default=N4_DEFAULTS["iterations"], help="iterations per fitting level"),
        _option("--bias-fwhm", type=float, default=N4_DEFAULTS["bias_fwhm"], help="N4 bias-field FWHM"),
        _option("--max-voxels", type=int, default=MAX_VOXELS, help="larger images fail alone, before any voxel is read"))),
    "resample": (_resample, "reorient and resample a batch into the semantic model's space", (
        _option("--input", type=Path, required=True, help="the batch's N4 folder"), _MODEL)),
    "predict-fold": (_predict_fold, "one nnU-Net fold over a batch: float16 logits", (
        _option("--input", type=Path, required=True, help="the batch's resampled folder"), _MODEL,
        _option("--fold", type=parse_fold, required=True, help='fold number, or "all"'), _DEVICE)),
    "average-folds": (_average_folds, "average fold logits, argmax, SPINEPS ids, clean-up", (
        _option("--folds", type=Path, nargs="+", required=True, help="per-fold logit folders, in fold order"),
        _option("--resampled", type=Path, required=True, help="the batch's resampled folder (its grids)"), _MODEL,
        _option("--uncertainty", action="store_true", help="also the voxel map of fold disagreement (…_seg-spine_unc)"))),
    "assemble-instances": (_assemble_instances, "vertebra instances from the semantic masks (cutout U-Net)", (
        _option("--input", type=Path, required=True, help="the batch's semantic folder"),
        _option("--model", type=model_folder, required=True, help="SPINEPS instance model folder or its inference_config.json"),
        _DEVICE)),
    "restore": (_restore, "semantic and instance masks back onto the input grid, SPINEPS names, QC snapshot", (
        _option("--input", type=Path, required=True, help="the batch's semantic folder"),
        _option("--instances", type=Path, required=True, help="the batch's instance folder"),
        _option("--derivatives", type=Path, required=True, help="BIDS derivatives root"), _PROVENANCE)),
    "label-vertebrae": (label_vertebrae, "a SPINEPS labelling model names every vertebra of each restored station", (
        _option("--restore", type=Path, required=True, help="the batch's restore folder"),
        _option("--model", type=Path, required=True, help="SPINEPS labelling model folder (inference_config.json, *valf1-weights.ckpt)"),
        _DEVICE, _ENFORCE_12)),
    "label-levels": (label_levels, "subject-level vertebra ids across a subject group's stations, snapshots", (
        _option("--restore", type=Path, nargs="+", required=True, help="the restore folders of every batch holding the group's stations"),
        _option("--derivatives", type=Path, required=True, help="BIDS derivatives root"), _PROVENANCE,
        _option("--whole-spine", action="store_true", help="also each subject's stitched whole-spine masks and snapshot"),
        _option("--labeling", type=Path, nargs="*", default=[], help="the label-vertebrae folders of those batches (a labelling model's ids)"),
        _option("--per-station", action="store_true", help="each station keeps its labelling model's own ids (SPINEPS), not one search per subject"),
        _ENFORCE_12, _option("--min-margin", type=float, help="a station of a column without C2 and the sacrum is counted below this margin"))),
    "score": (_score, "DSC and ASSD per structure against the manifest's reference masks", (
        _option("--input", type=Path, required=True, help="the batch's restore folder (its semantic masks)"),
        _option("--levels", type=Path, nargs="+", required=True, help="the label-levels folders holding the batch's vertebra masks"),
        _option("--structures", type=json.loads, required=True, help='JSON: {"name": [label ids], ...}'),
        _option("--assd", choices=ASSD_DEFINITIONS, default="mean_of_means", help="ASSD definition"))),
    "summarize": (summarize, "cohort-wide: partitioned scores, by-region summary, Table S1, levels, plots, failures, QC", (
        _option("--manifest", type=Path, required=True, help="cohort manifest TSV (which batch holds each image now)"),
        _option("--scores", type=Path, nargs="*", default=[], help="per-batch score folders"),
        _option("--levels", type=Path, nargs="*", default=[], help="per-group label-levels folders"),
        _option("--semantic", type=Path, nargs="*", default=[], help=f"per-batch average-folds folders (their {layout.FOLD_AGREEMENT})"),
        _option("--review-images", type=int, required=True, help=f"images on the QC review page ({layout.QC_REVIEW})"),
        _option("--ledgers", type=Path, nargs="*", default=[], help=f"{layout.LEDGER} files of every stage"),
        _option("--structures", type=json.loads, required=True, help="JSON list: Table S1 row order"),
        _option("--dataset", type=Path, required=True, help="partitioned score dataset folder"), _PROVENANCE,
        _option("--derivatives", type=Path, default=None, help="BIDS derivatives root: reviewed-out images' sidecars say so"),
        _option("--decisions", type=Path, default=None, help="the QC review's decisions TSV (image_id, decision, note): rejected images leave the tables"),
        _option("--mixed-stacks", choices=("warn", "error"), default="warn", help=f"outputs from more than one software stack or device type ({layout.STACKS})"),
        _option("--out", type=Path, required=True, help="summary folder"))),
}  # fmt: skip


def _dispatch(driver: Callable[..., None], args: argparse.Namespace) -> None:
    wanted = inspect.signature(driver).parameters
    driver(**{name: value for name, value in vars(args).items() if name in wanted})


def add_stage_parsers(sub: argparse._SubParsersAction) -> None:
    """One subcommand per stage of `layout`, in workflow order, each dispatched to its driver."""
    for command in (*(stage.command for stage in layout.BATCH_STAGES), *layout.COHORT_STAGES):
        driver, help_, options = STAGE_COMMANDS[command]
        p = sub.add_parser(command, help=help_)
        for flags, kwargs in (() if command in layout.COHORT_STAGES else _BATCH_OPTIONS) + options:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(handler=functools.partial(_dispatch, driver))

    p = sub.add_parser("random-model", help="write an nnU-Net v2 model folder with random weights (tests)")
    p.add_argument("out", type=Path, help="model folder to write")
    p.add_argument("--folds", type=int, default=3, help="folds (default %(default)s)")
    p.add_argument("--spacing", type=float, nargs=3, default=(2.0, 2.0, 4.4), help="(P, I, R) mm (default 2.0 2.0 4.4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.set_defaults(handler=_random_model)

    p = sub.add_parser("random-instance-model", help="write a SPINEPS instance model folder with random weights")
    p.add_argument("out", type=Path, help="model folder to write")
    p.add_argument("--spacing", type=float, nargs=3, default=(2.0, 2.0, 4.4), help="(P, I, R) mm (default 2.0 2.0 4.4)")
    p.add_argument("--cutout", type=int, nargs=3, default=(64, 64, 16), help="(P, I, R) voxels (default 64 64 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.set_defaults(handler=_random_instance_model)


def _random_instance_model(args: argparse.Namespace) -> None:
    from .models import write_random_instance_model

    write_random_instance_model(args.out, spacing=args.spacing, cutout=args.cutout, seed=args.seed)


def _random_model(args: argparse.Namespace) -> None:
    from .models import write_random_semantic_model

    write_random_semantic_model(args.out, folds=args.folds, spacing=args.spacing, seed=args.seed)
