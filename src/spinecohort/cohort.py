"""The cohort manifest: one row per image, with a stable batch id.

Columns: subject, session, region, image_id, image, reference_semantic,
reference_instance, batch, earlier_batches. Relative paths are relative to the
manifest's own folder, so a cohort folder can be moved as a whole.
`earlier_batches` lists the batches an image failed in before it was retried
in `batch` (`retry`): those batches keep their members and stay finished.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .labels import REGIONS

__all__ = [
    "COLUMNS",
    "ManifestError",
    "SAFE_ID",
    "STATION_ALIASES",
    "assign_batches",
    "check_manifest",
    "manifest_from_bids",
    "batch_history",
    "first_batches",
    "read_manifest",
    "read_manifest_table",
    "resolve_paths",
    "retry",
    "retry_candidates",
    "schema_problems",
]

COLUMNS = ("subject", "session", "region", "image_id", "image", "reference_semantic", "reference_instance", "batch", "earlier_batches")
OPTIONAL_COLUMNS = ("reference_semantic", "reference_instance", "earlier_batches")
# Ids become file names: BIDS label characters only.
SAFE_ID = re.compile(r"^[A-Za-z0-9]+$")
SAFE_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
BATCH_ID = re.compile(r"^b[0-9]{4,}$")
BATCH_LIST = re.compile(r"^(b[0-9]{4,}( b[0-9]{4,})*)?$")  # earlier_batches: oldest first

# How NAKO (German station names) and SPINEPS users name the stations.
STATION_ALIASES: dict[str, str] = {
    "hws": "cervical",
    "bws": "thoracic",
    "lws": "lumbar",
    "c": "cervical",
    "t": "thoracic",
    "l": "lumbar",
    "cspine": "cervical",
    "tspine": "thoracic",
    "lspine": "lumbar",
    **{r: r for r in REGIONS},
}


class ManifestError(ValueError):
    """A manifest that the workflow cannot start with; the message names the rows."""


def _entities(name: str) -> dict[str, str]:
    stem = name.split(".")[0]
    return dict(part.split("-", 1) for part in stem.split("_") if "-" in part)


def manifest_from_bids(root: str | Path, *, references: str | Path | None = None) -> pd.DataFrame:
    """Rows for every sagittal T2w station image under a BIDS `root`.

    The station comes from the `chunk` entity (NAKO: HWS/BWS/LWS; also
    cervical/thoracic/lumbar). Files with an `acq` entity that is not sagittal
    are skipped. With `references`, SPINEPS-named masks
    (`<stem>_mod-T2w_seg-spine_msk.nii.gz`, `..._seg-vert_msk.nii.gz`) are
    looked up at the mirrored place in that derivatives folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"BIDS folder {root} does not exist")
    rows, unknown = [], []
    for path in sorted(root.glob("sub-*/**/anat/*_T2w.nii.gz")):
        ent = _entities(path.name)
        if "acq" in ent and "sag" not in ent["acq"].lower():
            continue
        region = STATION_ALIASES.get(ent.get("chunk", "").lower())
        if region is None:
            unknown.append(f"{path} (chunk={ent.get('chunk')!r})")
            continue
        stem = path.name[: -len("_T2w.nii.gz")]
        row = {
            "subject": ent["sub"],
            "session": ent.get("ses", ""),
            "region": region,
            "image_id": stem,
            "image": str(path),
            "reference_semantic": "",
            "reference_instance": "",
        }
        if references is not None:
            ref_dir = Path(references) / path.parent.relative_to(root)
            for col, seg in (("reference_semantic", "spine"), ("reference_instance", "vert")):
                ref = ref_dir / f"{stem}_mod-T2w_seg-{seg}_msk.nii.gz"
                row[col] = str(ref) if ref.is_file() else ""
        rows.append(row)
    if unknown:
        raise ManifestError("T2w images with no recognisable station (chunk entity): " + "; ".join(unknown))
    if not rows:
        raise ManifestError(f"no sagittal T2w images (sub-*/[ses-*/]anat/*_T2w.nii.gz) under {root}")
    return pd.DataFrame(rows)


def assign_batches(rows: pd.DataFrame, *, batch_size: int, previous: pd.DataFrame | None = None) -> pd.DataFrame:
    """Give every row a batch id, keeping the batch of every image already in `previous`.

    New images never join an existing batch (that would redo a finished one):
    they fill new batches, in (region, subject, session) order.

    >>> rows = pd.DataFrame({"image_id": ["a", "b", "c"], "region": ["lumbar"] * 3,
    ...                      "subject": ["1", "2", "3"], "session": [""] * 3})
    >>> first = assign_batches(rows.iloc[:2], batch_size=2)
    >>> list(assign_batches(rows, batch_size=2, previous=first)["batch"])
    ['b0001', 'b0001', 'b0002']
    """
    if batch_size < 1:
        raise ManifestError(f"batch size must be at least 1, got {batch_size}")
    out = rows.copy()
    known: dict[str, str] = {}
    earlier: dict[str, str] = {}
    if previous is not None and len(previous):
        known = dict(zip(previous["image_id"], previous["batch"]))
        earlier = dict(zip(previous["image_id"], previous.get("earlier_batches", pd.Series("", previous.index))))
    out["batch"] = [known.get(i, "") for i in out["image_id"]]
    out["earlier_batches"] = [earlier.get(i, "") for i in out["image_id"]]
    start = _next_batch_number(previous) if previous is not None else 1
    new = out[out["batch"] == ""].sort_values(["region", "subject", "session", "image_id"])
    for k, idx in enumerate(new.index):
        out.loc[idx, "batch"] = f"b{start + k // batch_size:04d}"
    return out.sort_values(["batch", "image_id"]).reset_index(drop=True)


def _next_batch_number(table: pd.DataFrame) -> int:
    """One past every batch id the manifest has used, the earlier batches of retried images included: a batch
    id is never given twice (its work folders would look finished)."""
    used = [*table["batch"], *" ".join(table.get("earlier_batches", pd.Series(dtype=str))).split()]
    return 1 + max((int(b[1:]) for b in used if b), default=0)


def first_batches(table: pd.DataFrame) -> pd.Series:
    """Each image's first batch: the oldest of its earlier batches, else its batch."""
    if "earlier_batches" not in table:
        return table["batch"]
    return table["earlier_batches"].str.split(" ").str[0].where(table["earlier_batches"] != "", table["batch"])


def batch_history(table: pd.DataFrame) -> dict[str, list[str]]:
    """Batch -> the image ids it was made for: its images and those retried elsewhere since (sorted). What a batch
    job was run for, so a retry, which moves an image out, does not make the batch's other images run again.

    >>> rows = pd.DataFrame({"image_id": ["a", "b"], "batch": ["b0001", "b0002"], "earlier_batches": ["", "b0001"]})
    >>> batch_history(rows)
    {'b0001': ['a', 'b'], 'b0002': ['b']}
    """
    earlier = table.get("earlier_batches", [""] * len(table))
    pairs = [(batch, i) for i, now, before in zip(table["image_id"], table["batch"], earlier) for batch in (now, *before.split())]
    history: dict[str, list[str]] = {}
    for batch, image_id in sorted(pairs):
        history.setdefault(batch, []).append(image_id)
    return history


def retry(table: pd.DataFrame, image_ids: Iterable[str], *, batch_size: int) -> pd.DataFrame:
    """The manifest with `image_ids` moved into new batches (of up to `batch_size`), each leaving its batch in its
    earlier_batches: the new batches run those images from the start, and nothing else reruns but what reads them
    (their subjects' levels, the cohort summaries).

    >>> rows = pd.DataFrame({"image_id": ["a", "b"], "region": ["lumbar"] * 2, "subject": ["1", "2"], "session": [""] * 2,
    ...                      "batch": ["b0001", "b0001"], "earlier_batches": ["", ""]})
    >>> retry(rows, ["b"], batch_size=10)[["image_id", "batch", "earlier_batches"]].values.tolist()
    [['a', 'b0001', ''], ['b', 'b0002', 'b0001']]
    """
    moved = table["image_id"].isin(set(image_ids))
    out = table.copy()
    out.loc[moved, "earlier_batches"] = (out.loc[moved, "earlier_batches"] + " " + out.loc[moved, "batch"]).str.strip()
    start = _next_batch_number(table)
    order = out[moved].sort_values(["region", "subject", "session", "image_id"]).index
    for k, idx in enumerate(order):
        out.loc[idx, "batch"] = f"b{start + k // batch_size:04d}"
    return out.sort_values(["batch", "image_id"]).reset_index(drop=True)


def retry_candidates(table: pd.DataFrame, failures: pd.DataFrame, *, changed_after: float | None) -> list[str]:
    """The failed images (rows of a failures table) to retry: those still in the batch they failed in (not moved by
    a retry the workflow has not run yet) and, with `changed_after` (a time stamp), whose image or reference file
    changed after it (the user fixed them); with None, every one.

    `table` has resolved paths (`resolve_paths`). A file's change is its modification time: replacing a file
    sets it, whatever its size (a copy with ``cp -p`` keeps the old time: touch it).
    """
    if "batch" not in failures:
        raise ManifestError("the failures table has no batch column (written before spinecohort had retry): run snakemake once more first")
    rows = table.set_index("image_id")
    held = failures[[rows["batch"].get(i) == b for i, b in zip(failures.image_id, failures.batch)]]

    def changed(image_id: str, since: float) -> bool:
        files = [p for p in rows.loc[image_id, ["image", "reference_semantic", "reference_instance"]] if p]
        return any(Path(p).exists() and Path(p).stat().st_mtime > since for p in files)

    return [i for i in held.image_id if changed_after is None or changed(i, changed_after)]


def subject_groups(table: pd.DataFrame) -> dict[str, list[str]]:
    """Group -> image ids: each subject (and session) joins the group named after its first batch.

    Stable as a cohort grows: new images fill new batches (`assign_batches`), so a subject already
    in a group keeps it, and a new subject's group is new; a retried image counts from its first batch.

    >>> rows = pd.DataFrame({"subject": ["1", "1", "2"], "session": ["", "", ""], "image_id": ["a", "b", "c"],
    ...                      "batch": ["b0002", "b0001", "b0002"]})
    >>> subject_groups(rows)
    {'b0001': ['a', 'b'], 'b0002': ['c']}
    """
    first = first_batches(table).groupby([table["subject"], table["session"]]).transform("min")
    return {group: sorted(ids) for group, ids in table.groupby(first)["image_id"]}


def check_manifest(table: pd.DataFrame, *, source: str = "manifest", require_batch: bool = True) -> pd.DataFrame:
    """Check columns, ids, regions and uniqueness; return the table with all columns as str.

    A finished manifest has every column but the references (as `workflow/schemas/manifest.schema.yaml`
    says; a test keeps the two in step). With ``require_batch=False`` (a hand-written one) session,
    image_id and batch may be missing or empty: they are derived or assigned later.
    Raises ManifestError naming each offending row (1-based, header excluded).
    """
    optional = OPTIONAL_COLUMNS + (() if require_batch else ("session", "image_id", "batch"))
    missing = [c for c in COLUMNS if c not in table.columns and c not in optional]
    if missing:
        raise ManifestError(f"{source}: missing column(s) {', '.join(missing)}")
    table = table.copy()
    for col in COLUMNS:
        if col not in table.columns:
            table[col] = ""
        table[col] = table[col].fillna("").astype(str)
    # A hand-written manifest may leave image_id out: derive it from the key.
    no_id = table["image_id"] == ""
    table.loc[no_id, "image_id"] = [
        f"sub-{r.subject}" + (f"_ses-{r.session}" if r.session else "") + f"_chunk-{r.region}" for r in table[no_id].itertuples()
    ]
    # Column-wise checks (a 90,000-row manifest is read by every Snakemake invocation).
    checks = [
        ("subject", ~table.subject.str.fullmatch(SAFE_ID.pattern[1:-1]), "unsafe subject id {!r} (ASCII letters and digits only: A-Z, a-z, 0-9)"),
        ("session", (table.session != "") & ~table.session.str.fullmatch(SAFE_ID.pattern[1:-1]),
         "unsafe session id {!r} (ASCII letters and digits only: A-Z, a-z, 0-9)"),
        ("image_id", ~table.image_id.str.fullmatch(SAFE_IMAGE_ID.pattern[1:-1]) | table.image_id.str.contains("..", regex=False),
         "unsafe image_id {!r}"),
        ("region", ~table.region.isin(REGIONS), "region {!r} is not one of " + ", ".join(REGIONS)),
        ("batch", ((table.batch != "") | require_batch) & ~table.batch.str.fullmatch(BATCH_ID.pattern[1:-1]),
         "batch {!r} does not look like b0001"),
        ("earlier_batches", ~table.earlier_batches.str.fullmatch(BATCH_LIST.pattern[1:-1]),
         "earlier_batches {!r} is not a list of batch ids like 'b0001 b0007'"),
        ("image", table.image == "", "empty image path"),
    ]
    flagged = sorted((i, order, col, message) for order, (col, bad, message) in enumerate(checks) for i in np.flatnonzero(bad))
    problems = [f"row {i + 1}: " + message.format(table[col].iat[i]) for i, _, col, message in flagged]
    for col, what in (("image_id", "image_id"), ("image", "image path")):
        dup = table[col][table[col].duplicated(keep=False) & (table[col] != "")]
        for value in sorted(set(dup)):
            rows = [str(i + 1) for i in dup.index[dup == value]]
            problems.append(f"rows {', '.join(rows)}: duplicate {what} {value!r}")
    key = ["subject", "session", "region"]
    for value, group in table[table.duplicated(key, keep=False)].groupby(key):
        rows = [str(i + 1) for i in group.index]
        problems.append(f"rows {', '.join(rows)}: subject/session/region {value} appears twice")
    if problems:
        raise ManifestError(f"{source}: " + "; ".join(problems))
    return table[list(COLUMNS)]


def schema_problems(table: pd.DataFrame, schema: Mapping[str, Any]) -> list[str]:
    """Check `table` column-wise against a JSON schema for one row; one message per offending row.

    Vectorised: jsonschema validates row objects one at a time, which costs ~10 s
    for a 90,000-image cohort. Only the keywords a manifest schema needs are
    understood; any other keyword is an error, so schema and code cannot drift.
    """
    known = {"type", "pattern", "enum", "minLength", "description"}
    problems = [f"column {c!r} is required" for c in schema.get("required", ()) if c not in table.columns]
    for col, rule in schema.get("properties", {}).items():
        if unknown := set(rule) - known:
            raise ValueError(f"schema keyword(s) {sorted(unknown)} for {col!r} are not supported")
        if col not in table.columns:
            continue
        values = table[col].astype(str)
        bad = pd.Series(False, index=table.index)
        if "pattern" in rule:
            bad |= ~values.str.contains(rule["pattern"], regex=True)
        if "enum" in rule:
            bad |= ~values.isin(rule["enum"])
        if "minLength" in rule:
            bad |= values.str.len() < rule["minLength"]
        problems += [f"row {i + 1}: {col} {values[i]!r} does not match the schema ({rule.get('description', '')})"
                     for i in table.index[bad]]
    return problems


def read_manifest_table(path: str | Path) -> pd.DataFrame:
    """A manifest TSV as read, every value a string; refused when it has no rows, or rows whose number of fields is
    not the header's (pandas would pad a short row with empty values, and the checks would then blame its ids)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").count("\t") + 1
        rows = [line.rstrip("\r\n").count("\t") + 1 for line in f if line.strip()]  # pandas skips blank lines too
    if not rows:
        raise ManifestError(f"manifest {path} has no images: a header and no rows")
    if wrong := [f"row {k} has {n} columns, the header {header}" for k, n in enumerate(rows, start=1) if n != header]:
        raise ManifestError(f"manifest {path}: " + "; ".join(wrong[:20]) + (f"; and {len(wrong) - 20} more" if len(wrong) > 20 else ""))
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and check a manifest TSV; ids stay strings."""
    return check_manifest(read_manifest_table(path), source=str(path))


def resolve_paths(table: pd.DataFrame, base: str | Path, columns: Iterable[str] = ("image", "reference_semantic", "reference_instance")) -> pd.DataFrame:
    """Make relative paths relative to `base` (the manifest's folder); empty stays empty."""
    out = table.copy()
    base = Path(base)
    for col in columns:
        out[col] = [str(base / p) if p and not Path(p).is_absolute() else p for p in out[col]]
    return out


def manifest_entry(path: str | Path, base: str | Path) -> str:
    """`path` as a manifest in `base` writes it: relative when it lies under `base` (the cohort folder can
    move), else as given; empty stays empty."""
    if path and Path(path).resolve().is_relative_to(root := Path(base).resolve()):
        return str(Path(path).resolve().relative_to(root))
    return str(path)


def relative_paths(table: pd.DataFrame, base: str | Path) -> pd.DataFrame:
    """Inverse of `resolve_paths` for paths under `base`, so the cohort folder can move."""
    out = table.copy()
    for col in ("image", "reference_semantic", "reference_instance"):
        out[col] = [manifest_entry(p, base) for p in out[col]]
    return out
