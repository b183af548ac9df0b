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
import json
import logging
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from . import cohort, io, layout
from .defaults import N4 as N4_DEFAULTS
from .labels import ENDPLATE_OFFSET, IVD_OFFSET, REGIONS
from .labels import VERTEBRA_NAMES as L_NAMES
from .metrics import ASSD_DEFINITIONS

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


def run_stage(
    stage: str,
    rows: pd.DataFrame,
    out: Path,
    work: Callable[[pd.Series], Outcome],
    *,
    upstream: list[Path] = (),  # type: ignore[assignment]
) -> pd.DataFrame:
    """Apply `work` to every row; record ok/failed/skipped per image in `out/ledger.tsv`.

    `work` may return a note (e.g. "no anchor visible"), kept as the message of an ok row,
    or a dict of the message and fact columns (empty in rows that lack them).
    """
    out.mkdir(parents=True, exist_ok=True)
    failed_before = upstream_failures(list(upstream))
    records: list[dict[str, str]] = []
    for _, row in rows.iterrows():
        record = {"image_id": row.image_id, "stage": stage}
        if row.image_id in failed_before:
            records.append({**record, "status": "skipped", "message": failed_before[row.image_id]})
            continue
        try:
            outcome = work(row)
            facts = outcome if isinstance(outcome, dict) else {"message": outcome or ""}
            records.append({**record, "status": "ok", "message": "", **facts})
        except Exception as exc:  # one image must never cost the batch
            if isinstance(exc, OSError) and exc.errno in STORAGE_ERRORS:  # nor be blamed for the storage
                raise OSError(exc.errno, f"{stage} stopped at {row.image_id}: {exc.strerror} (writing to {exc.filename or out})") from exc
            message = str(exc) if isinstance(exc, ValueError) else f"{row.image}: {type(exc).__name__}: {exc}"
            log.error("%s failed in %s: %s\n%s", row.image_id, stage, message, traceback.format_exc())
            records.append({**record, "status": "failed", "message": message})
    ledger = pd.DataFrame(records, columns=list(dict.fromkeys([*layout.LEDGER_COLUMNS, *(k for r in records for k in r)]))).fillna("")
    io.write_tsv(out / LEDGER, ledger)
    log.info("%s: %d ok, %d failed, %d skipped", stage, *(int((ledger.status == s).sum()) for s in ("ok", "failed", "skipped")))
    return ledger


def _bias_correct(args: argparse.Namespace) -> None:
    from .preprocess import bias_correct

    def work(row: pd.Series) -> None:
        image, affine = io.load_image(row.image)
        result = bias_correct(
            image, affine, shrink=args.shrink, iterations=args.iterations, bias_fwhm=args.bias_fwhm, threads=args.threads
        )
        log.info("%s: N4 mask covers %.1f %% of the image", row.image_id, 100 * result.mask_fraction)
        io.save_nifti(layout.n4_image(args.out, row.image_id), result.corrected, affine, dtype=np.float32)

    run_stage(layout.ledger_stage("bias-correct"), batch_rows(args.manifest, args.batch), args.out, work)


def _resample(args: argparse.Namespace) -> None:
    from .preprocess import to_model_space
    from .semantic import read_model_config

    model = read_model_config(args.model)

    def work(row: pd.Series) -> None:
        image, affine = io.load_image(layout.n4_image(args.input, row.image_id))
        out, out_affine = to_model_space(image, affine, orientation=model.orientation, spacing=model.spacing, threads=args.threads)
        io.save_nifti(layout.model_input(args.out, row.image_id), out, out_affine, dtype=np.float32)

    run_stage(layout.ledger_stage("resample"), batch_rows(args.manifest, args.batch), args.out, work, upstream=[args.input])


def _predict_fold(args: argparse.Namespace) -> None:
    from .semantic import FoldPredictor, read_model_config

    predictor = FoldPredictor(read_model_config(args.model), args.fold, device=args.device, threads=args.threads)
    log.info("fold %d on device %s", args.fold, predictor.device)

    def work(row: pd.Series) -> None:
        logits, props = predictor.predict(layout.model_input(args.input, row.image_id))
        io.write_json(layout.fold_properties(args.out, row.image_id), props)
        io.save_logits(layout.fold_logits(args.out, row.image_id), logits)

    run_stage(layout.ledger_stage("predict-fold", fold=args.fold), batch_rows(args.manifest, args.batch), args.out, work, upstream=[args.input])


def _average_folds(args: argparse.Namespace) -> None:
    from .geometry import spacing_of
    from .semantic import average_fold_logits, clean_semantic, logits_to_segmentation, map_labels, read_model_config

    model = read_model_config(args.model)

    def work(row: pd.Series) -> None:
        logits = [io.load_logits(layout.fold_logits(folder, row.image_id)) for folder in args.folds]
        props = io.read_json(layout.fold_properties(args.folds[0], row.image_id))
        seg = logits_to_segmentation(model.path, average_fold_logits(logits), props)
        affine = io.load_affine(layout.model_input(args.resampled, row.image_id))
        seg = clean_semantic(map_labels(seg, model.labels), spacing_of(affine))
        io.save_nifti(layout.raw_semantic(args.out, row.image_id), seg, affine, dtype=np.uint8)

    run_stage(layout.ledger_stage("average-folds"), batch_rows(args.manifest, args.batch), args.out, work, upstream=args.folds)


def _assemble_instances(args: argparse.Namespace) -> None:
    import torch

    from .geometry import resample, target_grid
    from .instance_net import NetworkPredictor
    from .instances import assemble, read_instance_model
    from .semantic import pick_device

    torch.set_num_threads(args.threads)
    model = read_instance_model(args.model)
    predictor = NetworkPredictor(model.checkpoint, device=pick_device(args.device))
    log.info("instance model %s on device %s", model.checkpoint, predictor.device)

    def work(row: pd.Series) -> Outcome:
        seg, affine = io.load_mask(layout.raw_semantic(args.input, row.image_id))
        grid = target_grid(seg.shape, affine, model.orientation, model.spacing)
        instance, numbering = assemble(resample(seg, affine, grid, kind="nearest"), model, predictor, row.region)
        io.save_nifti(layout.raw_instances(args.out, row.image_id), instance, grid[1], dtype=np.uint16)
        return {"message": numbering.reason, "numbering": numbering.mode}

    run_stage(layout.ledger_stage("assemble-instances"), batch_rows(args.manifest, args.batch), args.out, work, upstream=[args.input])


def derivative_path(root: Path, row: pd.Series, seg: str, suffix: str = "msk.nii.gz") -> Path:
    """`layout.derivative` of a manifest row."""
    return layout.derivative(root, row.subject, row.session, row.image_id, seg, suffix)


def _level_names(instance: np.ndarray, counted: bool) -> dict[int, str]:
    """Legend names: levels (C2, L5/S1 …), or '#k' (k-th from the top) where the ids are a count from 2."""
    def name(x: int) -> str:
        return f"#{x - 1}" if counted else L_NAMES.get(x, str(x))
    names = {}
    for v in np.unique(instance):
        v = int(v)
        if 0 < v < IVD_OFFSET:
            names[v] = name(v)
        elif v >= ENDPLATE_OFFSET:
            names[v] = f"endplates {name(v - ENDPLATE_OFFSET)}"
        elif v >= IVD_OFFSET:
            names[v] = f"IVD below {name(v - IVD_OFFSET)}"
    return names


def _restore(args: argparse.Namespace) -> None:
    from .geometry import resample, spacing_of
    from .instances import claim_instances
    from .qc import snapshot_png

    numbering = ledger_facts(args.instances, "numbering")

    def work(row: pd.Series) -> Outcome:
        image, affine = io.load_image(row.image)
        seg, seg_affine = io.load_mask(layout.raw_semantic(args.input, row.image_id))
        semantic = resample(seg, seg_affine, (image.shape, affine), kind="nearest")
        vert, vert_affine = io.load_mask(layout.raw_instances(args.instances, row.image_id))
        # Ids on the input grid, for exactly the semantic mask's structure voxels (SPINEPS's masks coincide too).
        instance, unclaimed = claim_instances(semantic, resample(vert, vert_affine, (image.shape, affine), kind="nearest"),
                                              spacing_of(affine), radius_mm=2 * max(spacing_of(vert_affine)))
        io.save_nifti(derivative_path(args.derivatives, row, "spine"), semantic, affine, dtype=np.uint8)
        io.save_nifti(derivative_path(args.derivatives, row, "vert"), instance, affine, dtype=np.uint16)
        mode = numbering[row.image_id]
        snapshot = derivative_path(args.derivatives, row, *layout.SNAPSHOT)
        snapshot_png(snapshot, image, instance, affine, title=f"{row.image_id} ({row.region}, {mode})",
                     names=_level_names(instance, counted=mode == "count"))
        with io.atomic_path(args.out / snapshot.name) as tmp:  # the report's copy, next to the ledger
            shutil.copyfile(snapshot, tmp)
        note = f"{unclaimed} structure voxels no instance claims: removed from both masks" if unclaimed else ""
        return {"message": note, "numbering": mode, "unclaimed_voxels": str(unclaimed)}

    run_stage(layout.ledger_stage("restore"), batch_rows(args.manifest, args.batch), args.out, work, upstream=[args.input, args.instances])


def _score(args: argparse.Namespace) -> None:
    from .summary import image_score_rows, instance_score_rows, level_score_rows, write_scores

    rows = batch_rows(args.manifest, args.batch)
    numbering = ledger_facts(args.input, "numbering")
    with_reference = rows[(rows["reference_semantic"] != "") | (rows["reference_instance"] != "")]
    log.info("%d of %d images have a reference mask", len(with_reference), len(rows))
    parts = []

    def work(row: pd.Series) -> None:
        scored = []  # kept only if both references score: a failed image has no rows
        if row.reference_semantic:
            pred = derivative_path(args.derivatives, row, "spine")
            scored.append(image_score_rows(row, pred, Path(row.reference_semantic), args.structures, args.assd))
        if row.reference_instance:
            pred = derivative_path(args.derivatives, row, "vert")
            scored.append(instance_score_rows(row, pred, Path(row.reference_instance), args.assd))
            scored.append(level_score_rows(row, pred, Path(row.reference_instance), numbering[row.image_id],
                                           Path(row.reference_semantic) if row.reference_semantic else None))
        parts.extend(scored)

    run_stage(layout.ledger_stage("score"), with_reference, args.out, work, upstream=[args.input])
    write_scores(args.out / layout.BATCH_SCORES, pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())


def _summarize(args: argparse.Namespace) -> None:
    from . import summary

    args.out.mkdir(parents=True, exist_ok=True)
    table = summary.read_scores([folder / layout.BATCH_SCORES for folder in args.scores])
    summary.write_partitioned(table, args.dataset)
    scores = table.to_pandas()
    stats = summary.by_region(scores)
    with io.atomic_path(args.out / "by_region.parquet") as tmp:
        stats.to_parquet(tmp, index=False)
    s1 = summary.table_s1(stats, args.structures)
    n = scores.drop_duplicates("image_id").groupby("region").size()
    counts = ", ".join(f"{r}: n={n[r]}" for r in REGIONS if r in n)
    caption = f"DSC and ASSD (mm), mean ± SD over images per station ({counts})"
    summary.write_table_s1(s1, args.out, caption)
    summary.write_levels_table(summary.levels_table(scores), args.out)
    summary.box_plots(scores, args.out, args.structures)
    io.write_tsv(args.out / "failures.tsv", summary.failures(args.ledgers))
    log.info("summarised %d score rows of %d images", len(scores), scores["image_id"].nunique())


def add_stage_parsers(sub: argparse._SubParsersAction) -> None:
    def stage(name: str, fn: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--manifest", type=Path, required=True, help="cohort manifest TSV")
        p.add_argument("--batch", required=True, help="batch id, e.g. b0001")
        p.add_argument("--out", type=Path, required=True, help="output folder of this stage (holds ledger.tsv)")
        p.add_argument("--threads", type=int, default=1)
        p.set_defaults(handler=fn)
        return p

    p = stage("bias-correct", _bias_correct, "N4 bias-field correction of a batch")
    p.add_argument("--shrink", type=int, nargs=3, default=N4_DEFAULTS["shrink"], help="in-plane, in-plane, through-plane")
    p.add_argument("--iterations", type=int, nargs="+", default=N4_DEFAULTS["iterations"], help="iterations per fitting level")
    p.add_argument("--bias-fwhm", type=float, default=N4_DEFAULTS["bias_fwhm"], help="N4 bias-field FWHM")
    p = stage("resample", _resample, "reorient and resample a batch into the semantic model's space")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--model", type=model_folder, required=True, help="model folder or its inference_config.json")
    p = stage("predict-fold", _predict_fold, "one nnU-Net fold over a batch: float16 logits")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--model", type=model_folder, required=True, help="model folder or its inference_config.json")
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p = stage("average-folds", _average_folds, "average fold logits, argmax, SPINEPS ids, clean-up")
    p.add_argument("--folds", type=Path, nargs="+", required=True, help="per-fold logit folders, in fold order")
    p.add_argument("--resampled", type=Path, required=True)
    p.add_argument("--model", type=model_folder, required=True, help="model folder or its inference_config.json")
    p = stage("assemble-instances", _assemble_instances, "vertebra instances from the semantic masks (cutout U-Net)")
    p.add_argument("--input", type=Path, required=True, help="the batch's semantic folder")
    p.add_argument("--model", type=model_folder, required=True, help="SPINEPS instance model folder or its inference_config.json")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p = stage("restore", _restore, "semantic and instance masks back onto the input grid, SPINEPS names, QC snapshot")
    p.add_argument("--input", type=Path, required=True, help="the batch's semantic folder")
    p.add_argument("--instances", type=Path, required=True, help="the batch's instance folder")
    p.add_argument("--derivatives", type=Path, required=True)

    p = stage("score", _score, "DSC and ASSD per structure against the manifest's reference masks")
    p.add_argument("--input", type=Path, required=True, help="the batch's restore folder (its ledger)")
    p.add_argument("--derivatives", type=Path, required=True)
    p.add_argument("--structures", type=json.loads, required=True, help='JSON: {"name": [label ids], ...}')
    p.add_argument("--assd", choices=ASSD_DEFINITIONS, default="mean_of_means")

    p = sub.add_parser("summarize", help="cohort-wide: partitioned scores, by-region summary, Table S1, plots, failures")
    p.add_argument("--scores", type=Path, nargs="*", default=[], help="per-batch score folders")
    p.add_argument("--ledgers", type=Path, nargs="*", default=[], help="ledger.tsv files of every stage")
    p.add_argument("--structures", type=json.loads, required=True, help="JSON list: Table S1 row order")
    p.add_argument("--dataset", type=Path, required=True, help="partitioned score dataset folder")
    p.add_argument("--out", type=Path, required=True, help="summary folder")
    p.set_defaults(handler=_summarize)

    p = sub.add_parser("random-model", help="write an nnU-Net v2 model folder with random weights (tests)")
    p.add_argument("out", type=Path)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--spacing", type=float, nargs=3, default=(2.0, 2.0, 4.4))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_random_model)

    p = sub.add_parser("random-instance-model", help="write a SPINEPS instance model folder with random weights")
    p.add_argument("out", type=Path)
    p.add_argument("--spacing", type=float, nargs=3, default=(2.0, 2.0, 4.4))
    p.add_argument("--cutout", type=int, nargs=3, default=(64, 64, 16))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_random_instance_model)


def _random_instance_model(args: argparse.Namespace) -> None:
    from .models import write_random_instance_model

    write_random_instance_model(args.out, spacing=args.spacing, cutout=args.cutout, seed=args.seed)


def _random_model(args: argparse.Namespace) -> None:
    from .models import write_random_semantic_model

    write_random_semantic_model(args.out, folds=args.folds, spacing=args.spacing, seed=args.seed)
