"""One software stack and one device type per cohort: which batches ran with what, and where they differ.

Every stage folder holds the stack its job ran with (`layout.STACK`, `provenance.job_stack`). Snakemake reruns a
job when its inputs, parameters or code change, not when torch was upgraded or the job ran on another kind of
device: a cohort reprocessed over months, or on a partition with GPUs and one without, can mix them silently.
Model versions cannot mix this way: a model folder's files are inputs of every job that uses them.
`summarize` reads every stack (`read_stacks`), keeps them in `results/summary/stacks.tsv` and states the
differences (`differences`); config `mixed_stacks: error` stops it instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import pandas as pd

from . import io, layout

UNRECORDED: Final = "unrecorded"  # a stage folder written before stacks were recorded
NO_DEVICE: Final = "none"  # a stage without a network: its device cannot differ


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
