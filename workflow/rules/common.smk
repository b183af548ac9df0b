# Helpers only: paths, the manifest, batch lists. Every path template is written once here.
import functools
import os
import json
import shlex
from pathlib import Path

import yaml

from spinecohort import (
    bids,
    cohort,
    labeling_net,
    layout,
    model_names,
    phantom,
    semantic,
)

RESULTS = Path(config["results"])
WORK = RESULTS / "work"
LOGS = RESULTS / "logs"
BENCH = RESULTS / "benchmarks"
DERIVATIVES = RESULTS / "derivatives" / "spinecohort"
SUMMARY = RESULTS / "summary"


# Per-fold logits (config `scratch`): a run's own folder in the scratch file system, so that two
# results folders sharing one scratch never meet.
SCRATCH = (
    Path(config["scratch"]["path"]) / layout.scratch_folder(RESULTS)
    if config["scratch"]["path"]
    else WORK
)


def stage_dir(command):
    """A batch's work folder of a stage (`spinecohort.layout`: one source for every name)."""
    return WORK / "{batch}" / layout.folder(command)


# The cohort: a BIDS folder (config `bids`), else the demo's phantoms, else the manifest.
BIDS = config["bids"]
DEMO = config["demo"]["enabled"] and not BIDS
MANIFEST = (
    str(RESULTS / layout.BIDS_MANIFEST)
    if BIDS
    else str(RESULTS / "demo" / "cohort.tsv") if DEMO else config["manifest"]
)
if BIDS and workflow.is_main_process:  # once per run, not again in every job
    bids.cohort_manifest(
        BIDS, Path(MANIFEST), batch_size=config["batch_size"], **config["bids_options"]
    )
MANIFEST_SCHEMA = str(
    Path(workflow.basedir) / "workflow" / "schemas" / "manifest.schema.yaml"
)
# Demo models: trained by the training rules on phantoms, shipped (resources/demo_models/MODEL.md).
DEMO_MODELS = Path(workflow.basedir) / "resources" / "demo_models"
DEMO_MODEL = DEMO_MODELS / "semantic"
# A model is a folder, or a name SPINEPS knows in $SPINEPS_SEGMENTOR_MODELS (`model_names`).
MODEL = (
    DEMO_MODEL
    if config["semantic_model"]["path"] == "demo"
    else model_names.resolve(config["semantic_model"]["path"], "semantic")
)
FOLDS = config["semantic_model"]["folds"]
# A broken model stops the run at start-up, not in every batch job (a folder that does not
# exist yet is Snakemake's missing input).
if Path(MODEL).exists():
    semantic.check_model(MODEL, FOLDS)
DEMO_INSTANCE_MODEL = DEMO_MODELS / "instance"
INSTANCE_MODEL = (
    DEMO_INSTANCE_MODEL
    if config["instance_model"]["path"] == "demo"
    else model_names.resolve(config["instance_model"]["path"], "instance")
)

# Labelling model (config `labeling_model`): SPINEPS's folder, or none (no label_vertebrae stage).
LABELING_MODEL = (
    None
    if config["labeling_model"]["path"] == "none"
    else (
        DEMO_MODELS / "labeling"
        if config["labeling_model"]["path"] == "demo"
        else model_names.resolve(config["labeling_model"]["path"], "labeling")
    )
)
if LABELING_MODEL and Path(LABELING_MODEL).exists():
    labeling_net.read_labeling_config(
        LABELING_MODEL
    )  # a broken folder stops the run at start-up
# How label-levels uses the model's answers (nothing without a model, so that these settings alone rerun nothing).
LABEL_LEVELS_FLAGS = " ".join(
    f"--{key.replace('_', '-')}"
    for key in ("per_station", "enforce_12_thoracic")
    if LABELING_MODEL and config["labeling_model"][key]
) + (
    f" --min-margin {config['labeling_model']['min_margin']}" if LABELING_MODEL else ""
)


@functools.cache
def _read_manifest(path):
    """The manifest, checked against its schema and for safe, unique ids."""
    table = cohort.read_manifest_table(path)
    schema = yaml.safe_load(Path(MANIFEST_SCHEMA).read_text())
    if problems := cohort.schema_problems(table, schema):
        raise cohort.ManifestError(f"manifest {path}: " + "; ".join(problems[:20]))
    return cohort.check_manifest(table, source=path)


@functools.cache
def _manifest_table():
    """The manifest: read, or for the demo planned (its manifest does not exist yet).

    (No checkpoint: Snakemake checks only the jobs known before a checkpoint for outputs a
    killed run left incomplete, so batch jobs after one would never be redone.)
    """
    if DEMO:
        return phantom.planned_manifest(
            subjects=config["demo"]["subjects"], batch_size=config["batch_size"]
        )
    return _read_manifest(MANIFEST)


@functools.cache
def _batch_members():
    """Batch -> comma-separated image ids: the images it holds now."""
    return _manifest_table().groupby("batch")["image_id"].agg(",".join).to_dict()


@functools.cache
def _batch_history():
    """Batch -> comma-separated image ids it was made for (`cohort.batch_history`: retried images too)."""
    return {
        b: ",".join(ids) for b, ids in cohort.batch_history(_manifest_table()).items()
    }


@functools.cache
def _subject_groups():
    """Subject group (named after a batch) -> its subjects' image ids, from every batch."""
    return cohort.subject_groups(_manifest_table())


def get_batches():
    return sorted(_batch_members())


def get_batch_members(wildcards):
    """Image ids of a batch: a param, so that Snakemake reruns a batch whose membership changed. An image
    that `spinecohort retry` moved to a new batch stays a member of its old one: that one is not redone.
    """
    return _batch_history()[wildcards.batch]


def get_model_file(name):
    return str(Path(MODEL) / name)


def get_instance_model_file(name):
    return str(Path(INSTANCE_MODEL) / name)


def get_fold_logits(wildcards):
    """The batch's fold logit folders, in fold order (the averaging order)."""
    return [
        str(SCRATCH / wildcards.batch / layout.folder("predict-fold").format(fold=f))
        for f in FOLDS
    ]


def get_fold_checkpoint(wildcards):
    """A fold's weights as SPINEPS finds them: checkpoint_final.pth, else checkpoint_best.pth."""
    found = semantic.fold_checkpoint(MODEL, semantic.parse_fold(wildcards.fold))
    return str(
        found or Path(MODEL) / f"fold_{wildcards.fold}" / semantic.CHECKPOINT_NAMES[0]
    )


def get_groups():
    return sorted(_subject_groups())


def get_group_members(wildcards):
    """A subject group's image ids: a param, so that the group reruns when its membership changes."""
    return ",".join(_subject_groups()[wildcards.batch])


def get_final_output(wildcards):
    """The summaries, and every batch's and group's last folders: new batches of a finished cohort run even
    where Snakemake has no record of summarize's inputs (a results folder moved or copied).
    """
    return [
        *expand(stage_dir("score"), batch=get_batches()),
        *expand(stage_dir("label-levels"), batch=get_groups()),
        SUMMARY / "table_s1.md",
        SUMMARY / "levels.md",
        SUMMARY / "by_region.parquet",
        SUMMARY / layout.SUBJECT_LEVELS,
        SUMMARY / layout.QC_TABLE,
        DERIVATIVES / layout.DATASET_DESCRIPTION,
        *get_missing_derivatives(),
    ]


def get_ledger_folders(wildcards):
    """Every batch's and subject group's folders that keep a ledger (summarize's failures table reads them all)."""
    return [
        *(str(WORK / b / f) for b in get_batches() for f in _batch_ledger_folders()),
        *(str(WORK / g / f) for g in get_groups() for f in layout.GROUP_LEDGER_FOLDERS),
    ]


@functools.cache
def _batch_of():
    return {i: b for b, ids in _batch_members().items() for i in ids.split(",")}


@functools.cache
def _group_of():
    return {i: g for g, ids in _subject_groups().items() for i in ids}


def _unit_of(command, image_id):
    """The batch, or for a per-subject stage the subject group, whose run of stage `command` holds an image."""
    return (_group_of() if layout.stage(command).per_subject else _batch_of())[image_id]


def get_group_restore_folders(wildcards):
    """The restore folders of every batch that holds a station of the group's subjects."""
    batches = sorted({_batch_of()[i] for i in _subject_groups()[wildcards.batch]})
    return [str(WORK / b / layout.folder("restore")) for b in batches]


def _batch_ledger_folders():
    """The ledger-keeping folders of every batch: the optional label-vertebrae one with a labelling model."""
    optional = {s.folder for s in layout.BATCH_STAGES if s.optional}
    return [f for f in layout.LEDGER_FOLDERS if f not in optional or LABELING_MODEL]


def get_group_labeling_folders(wildcards):
    """With a labelling model: the label-vertebrae folders of every batch that holds a station of the group."""
    if not LABELING_MODEL:
        return []
    return [
        f.replace(layout.folder("restore"), layout.folder("label-vertebrae"))
        for f in get_group_restore_folders(wildcards)
    ]


def get_batch_levels_folders(wildcards):
    """The label-levels folders of the subject groups of a batch's images (score reads its vertebra masks there)."""
    members = _batch_members()[wildcards.batch].split(",")
    groups = sorted({_group_of()[i] for i in members})
    return [str(WORK / g / layout.folder("label-levels")) for g in groups]


@functools.cache
def _subject_folder_of():
    """image id -> its BIDS subject folder, from the manifest."""
    table = _read_manifest(MANIFEST)
    return {
        r.image_id: layout.subject_folder(r.subject, r.session)
        for r in table.itertuples()
    }


def get_missing_derivatives():
    """Published derivatives that are gone while the work folder that made them holds them.

    Declaring every derivative as an output costs the 90,000-image dry-run minutes
    (benchmarks/README.md), so a stage's output is its folder and the BIDS tree its published
    view: what is missing from the view becomes a target of `publish_derivative`. A folder
    not made yet costs one stat; a finished cohort one listing and a stat per file.
    """
    missing = []
    tree = str(DERIVATIVES)
    for command in dict.fromkeys(made.stage for made in layout.DERIVATIVES):
        kinds = [made for made in layout.DERIVATIVES if made.stage == command]
        units = _subject_groups() if layout.stage(command).per_subject else None
        for unit in get_groups() if units else get_batches():
            folder = WORK / unit / layout.folder(command)
            if not folder.is_dir():
                continue
            names = set(os.listdir(folder))
            members = units[unit] if units else _batch_members()[unit].split(",")
            for image_id in members:
                place = _subject_folder_of()[image_id]
                for made in kinds:
                    name = layout.derivative_name(image_id, made.seg, made.suffix)
                    # Strings, not Paths: 270,000 of them in a finished 90,000-image cohort.
                    published = f"{tree}/{place}/{name}"
                    if name in names and not os.path.exists(published):
                        missing.append(published)
    return missing


def get_maker_folder_of(wildcards):
    """The work folder that holds a derivative: its stage's run for the image's batch or subject group."""
    made = next(
        m
        for m in layout.DERIVATIVES
        if (m.seg, m.suffix) == (wildcards.seg, wildcards.suffix)
    )
    unit = _unit_of(made.stage, wildcards.image_id)
    return str(WORK / unit / layout.folder(made.stage))


def images_in_batch(wildcards):
    return _batch_members()[wildcards.batch].count(",") + 1


def images_in_group(wildcards):
    return len(_subject_groups()[wildcards.batch])


def batch_minutes(per_image, images=images_in_batch):
    """Runtime (min) of a job: its own batch's (or group's) images, not config["batch_size"], which
    a manifest made with another batch size does not follow; scaled by the attempt for retries.
    """
    return lambda wildcards, attempt: int(10 + per_image * images(wildcards) * attempt)


def scratch_mib(wildcards):
    """The scratch a predict_fold job's logits take (config `scratch`), for the `scratch_mib` cap."""
    return int(config["scratch"]["mib_per_image"] * images_in_batch(wildcards)) + 1


def words(values):
    """A config list as space-separated command-line words."""
    return " ".join(str(v) for v in values)


def memory_mb(base):
    """Memory (MB) of a job, scaled by the attempt so retries get more."""
    return lambda wildcards, attempt: base * attempt


wildcard_constraints:
    batch=r"b[0-9]+",
    fold=r"[0-9]+|all",
    subject_folder=r"sub-[^/]+(/ses-[^/]+)?/anat",
    image_id=r"[^/]+",
    seg=r"[a-z]+",
    suffix=r"msk\.nii\.gz|msk\.json|snp\.png|ctd\.json",
