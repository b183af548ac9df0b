"""Every file and folder name the workflow writes, in one place (the rules, the stages and the tests read it).

Light on purpose: the Snakefile imports it at every parse.

    results/work/<batch>/<stage folder>/   per-batch stage outputs and ledger.tsv
    results/derivatives/spinecohort/       SPINEPS/BIDS derivatives (see `derivative`)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Final, NamedTuple

LEDGER: Final = "ledger.tsv"
LEDGER_COLUMNS: Final = ("image_id", "stage", "status", "message")  # then each stage's own fact columns
BATCH_SCORES: Final = "scores.parquet"
FOLD_AGREEMENT: Final = "fold_agreement.tsv"  # average_folds: image_id, structure, dsc (mean pairwise DSC of the folds)


LABELING_TABLE: Final = "labeling.tsv"  # label-vertebrae: per image and vertebra its level and every head's posteriors
SUBJECT_LEVELS: Final = "subject_levels.tsv"  # label-levels: one row per subject (see `subject_levels`)
LEVEL_VOLUMES: Final = "level_volumes.tsv"  # label-levels: image_id, region, level, mm3 (images with levels)
MORPHOMETRICS: Final = "morphometrics.tsv"  # label-levels: per-level measures of the images with levels (`morphometrics`)
MORPHOMETRICS_TABLE: Final = "morphometrics.parquet"  # summarize: the cohort's per-level measures, long format (`morphometrics`)
QC_TABLE: Final = "qc.parquet"  # summarize: one row per image (`cohort_qc.qc_table`)
QC_FLAGS: Final = "qc_flags.tsv"  # summarize: the flagged images, worst first
QC_REVIEW: Final = "qc_review.html"  # summarize: the worst images' snapshots and flags
REVIEWED_OUT: Final = "reviewed_out.tsv"  # summarize: images the review rejected or sent back for a fix (`review`)
REVIEW_CHECK: Final = "review_check.tsv"  # summarize: the QC score's rejection rate per decile (`review`)
REVIEW_MARKED: Final = "review_marked.txt"  # results/: images whose published sidecars carry a review (`review`)
PROVENANCE: Final = "provenance.json"  # results/: versions, models and parameters of the run (`provenance`)
BIDS_MANIFEST: Final = "cohort.tsv"  # results/: the manifest built from config `bids` at start-up (`bids`)
STACK: Final = "stack.json"  # every stage folder, next to its ledger: the software and device its job ran with
STACKS: Final = "stacks.tsv"  # summarize: every stage folder's stack, one row each (`stacks`)
DATASET_DESCRIPTION: Final = "dataset_description.json"  # the derivatives tree's (BIDS)


class BatchStage(NamedTuple):
    command: str  # `spinecohort <command>`, also what the crash test kills
    ledger: str  # the ledger's `stage` column
    folder: str  # under results/work/<batch>/; the fold folders hold the fold number ({fold})
    kept: bool  # its ledger outlives the run (fold folders are temporary)
    # Runs once per subject group over all stations of its subjects, whichever batches hold them; a
    # group is named after the first batch of each of its subjects (`cohort.subject_groups`).
    per_subject: bool = False
    # Runs only where the config asks for it (`label-vertebrae`: a labeling model is configured).
    optional: bool = False


# The per-batch stages in workflow order; `summarize` follows, cohort-wide.
BATCH_STAGES: Final = (
    BatchStage("bias-correct", "bias_correct", "n4", True),
    BatchStage("resample", "resample", "resampled", True),
    BatchStage("predict-fold", "predict_fold{fold}", "logits_fold{fold}", False),
    BatchStage("average-folds", "average_folds", "semantic", True),
    BatchStage("assemble-instances", "assemble_instances", "instances", True),
    BatchStage("restore", "restore", "restore", True),
    BatchStage("label-vertebrae", "label_vertebrae", "labeling", True, optional=True),
    BatchStage("label-levels", "label_levels", "levels", True, per_subject=True),
    BatchStage("score", "score", "scores", True),
)
COHORT_STAGES: Final = ("summarize",)
# The ledger-keeping folders of every batch, and of every subject group.
LEDGER_FOLDERS: Final = tuple(s.folder for s in BATCH_STAGES if s.kept and not s.per_subject)
GROUP_LEDGER_FOLDERS: Final = tuple(s.folder for s in BATCH_STAGES if s.kept and s.per_subject)


def stage(command: str) -> BatchStage:
    """A per-batch stage by its command."""
    return next(s for s in BATCH_STAGES if s.command == command)


def folder(command: str) -> str:
    """The work folder of a per-batch stage, by its command.

    >>> folder("assemble-instances")
    'instances'
    """
    return stage(command).folder


def ledger_stage(command: str, *, fold: int | str | None = None) -> str:
    """The `stage` a per-batch stage writes in its ledger.

    >>> ledger_stage("predict-fold", fold=2)
    'predict_fold2'
    """
    return stage(command).ledger.format(fold=fold)


def n4_image(folder: Path, image_id: str) -> Path:
    return folder / f"{image_id}.nii.gz"


def model_input(folder: Path, image_id: str) -> Path:
    """The image in the semantic model's space; nnU-Net's reader picks files by the _0000 channel suffix."""
    return folder / f"{image_id}_0000.nii.gz"


def scratch_folder(results: str | Path) -> str:
    """A run's folder in the shared scratch (config `scratch.path`): its results folder's name and a
    digest of its absolute path, so two runs never share one and a rerun finds its own again.

    >>> scratch_folder("/data/nako/results")
    'results-1092daa6'
    """
    where = os.path.abspath(results)
    return f"{Path(where).name}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def fold_logits(folder: Path, image_id: str) -> Path:
    return folder / f"{image_id}.b2nd"


def fold_properties(folder: Path, image_id: str) -> Path:
    return folder / f"{image_id}.json"


def raw_semantic(folder: Path, image_id: str) -> Path:
    """The semantic mask in the model's space (before restoring)."""
    return folder / f"{image_id}_seg-spine-raw_msk.nii.gz"


def raw_uncertainty(folder: Path, image_id: str) -> Path:
    """The fraction of folds disagreeing with the ensemble, in the model's space (average-folds --uncertainty)."""
    return folder / f"{image_id}_seg-spine-raw_unc.nii.gz"


def raw_instances(folder: Path, image_id: str) -> Path:
    """The instance mask in the instance model's space (before restoring)."""
    return folder / f"{image_id}_seg-vert-raw_msk.nii.gz"


class Derivative(NamedTuple):
    seg: str  # the seg- entity
    suffix: str
    stage: str  # the stage command whose work folder holds it under its BIDS name (and publishes it)
    optional: bool = False  # made only when the config asks for it


# Every published result per image. restore also keeps the station-numbered vertebra mask in its folder.
DERIVATIVES: Final = (
    Derivative("spine", "msk.nii.gz", "restore"),
    Derivative("spine", "msk.json", "restore"),  # the provenance sidecar (BIDS)
    Derivative("spine", "unc.nii.gz", "restore", optional=True),  # fold disagreement (config `uncertainty`)
    Derivative("vert", "msk.nii.gz", "label-levels"),
    Derivative("vert", "msk.json", "label-levels"),
    Derivative("spine", "snp.png", "label-levels"),  # SPINEPS's name: image | semantic | instances
    Derivative("spine", "ctd.json", "label-levels"),  # vertebra centroids, SPINEPS's POI file (`centroids`)
)
SNAPSHOT: Final = ("spine", "snp.png")
CENTROIDS: Final = ("spine", "ctd.json")
DERIVATIVE_NAME: Final = "{image_id}_mod-T2w_seg-{seg}_{suffix}"


def derivative_name(image_id: str, seg: str, suffix: str = "msk.nii.gz") -> str:
    """SPINEPS/BIDS-derivative file name of a result, e.g. ``…_mod-T2w_seg-spine_msk.nii.gz`` or ``…_seg-spine_snp.png``."""
    return DERIVATIVE_NAME.format(image_id=image_id, seg=seg, suffix=suffix)


def whole_spine_stem(subject: str, session: str) -> str:
    """The stem of a subject's stitched whole-spine results (label-levels, `stitch`), in its BIDS folder next to
    its stations', e.g. ``sub-01_ses-1_desc-stitched`` + ``_mod-T2w_seg-vert_msk.nii.gz``."""
    return "_".join((f"sub-{subject}", *((f"ses-{session}",) if session else ()), "desc-stitched"))


# A subject's stitched results (label-levels with --whole-spine): the station derivatives of these kinds.
WHOLE_SPINE: Final = (("spine", "msk.nii.gz"), ("vert", "msk.nii.gz"), SNAPSHOT)


def subject_folder(subject: str, session: str) -> str:
    """A subject's BIDS folder under a derivatives root: ``sub-01/ses-1/anat`` (no ses- level without a session)."""
    return "/".join((f"sub-{subject}", *((f"ses-{session}",) if session else ()), "anat"))


def derivative(root: Path, subject: str, session: str, image_id: str, seg: str, suffix: str = "msk.nii.gz") -> Path:
    """Where a result is published in the BIDS derivatives tree.

    restore writes each result into its work folder under this same name and links it here,
    and the workflow relinks what goes missing here (see `docs/ARCHITECTURE.md`).

    >>> derivative(Path("d"), "01", "", "sub-01_acq-sag_chunk-LWS", "vert").as_posix()
    'd/sub-01/anat/sub-01_acq-sag_chunk-LWS_mod-T2w_seg-vert_msk.nii.gz'
    """
    return root / subject_folder(subject, session) / derivative_name(image_id, seg, suffix)


# The report's pattern for the snapshots, next to label-levels' ledger.
SNAPSHOT_PATTERN: Final = derivative_name("{image_id}", *SNAPSHOT)
