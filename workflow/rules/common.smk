# Helpers only: paths, the manifest, batch lists. Every path template is written once here.
import functools
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

RESULTS = Path(config["results"])
WORK = RESULTS / "work"
LOGS = RESULTS / "logs"
BENCH = RESULTS / "benchmarks"
DERIVATIVES = RESULTS / "derivatives" / "spinecohort"
MANIFEST = (
    str(RESULTS / "demo" / "cohort.tsv")
    if config["demo"]["enabled"]
    else config["manifest"]
)
MANIFEST_SCHEMA = str(
    Path(workflow.basedir) / "workflow" / "schemas" / "manifest.schema.yaml"
)
MODEL = config["semantic_model"]["path"]
FOLDS = config["semantic_model"]["folds"]


@functools.cache
def _read_manifest(path):
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    validate(table, MANIFEST_SCHEMA)
    if table["image_id"].duplicated().any():
        dup = sorted(set(table["image_id"][table["image_id"].duplicated()]))
        raise ValueError(f"manifest {path}: duplicate image_id {', '.join(dup)}")
    return table


def get_manifest():
    """The checked manifest; for the demo it is made by the `demo_cohort` checkpoint."""
    path = (
        checkpoints.demo_cohort.get().output.manifest
        if config["demo"]["enabled"]
        else MANIFEST
    )
    return _read_manifest(str(path))


def get_batches():
    return sorted(set(get_manifest()["batch"]))


def get_batch_members(wildcards):
    """Image ids of a batch: a param, so that Snakemake reruns a batch whose membership changed."""
    table = get_manifest()
    return ",".join(table.loc[table["batch"] == wildcards.batch, "image_id"])


def get_model_file(name):
    return str(Path(MODEL) / name)


def get_fold_checkpoints():
    return [get_model_file(f"fold_{f}/checkpoint_final.pth") for f in FOLDS]


def get_final_output(wildcards):
    return expand(WORK / "{batch}" / "restore", batch=get_batches())


def batch_minutes(per_image):
    """Runtime (min) for a batch, scaled by the attempt so retries get more time."""
    return lambda wildcards, attempt: int(
        10 + per_image * config["batch_size"] * attempt
    )


wildcard_constraints:
    batch=r"b[0-9]+",
    fold=r"[0-9]+",
