"""Score rows per image and cohort summaries: the long score table, by-region statistics, Table S1, plots.

Score table (long format, one row per image x structure x metric): subject,
session, region, image_id, batch, structure, metric (DSC or ASSD), value,
definition (ASSD definition, see `metrics`), flag (empty-mask policy), and the
voxel counts of both masks. Stored as parquet, partitioned by region (hive).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from . import io, layout, metrics
from . import labels as L
from .geometry import geometry_mismatch, spacing_of
from .labels import REGIONS

__all__ = [
    "INSTANCE_GROUPS",
    "SCORE_SCHEMA",
    "TABLE_S1_ROWS",
    "box_plots",
    "by_region",
    "failures",
    "held_now",
    "image_score_rows",
    "instance_score_rows",
    "level_score_rows",
    "levels_table",
    "read_scores",
    "table_s1",
    "write_partitioned",
    "write_scores",
    "write_levels_table",
    "write_table_s1",
]

# The structures and their order in Table S1 of the SPINEPS supplement.
TABLE_S1_ROWS = (
    "Vertebra", "IVD", "Spinal canal", "Spinal cord",
    "Arcus", "Spinous process", "Articularis inferior", "Articularis superior", "Costal process", "Vertebra corpus",
)
TABLE_S1_REGIONS = {"cervical": "Cervical", "thoracic": "Thoracic", "lumbar": "Lumbar"}

SCORE_SCHEMA = pa.schema([
    ("subject", pa.string()), ("session", pa.string()), ("region", pa.string()), ("image_id", pa.string()),
    ("batch", pa.string()), ("structure", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
    ("definition", pa.string()), ("flag", pa.string()), ("pred_voxels", pa.int64()), ("ref_voxels", pa.int64()),
])


def _load_pair(pred_path: Path, ref_path: Path, allowed: frozenset[int]):
    """Prediction and reference on one grid; a reference with ids outside `allowed` is mislabeled."""
    pred, pred_affine = io.load_mask(pred_path)
    ref, ref_affine = io.load_mask(ref_path)
    if problem := geometry_mismatch(pred_path, pred.shape, pred_affine, ref_path, ref.shape, ref_affine):
        raise ValueError(problem)
    if unknown := L.unknown_ids(ref, allowed):
        raise ValueError(f"{ref_path}: reference has unknown label ids {unknown}")
    return pred, ref, ref_affine


def _with_keys(row: pd.Series, records: list[dict]) -> pd.DataFrame:
    out = pd.DataFrame(records)
    for col in ("subject", "session", "region", "image_id", "batch"):
        out.insert(0, col, row[col])
    return out[SCORE_SCHEMA.names]


def image_score_rows(
    row: pd.Series, pred_path: Path, ref_path: Path, structures: Mapping[str, Sequence[int]], definition: str
) -> pd.DataFrame:
    """Long-format DSC and ASSD rows of one image's semantic mask against its reference."""
    pred, ref, affine = _load_pair(pred_path, ref_path, L.SEMANTIC_MASK_IDS)
    spacing = spacing_of(affine).tolist()
    records = []
    for s in metrics.score_structures(pred, ref, spacing, structures, definition):
        for metric, value, how in (("DSC", s.dsc, ""), ("ASSD", s.assd, definition)):
            records.append({"structure": s.structure, "metric": metric, "value": value, "definition": how, "flag": s.flag,
                            "pred_voxels": s.pred_voxels, "ref_voxels": s.ref_voxels})
    return _with_keys(row, records)


# Instance groups scored by matching (ids of the SPINEPS `seg-vert` scheme).
INSTANCE_GROUPS = {"Vertebra instances": (1, L.IVD_OFFSET), "IVD instances": (L.IVD_OFFSET, L.ENDPLATE_OFFSET)}


def instance_score_rows(row: pd.Series, pred_path: Path, ref_path: Path, definition: str) -> pd.DataFrame:
    """Panoptic rows (PQ, SQ, RQ, recall, precision; mean DSC and ASSD of matched instances) per instance group."""
    pred, ref, affine = _load_pair(pred_path, ref_path, L.INSTANCE_MASK_IDS)
    spacing = spacing_of(affine).tolist()
    records = []
    for group, (lo, hi) in INSTANCE_GROUPS.items():
        p = np.where((pred >= lo) & (pred < hi), pred, 0)
        r = np.where((ref >= lo) & (ref < hi), ref, 0)
        s = metrics.score_instances(p, r, spacing, definition=definition)
        dsc = float(np.mean([m[3] for m in s.matched])) if s.matched else float("nan")
        distance = float(np.mean([m[4] for m in s.matched])) if s.matched else float("nan")
        values = {"PQ": s.pq, "SQ": s.sq, "RQ": s.rq, "recall": s.recall, "precision": s.precision,
                  "instance DSC": dsc, "instance ASSD": distance}
        for metric, value in values.items():
            records.append({"structure": group, "metric": metric, "value": value,
                            "definition": definition if metric == "instance ASSD" else "",
                            "flag": f"tp={s.tp} fp={s.fp} fn={s.fn}", "pred_voxels": int((p > 0).sum()),
                            "ref_voxels": int((r > 0).sum())})
    return _with_keys(row, records)


LEVELS = "Vertebra levels"  # the structure of the identification rows


def level_score_rows(row: pd.Series, pred_path: Path, ref_path: Path, numbering: str, ref_semantic: Path | None) -> pd.DataFrame:
    """Identification rate and mean localisation distance (mm) of the vertebra ids (`metrics.identify`).

    Scored: every reference vertebra whose body (corpus, in `ref_semantic` when given) is in view.
    A counted station ("count") makes no claim of levels: NaN, flag "count".
    """
    pred, ref, affine = _load_pair(pred_path, ref_path, L.INSTANCE_MASK_IDS)
    ids = np.unique(ref[L.vertebra_ids(ref)]).tolist()
    if ref_semantic is not None:
        corpus = io.load_mask(ref_semantic)[0] == L.CORPUS
        ids = [k for k in ids if (corpus & (ref == k)).any()]
    keys = {"pred_voxels": int(L.vertebra_ids(pred).sum()), "ref_voxels": int(L.vertebra_ids(ref).sum()), "definition": ""}
    nan = float("nan")
    values = {"id_rate": nan, "localisation_mm": nan, "identified": nan, "scored": float(len(ids))}
    if numbering != "count":
        predicted = np.unique(pred[L.vertebra_ids(pred)]).tolist()
        found = metrics.identify(metrics.centroids_mm(pred, affine, predicted), metrics.centroids_mm(ref, affine, ids))
        distances = list(found.localisation_mm.values())
        values.update(id_rate=found.rate, localisation_mm=float(np.mean(distances)) if distances else nan,
                      identified=float(len(distances)))
    return _with_keys(row, [{"structure": LEVELS, "metric": m, "value": v, "flag": numbering, **keys} for m, v in values.items()])


def _mean_sd(table: pd.DataFrame, column: str, digits: int) -> str:
    v = table[column].dropna() if column in table else pd.Series(dtype=float)
    return "–" if v.empty else f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def levels_table(scores: pd.DataFrame, stations: pd.DataFrame) -> pd.DataFrame:
    """Per station: the images with levels and how they were numbered (`stations`: image_id, region, numbering, of
    every image label-levels finished), and over the anchored images that references scored, the identification
    rate and localisation (mean ± SD); "–" where none was scored (a cohort without references)."""
    levels = scores[scores.structure == LEVELS]
    rows = []
    for region in REGIONS:
        mine = stations[stations.region == region]
        if mine.empty:
            continue
        scored = levels[levels.region == region]
        per_image = (scored.pivot_table(index="image_id", columns="metric", values="value", aggfunc="first", dropna=False)
                     if len(scored) else pd.DataFrame(columns=["id_rate", "localisation_mm", "identified", "scored"]))
        anchored = per_image[mine.set_index("image_id").numbering.reindex(per_image.index) != "count"]
        rows.append({
            "Station": TABLE_S1_REGIONS[region],
            "Images": len(mine),
            "Numbering": ", ".join(f"{m} {n}" for m, n in mine.numbering.value_counts().sort_index().items()),
            "Identification rate": _mean_sd(anchored, "id_rate", 3),
            "Vertebrae identified": f"{int(anchored['identified'].sum())} of {int(anchored['scored'].sum())}" if len(anchored) else "–",
            "Localisation (mm)": _mean_sd(anchored, "localisation_mm", 2),
        })
    return pd.DataFrame(rows, columns=["Station", "Images", "Numbering", "Identification rate", "Vertebrae identified",
                                       "Localisation (mm)"])


def write_levels_table(table: pd.DataFrame, folder: Path, *, empty: str | None = None) -> dict[str, Path]:
    """The levels table as Markdown and CSV (atomic writes); `empty`, when given, says in the caption why it has no rows."""
    caption = ("Vertebra levels: identification rate (VerSe, 20 mm) and localisation distance, mean ± SD over the "
               "images with levels (numbered across the subject's stations from C2, or from a station's own C2 or sacrum); counted images make no claim of levels"
               + (f" ({empty})" if empty else ""))
    paths = {"md": folder / "levels.md", "csv": folder / "levels.csv"}
    texts = {"md": f"{caption}\n\n{table.to_markdown(index=False)}\n", "csv": table.to_csv(index=False)}
    return _write_texts(paths, texts)


def write_scores(path: Path, table: pd.DataFrame) -> None:
    """One parquet file, written atomically; an empty table keeps the schema."""
    data = pa.Table.from_pandas(table[SCORE_SCHEMA.names] if len(table) else pd.DataFrame(columns=SCORE_SCHEMA.names),
                                schema=SCORE_SCHEMA, preserve_index=False)
    import pyarrow.parquet as pq

    with io.atomic_path(path) as tmp:
        pq.write_table(data, tmp)


def write_parquet(path: Path, frame: pd.DataFrame, metadata: dict[bytes, bytes]) -> None:
    """A summary table as one parquet file, written atomically, with the run's key-value metadata (`provenance`)."""
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    with io.atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata}), tmp)


def read_scores(files: Sequence[Path]) -> pa.Table:
    """All score files as one Arrow table (pyarrow reads them in parallel, no per-file Python)."""
    return ds.dataset([str(f) for f in files], format="parquet", schema=SCORE_SCHEMA).to_table()


def write_partitioned(table: pa.Table, folder: Path) -> None:
    """The cohort's scores as a hive-partitioned dataset (``region=lumbar/…``), replaced as a whole. Without rows
    (no image has a reference) it holds one empty file with the schema, so that readers get the columns."""
    import pyarrow.parquet as pq

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    ds.write_dataset(table, tmp, format="parquet", partitioning=["region"], partitioning_flavor="hive",
                     existing_data_behavior="delete_matching")
    if table.num_rows == 0:
        pq.write_table(table, tmp / "part-0.parquet")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def by_region(scores: pd.DataFrame) -> pd.DataFrame:
    """region x structure x metric: mean, SD, median, IQR and counts.

    NaN values (both masks empty, or an ASSD with one mask empty) are left out
    and counted in ``n_excluded``; a missed structure's DSC of 0 is counted.
    """
    grouped = scores.groupby(["region", "structure", "metric"], observed=True)["value"]
    out = grouped.agg(mean="mean", sd="std", median="median", q1=lambda v: v.quantile(0.25), q3=lambda v: v.quantile(0.75),
                      n="count", n_rows="size").reset_index()
    out["iqr"] = out["q3"] - out["q1"]
    out["n_excluded"] = out.pop("n_rows") - out["n"]
    return out


def table_s1(summary: pd.DataFrame, structures: Sequence[str] = TABLE_S1_ROWS) -> pd.DataFrame:
    """Table S1 layout: one row per structure; per region a DSC and an ASSD (mm) column, "mean ± SD"."""
    def cell(region, structure, metric):
        hit = summary[(summary.region == region) & (summary.structure == structure) & (summary.metric == metric)]
        if hit.empty or pd.isna(hit["mean"].iloc[0]):
            return "–"
        mean, sd = hit["mean"].iloc[0], hit["sd"].iloc[0]
        digits = 3 if metric == "DSC" else 2
        return f"{mean:.{digits}f} ± {sd:.{digits}f}" if pd.notna(sd) else f"{mean:.{digits}f}"

    columns = {"Structure": list(structures)}
    for region in REGIONS:
        for metric, title in (("DSC", "DSC"), ("ASSD", "ASSD (mm)")):
            columns[f"{TABLE_S1_REGIONS[region]} {title}"] = [cell(region, s, metric) for s in structures]
    return pd.DataFrame(columns)


def write_table_s1(table: pd.DataFrame, folder: Path, caption: str) -> dict[str, Path]:
    """Table S1 as Markdown, CSV and LaTeX (atomic writes); returns the paths by format."""
    paths = {"md": folder / "table_s1.md", "csv": folder / "table_s1.csv", "tex": folder / "table_s1.tex"}
    texts = {
        "md": f"{caption}\n\n{table.to_markdown(index=False)}\n",
        "csv": table.to_csv(index=False),
        "tex": table.to_latex(index=False, caption=caption, label="tab:s1").replace("±", r"$\pm$"),
    }
    return _write_texts(paths, texts)


def _write_texts(paths: Mapping[str, Path], texts: Mapping[str, str]) -> dict[str, Path]:
    """Each format's text to its path, atomically; returns the paths by format."""
    for fmt, path in paths.items():
        with io.atomic_path(path) as tmp:
            tmp.write_text(texts[fmt], encoding="utf-8")
    return dict(paths)


def box_plots(scores: pd.DataFrame, folder: Path, structures: Sequence[str]) -> list[Path]:
    """One PNG per metric: a box per structure and region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric, unit in (("DSC", ""), ("ASSD", " (mm)")):
        data = scores[(scores.metric == metric) & scores.value.notna()]
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(structures)), 4), dpi=100)
        width = 0.8 / len(REGIONS)
        for k, region in enumerate(REGIONS):
            values = [data.value[(data.region == region) & (data.structure == s)].to_numpy() for s in structures]
            pos = np.arange(len(structures)) + (k - 1) * width
            keep = [i for i, v in enumerate(values) if len(v)]
            if keep:
                box = ax.boxplot([values[i] for i in keep], positions=pos[keep], widths=width * 0.9, patch_artist=True,
                                 manage_ticks=False)
                for patch in box["boxes"]:
                    patch.set_facecolor(f"C{k}")
            ax.plot([], [], "s", color=f"C{k}", label=TABLE_S1_REGIONS[region])
        ax.set_xticks(np.arange(len(structures)), structures, rotation=30, ha="right")
        ax.set_ylabel(metric + unit)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        path = folder / f"boxplot_{metric.lower()}.png"
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def held_now(rows: pd.DataFrame, batch: str, batches: Mapping[str, str]) -> pd.DataFrame:
    """The rows of a batch's table whose images the batch holds now (`batches`: image_id -> batch, the manifest's)."""
    return rows[rows["image_id"].map(batches) == batch]


FAILURE_COLUMNS = ("image_id", "batch", *layout.LEDGER_COLUMNS[1:])


def failures(ledgers: Sequence[Path], batches: Mapping[str, str]) -> pd.DataFrame:
    """One row per image of the manifest (`batches`: image_id -> its batch) that did not finish: its batch, where
    it failed and why.

    A stage's own failure wins over the "skipped" rows that later stages write
    for it (those carry the reason but not the stage; temporary fold folders may
    be gone, so a skipped row is all that is left of a failed fold). A batch's
    ledger (``work/<batch>/<stage>/ledger.tsv``) speaks for the images that batch
    holds now: one that `spinecohort retry` moved on left its old failure there.
    """
    tables = []
    for path in ledgers:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        per_batch = path.parent.name in layout.LEDGER_FOLDERS  # else a subject group's
        tables.append(held_now(table, path.parent.parent.name, batches) if per_batch else table[table.image_id.isin(batches)])
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(layout.LEDGER_COLUMNS))
    table = table[table.status != "ok"].copy()
    table["order"] = (table.status != "failed").astype(int)
    table = table.sort_values(["image_id", "order"], kind="stable").drop_duplicates("image_id")
    table["batch"] = table.image_id.map(batches)
    return table[list(FAILURE_COLUMNS)].reset_index(drop=True)
