"""One software stack and one device type per cohort: which batches ran with what, and where they differ.

Every stage folder holds the stack its outputs come from (`layout.STACK`, `stage_stack`). Snakemake reruns a
job when its inputs, parameters or code change, not when torch was upgraded or the job ran on another kind of
device: a cohort reprocessed over months, or on a partition with GPUs and one without, can mix them silently.
Model versions cannot mix this way: a model folder's files are inputs of every job that uses them.
`summarize` reads every stack (`read_stacks`), keeps them in `results/summary/stacks.tsv` and states the
differences (`differences`); config `mixed_stacks: error` stops it instead.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import pandas as pd

from . import io, layout

UNRECORDED: Final = "unrecorded"  # a stage folder written before stacks were recorded
NO_DEVICE: Final = "none"  # a stage without a network: its device cannot differ


def job_stack(devices: Iterable[str]) -> dict[str, Any]:
    """What one job ran with: the software that decides the masks (`provenance.SOFTWARE`), Python, and the device
    types its networks used (`NO_DEVICE`: a stage without a network)."""
    from .provenance import software_versions

    return {"software": software_versions(), "python": platform.python_version(), "device": ",".join(sorted(devices)) or NO_DEVICE}


def _joined(values: Sequence[str], separator: str) -> str:
    return separator.join(sorted(set(values)))


def stage_stack(devices: Sequence[str] | set[str], upstream: Sequence[Path]) -> dict[str, Any]:
    """A stage folder's stack: its own job's (`job_stack`) with those of the `upstream` folders its
    outputs come from, so that a stage's record survives its folder (the fold jobs' logits are deleted once
    averaged; average-folds keeps their stacks) and says everything its outputs depend on. Where they differ, a
    value lists each (`2.5.1 + 2.6.0`); devices are the union of the network device types."""
    stacks = [job_stack(devices), *(io.read_json(Path(f) / layout.STACK) for f in upstream if (Path(f) / layout.STACK).exists())]
    used = [d for stack in stacks for d in stack["device"].split(",") if d != NO_DEVICE]
    return {
        "software": {name: _joined([s["software"].get(name, UNRECORDED) for s in stacks], " + ") for name in stacks[0]["software"]},
        "python": _joined([s["python"] for s in stacks], " + "),
        "device": _joined(used, ",") or NO_DEVICE,
    }


class MixedStacksError(ValueError):
    """The cohort's outputs come from more than one software stack or device type, and config says that is an error."""


def read_stacks(ledgers: Sequence[Path]) -> pd.DataFrame:
    """One row per stage folder (the folder of each ledger): batch, stage, device, python and every software version."""
    rows = []
    for ledger in ledgers:
        folder = Path(ledger).parent
        path = folder / layout.STACK
        stack: dict[str, Any] = io.read_json(path) if path.exists() else {"software": {}, "python": UNRECORDED, "device": UNRECORDED}
        rows.append({"batch": folder.parent.name, "stage": folder.name, "device": stack["device"], "python": stack["python"],
                     **stack["software"]})  # fmt: skip
    return pd.DataFrame(rows, columns=list(dict.fromkeys(["batch", "stage", "device", "python", *(k for r in rows for k in r)]))).fillna(UNRECORDED)


def differences(stacks: pd.DataFrame) -> list[str]:
    """One line per thing that differs between the stage folders, each value with its batches:
    `torch 2.5.1 (batches b0001, b0002) / 2.6.0 (batch b0003)`. Empty when the cohort has one stack."""
    lines = []
    for column in stacks.columns.drop(["batch", "stage"]):
        rows = stacks[stacks.device != NO_DEVICE] if column == "device" else stacks
        batches = rows.groupby(column)["batch"].agg(lambda b: sorted(set(b)))
        if len(batches) > 1:
            lines.append(f"{column} " + " / ".join(f"{value} ({'batches' if len(b) > 1 else 'batch'} {', '.join(b)})"
                                                   for value, b in batches.items()))  # fmt: skip
    return lines


def mixed_message(lines: Sequence[str]) -> str:
    return "this cohort's outputs come from more than one software stack or device type: " + "; ".join(lines)
