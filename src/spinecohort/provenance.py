"""Provenance: what made the derivatives, written once per run and copied into every sidecar.

`describe_run` gathers the software versions, both models and the parameters into
``results/provenance.json``; from it come the BIDS ``dataset_description.json`` of the
derivatives tree (`dataset_description`), the JSON sidecar next to every published mask
(`sidecar`) and the key-value metadata of the summary parquet files (`parquet_metadata`).

Light on purpose: versions come from the installed distributions' metadata, nothing heavy is imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

from . import __version__

BIDS_VERSION: Final = "1.10.0"
METHOD: Final = ("SPINEPS (Möller et al., Eur Radiol 2024, doi:10.1007/s00330-024-11155-y) with nnU-Net v2 "
                 "(Isensee et al., Nat Methods 2021, doi:10.1038/s41592-020-01008-z)")  # fmt: skip
# The distributions whose versions decide the masks (N4, resampling, the networks, the metrics).
SOFTWARE: Final = ("spinecohort", "nnunetv2", "torch", "SimpleITK", "numpy", "scipy", "nibabel")


def _installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _model(folder: Path, **extra: Any) -> dict[str, Any]:
    """A model folder as provenance: its name (SPINEPS `log_name`), where it is, and what it expects."""
    config = json.loads((folder / "inference_config.json").read_text())
    keys = ("log_name", "modality", "model_expected_orientation", "resolution_range", "cutout_size")
    return {"path": os.path.abspath(folder), **{k: config[k] for k in keys if k in config}, **extra}


def software_versions() -> dict[str, str]:
    """The installed versions of `SOFTWARE`."""
    return {name: __version__ if name == "spinecohort" else _installed(name) for name in SOFTWARE}


def describe_run(*, semantic_model: Path, instance_model: Path, folds: Sequence[int | str], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the derivatives of this run depend on besides the images."""
    return {
        "method": METHOD,
        "software": software_versions(),
        "models": {"semantic": _model(semantic_model, folds=[str(f) for f in folds]), "instance": _model(instance_model)},
        "parameters": dict(parameters),
    }


def dataset_description(run: Mapping[str, Any]) -> dict[str, Any]:
    """BIDS ``dataset_description.json`` of the derivatives tree."""
    software = run["software"]
    return {
        "Name": "spinecohort: spine segmentations (SPINEPS method)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {"Name": "spinecohort", "Version": software["spinecohort"],
             "Description": f"{METHOD}; semantic model {run['models']['semantic'].get('log_name', '?')}, "
                            f"instance model {run['models']['instance'].get('log_name', '?')}"},
            {"Name": "nnU-Net", "Version": software["nnunetv2"]},
        ],
        "HowToAcknowledge": f"Cite {METHOD}.",
    }  # fmt: skip


def sidecar(run: Mapping[str, Any], *, source: str, description: str, **facts: Any) -> dict[str, Any]:
    """The JSON sidecar of one published mask: its source image (as the manifest names it: relative to the
    manifest's folder when it lies there, so that the sidecar does not change when the cohort moves), what it
    is, and the run's provenance."""
    return {"Sources": [source], "Description": description, **facts, "GeneratedBy": {
        "Name": "spinecohort", "Version": run["software"]["spinecohort"]}, "Provenance": dict(run)}


def parquet_metadata(run: Mapping[str, Any], **extra: str) -> dict[bytes, bytes]:
    """Key-value metadata of a summary parquet file (`spinecohort.*` keys; values are strings, JSON for structures)."""
    values = {"version": run["software"]["spinecohort"], "provenance": json.dumps(run, sort_keys=True), **extra}
    return {f"spinecohort.{k}".encode(): v.encode() for k, v in values.items()}


def read_run(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
