"""Models by SPINEPS's names: `semantic_model.path: t2w` finds the folder SPINEPS 2.1.3 would load.

SPINEPS keeps its models in the folder `$SPINEPS_SEGMENTOR_MODELS` and lets users name them (`t2w`,
`instance`, `t2w_labeling`). It resolves a name in two steps, and so do we:

1. every folder under the models folder that holds an `inference_config.json` is a model whose name is
   that folder's name in lower case (the folder above it where the config sits in an nnU-Net
   `...__nnUNetPlans__...` folder); its kind comes from the config: a `classifier` labels, a model whose
   input is a segmentation (`SEG`) assembles instances, any other segments;
2. a release name SPINEPS knows and that no local folder claimed is the folder its downloader unpacks the
   release into, `<download name>_<version>` (`RELEASES`). We never download: a missing release is an
   error that lists what the models folder holds.

A value with a path separator is a folder, as in SPINEPS. Links are followed, so that the provenance
records where the weights lie.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

Kind = Literal["semantic", "instance", "labeling"]
MODELS_VARIABLE: Final = "SPINEPS_SEGMENTOR_MODELS"

# SPINEPS 2.1.3's release names per kind -> the folder its downloader unpacks each into (download name and
# the release version of its phase; `<name>_semantic` is SPINEPS's alias of a semantic name).
_SEMANTIC: Final = {"t2w": "T2w_semantic_v1.0.9", "t1w": "T1w_semantic_v1.0.9", "vibe": "Vibe_semantic_v1.0.9",
                    "ct": "CT_semantic_v2.0.0"}  # fmt: skip
RELEASES: Final[Mapping[Kind, Mapping[str, str]]] = {
    "semantic": {**_SEMANTIC, **{f"{name}_semantic": folder for name, folder in _SEMANTIC.items()}},
    "instance": {"instance": "instance_sagittal_v1.2.0", "ct_instance": "CT_instance_v2.0.0"},
    "labeling": {"t2w_labeling": "T2w_labeling_v1.4.0", "ct_labeling": "CT_labeling_v1.4.0"},
}


class ModelNameError(ValueError):
    """A model name that names no model folder, or a model of another kind."""


def is_name(value: str) -> bool:
    """SPINEPS's test: a value without a path separator is a model name, anything else a folder."""
    return "/" not in value and "\\" not in value


def model_kind(config_file: Path) -> Kind:
    """The kind of model an `inference_config.json` describes, as SPINEPS sorts them."""
    config = json.loads(config_file.read_text())
    modality = config.get("modality", [])
    if config.get("modeltype") == "classifier":
        return "labeling"
    return "instance" if "SEG" in ([modality] if isinstance(modality, str) else modality) else "semantic"


def local_models(root: Path) -> dict[Kind, dict[str, Path]]:
    """Every model folder under `root` by kind and name (step 1); unreadable configs are skipped, as SPINEPS does.
    Linked folders are followed (a lab's models folder is often links to shared weights), which SPINEPS's scan
    does not do: a name it would miss there is found, no name is found differently."""
    found: dict[Kind, dict[str, Path]] = {"semantic": {}, "instance": {}, "labeling": {}}
    folders = sorted(Path(top) for top, _, files in os.walk(root, followlinks=True) if "inference_config.json" in files)
    for folder in folders:
        name = (folder.parent.name if "nnUNetPlans" in folder.name else folder.name).lower()
        try:
            found[model_kind(folder / "inference_config.json")][name] = folder
        except (OSError, ValueError):
            continue
    return found


@functools.cache
def _local_models_once(root: Path) -> dict[Kind, dict[str, Path]]:
    """`local_models`, once per process: the three models of a run are resolved in the same folder."""
    return local_models(root)


def _holdings(found: Mapping[Kind, Mapping[str, Path]]) -> str:
    return "; ".join(f"{kind}: {', '.join(sorted(names)) or 'none'}" for kind, names in found.items())


def resolve(value: str, kind: Kind, environ: Mapping[str, str] = os.environ) -> str:
    """The model folder `value` names (a folder as given, a name resolved as SPINEPS resolves it)."""
    if not is_name(value):
        return value
    name = value.lower()
    if MODELS_VARIABLE not in environ:
        raise ModelNameError(f"{kind} model {value!r} is a SPINEPS model name, but ${MODELS_VARIABLE} is not set: "
                             "set it to the folder that holds SPINEPS's models, or give the model folder's path")  # fmt: skip
    root = Path(environ[MODELS_VARIABLE])
    if not root.is_dir():
        raise ModelNameError(f"${MODELS_VARIABLE}={root} is not a folder (looking for the {kind} model {value!r})")
    found = _local_models_once(root)
    release = RELEASES[kind].get(name)
    if name in found[kind]:
        return str(found[kind][name].resolve())
    if release and (root / release).is_dir():
        config_file = next(iter(sorted((root / release).glob("**/inference_config.json"))), None)
        if config_file is None:
            raise ModelNameError(f"{kind} model {value!r}: {root / release} holds no inference_config.json")
        if (kind_found := model_kind(config_file)) != kind:
            raise ModelNameError(f"{kind} model {value!r}: {root / release} is a {kind_found} model")
        return str((root / release).resolve())
    other = next((k for k, names in found.items() if name in names), None)
    raise ModelNameError(
        f"{kind} model {value!r}: "
        + (f"{found[other][name]} is a {other} model. " if other else
           f"no folder of that name in ${MODELS_VARIABLE}={root}"
           + (f" (SPINEPS 2.1.3 unpacks that release into {release}). " if release else ". "))
        + f"It holds {_holdings(found)}"
    )  # fmt: skip
