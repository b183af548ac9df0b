"""Per-level measurements of one station's final masks: vertebral bodies, discs, spinal canal and cord.

Every length is taken along the column, not along the image axes. The column's centre line runs through the
vertebral bodies' centroids (in millimetres, world space); at each level its local axis `u` points from the
body above to the body below (one-sided at the ends), the antero-posterior direction `a` points from the
canal's centre towards the body's (made perpendicular to `u`; the world's anterior where no canal is seen),
and `l = u x a` is lateral. Heights and depths are read in the mid-sagittal slab (|l| within half a voxel's
lateral extent, at least 1 mm) as the extent of the voxel centres plus one voxel's extent along that
direction; areas of the canal and cord are the volume of their voxels in a slab perpendicular to `u` divided by
its thickness.

    body (vertebra level, e.g. L3)  volume mm3, height_anterior / height_middle / height_posterior mm (at 10,
                                    50 and 90 % of the depth from its front), depth mm, wedge_ratio
                                    (anterior / posterior height)
    disc (e.g. L3-L4)               volume mm3, height_mean / height_max mm (at 10, 20, ... 90 % of its depth),
                                    height_relative (mean height / mean middle height of its two bodies)
    canal, cord (at L3: mid-body,   area_mid_body / area_mid_disc mm2, ap_mid_body / ap_mid_disc mm;
    at L3-L4: mid-disc)             cord/canal: area_ratio

A value is NaN with a reason where its structure is cut by the field of view (touches the image's border) or
is not there. The QC's vertebra volumes (`cohort_qc.level_volumes`) are counted by `volumes`, as the body
volumes here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import pandas as pd
import pyarrow as pa

from . import labels as L

if TYPE_CHECKING:
    from numpy.typing import NDArray

COLUMNS: Final = ("image_id", "level", "structure", "measure", "value", "unit", "reason")
TABLE_SCHEMA: Final = pa.schema([*((name, pa.string()) for name in ("subject", "session", "station", "image_id", "level", "structure", "measure")),
                                  ("value", pa.float64()), ("unit", pa.string()), ("reason", pa.string()), ("qc_flags", pa.string()),
                                  ("stations_measured", pa.int32()), ("overlap_difference", pa.float64())])  # summary/morphometrics.parquet  # fmt: skip
STATION_COLUMNS: Final = tuple(TABLE_SCHEMA.names[:10])  # label-levels' `layout.MORPHOMETRICS`
BODY_HEIGHTS: Final = {"height_anterior": 0.9, "height_middle": 0.5, "height_posterior": 0.1}  # fraction of depth from the back
DISC_POSITIONS: Final = np.linspace(0.1, 0.9, 9)
CANAL_NEAR_MM: Final = 10.0  # the canal within this distance along the axis sets a level's anterior direction
CANAL_RADIUS_MM: Final = 25.0  # canal voxels this far from the canal's centre in the slab's plane do not count
CUT: Final = "cut by the field of view"
NOT_SEEN: Final = {"height_relative": "no neighbouring body measured whole", "": "not in the mid-sagittal slab"}


def volumes(mask: NDArray[np.integer], affine: NDArray[np.float64], where: NDArray[np.bool_]) -> dict[int, float]:
    """Volume (mm3) of each id of `mask` where `where` holds."""
    ids, counts = np.unique(mask[where], return_counts=True)
    voxel = float(abs(np.linalg.det(affine[:3, :3])))
    return {int(k): float(n) * voxel for k, n in zip(ids, counts)}


@dataclass(frozen=True)
class Frame:
    """A level's centre (mm) and its axes: `u` down the column, `a` anterior, `l` lateral."""

    centre: NDArray[np.float64]
    u: NDArray[np.float64]
    a: NDArray[np.float64]
    l: NDArray[np.float64]  # noqa: E741


class Station:
    """One station's masks as world coordinates of the voxels that matter, with their ids and border flags."""

    def __init__(self, instance: NDArray[np.integer], semantic: NDArray[np.integer], affine: NDArray[np.float64]):
        keep = (instance > 0) | np.isin(semantic, (L.CANAL, L.CORD))
        index = np.nonzero(keep)
        self.instance = instance[index]
        self.semantic = semantic[index]
        self.border = np.zeros(len(self.instance), bool)
        for axis, size in enumerate(instance.shape):
            self.border |= (index[axis] == 0) | (index[axis] == size - 1)
        self.xyz = np.stack(index, axis=1) @ affine[:3, :3].T + affine[:3, 3]
        self.edges = affine[:3, :3].T  # one voxel's edge vectors (mm), one per row
        self.voxel = float(abs(np.linalg.det(affine[:3, :3])))

    def extent(self, direction: NDArray[np.float64]) -> float:
        """One voxel's extent (mm) along a unit `direction`."""
        return float(np.abs(self.edges @ direction).sum())


def _span(values: NDArray[np.float64], voxel: float) -> float:
    return float(values.max() - values.min() + voxel) if len(values) else float("nan")


def _unit(v: NDArray[np.float64]) -> NDArray[np.float64]:
    return v / np.linalg.norm(v)


def measure(instance: NDArray[np.integer], semantic: NDArray[np.integer], affine: NDArray[np.float64], image_id: str = "") -> pd.DataFrame:
    """Every measure of the station's levels (`COLUMNS`, one row per level, structure and measure). Ids are levels
    (the subject's numbering: SPINEPS ids); the sacrum is a body for the axis and the L5-S1 disc, not measured."""
    st = Station(instance, semantic, affine)
    is_body = st.semantic == L.CORPUS
    bodies = {int(k): st.xyz[is_body & (st.instance == k)] for k in np.unique(st.instance[is_body & (st.instance < L.IVD_OFFSET)])}
    if not bodies:
        return pd.DataFrame(columns=list(COLUMNS))
    centres = {k: v.mean(axis=0) for k, v in bodies.items()}
    order = _column_order(centres)
    canal = np.isin(st.semantic, (L.CANAL, L.CORD))
    rows: list[tuple[str, str, str, float, str, str]] = []
    frames: dict[int, Frame] = {}
    tangent = _centre_line(np.array([centres[k] for k in order]))
    for i, k in enumerate(order):
        frames[k] = _frame(centres[k], tangent(float(i)), st.xyz[canal])
    middle: dict[int, float] = {}
    for k in order:
        if k == L.SACRUM:
            continue
        name = L.VERTEBRA_NAMES.get(k, str(k))
        cut = bool(st.border[is_body & (st.instance == k)].any())
        body = _body(bodies[k], frames[k], st)
        middle[k] = np.nan if cut else body["height_middle"]
        rows += [(name, "body", m, np.nan if cut else v, UNITS[m], CUT if cut else "") for m, v in body.items()]
        rows += _canal(st, frames[k], "mid_body", name)
    for upper, lower in zip(order, order[1:]):
        disc = st.instance == L.IVD_OFFSET + upper
        name = f"{L.VERTEBRA_NAMES.get(upper, upper)}-{L.VERTEBRA_NAMES.get(lower, lower)}"
        if not disc.any():
            continue
        u = tangent(order.index(upper) + 0.5)
        frame = Frame(st.xyz[disc].mean(axis=0), u, *_lateral(u, frames[upper].a))
        cut = bool(st.border[disc].any())
        values = _disc(st.xyz[disc], frame, st)
        neighbours = [h for h in (middle.get(upper, np.nan), middle.get(lower, np.nan)) if np.isfinite(h)]  # the sacrum has none
        values["height_relative"] = values["height_mean"] / float(np.mean(neighbours)) if neighbours else np.nan
        rows += [(name, "disc", m, np.nan if cut else v, UNITS[m], CUT if cut else "" if np.isfinite(v) else NOT_SEEN.get(m, NOT_SEEN[""]))
                 for m, v in values.items()]  # fmt: skip
        rows += _canal(st, frame, "mid_disc", name)
    table = pd.DataFrame(rows, columns=list(COLUMNS[1:]))
    table.insert(0, "image_id", image_id)
    return table


UNITS: Final = {"volume": "mm3", "depth": "mm", "wedge_ratio": "1", "height_mean": "mm", "height_max": "mm", "height_relative": "1",
                **dict.fromkeys(BODY_HEIGHTS, "mm")}  # fmt: skip


SUPERIOR: Final = np.array([0.0, 0.0, 1.0])  # world (RAS) superior: masks are read as nibabel gives them


def _column_order(centres: dict[int, NDArray[np.float64]]) -> list[int]:
    """Body ids top to bottom: along the centroids' main direction (a tilted column too), oriented downwards in the
    world, whichever way the image's axes run."""
    ids = list(centres)
    points = np.array([centres[k] for k in ids])
    direction = np.linalg.svd(points - points.mean(axis=0))[2][0] if len(ids) > 1 else -SUPERIOR
    direction = direction if direction @ SUPERIOR < 0 else -direction
    return [ids[i] for i in np.argsort(points @ direction, kind="stable")]


def _centre_line(points: NDArray[np.float64]) -> Callable[[float], NDArray[np.float64]]:
    """The centre line's direction (down the column) at a position between the bodies (0: the first body's centroid,
    0.5: half way to the second): a quadratic through the centroids by arc length, so that the end bodies of a curved
    column get their own tangent, not the chord to their neighbour."""
    if len(points) < 2:
        return lambda _: -SUPERIOR
    arc = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))]
    coefficients = [np.polynomial.Polynomial.fit(arc, points[:, j], min(2, len(points) - 1)).deriv() for j in range(3)]

    def direction(position: float) -> NDArray[np.float64]:
        s = float(np.interp(position, np.arange(len(points)), arc))
        return _unit(np.array([c(s) for c in coefficients]))

    return direction


def _lateral(u: NDArray[np.float64], anterior: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    a = _unit(anterior - (anterior @ u) * u)
    return a, np.cross(u, a)


def _frame(centre: NDArray[np.float64], u: NDArray[np.float64], canal: NDArray[np.float64]) -> Frame:
    """The level's frame: anterior from the canal's centre near the level towards the body's centre."""
    near = canal[np.abs((canal - centre) @ u) <= CANAL_NEAR_MM] if len(canal) else canal
    near = near[np.linalg.norm(near - centre, axis=1) <= CANAL_RADIUS_MM * 2] if len(near) else near
    anterior = centre - near.mean(axis=0) if len(near) else np.array([0.0, 1.0, 0.0])  # RAS: +y is anterior
    if np.linalg.norm(anterior - (anterior @ u) * u) < 1e-6:
        anterior = np.array([0.0, 1.0, 0.0])
    return Frame(centre, u, *_lateral(u, anterior))


def _slab(points: NDArray[np.float64], frame: Frame, st: Station) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The mid-sagittal slab's points as (along u, along a) coordinates."""
    d = points - frame.centre
    inside = np.abs(d @ frame.l) <= max(st.extent(frame.l) / 2, 1.0)
    return d[inside] @ frame.u, d[inside] @ frame.a


def _heights(along_u: NDArray[np.float64], along_a: NDArray[np.float64], fractions: NDArray[np.float64] | list[float], st: Station,
             frame: Frame) -> tuple[list[float], float]:  # fmt: skip
    """Heights (extent along u) at `fractions` of the depth from the back, and the depth (extent along a)."""
    if not len(along_a):
        return [np.nan] * len(fractions), np.nan
    e_a, e_u = st.extent(frame.a), st.extent(frame.u)
    back, depth = along_a.min() - e_a / 2, _span(along_a, e_a)
    half = max(e_a / 2, 0.05 * depth)
    return [_span(along_u[np.abs(along_a - (back + f * depth)) <= half], e_u) for f in fractions], depth


def _body(points: NDArray[np.float64], frame: Frame, st: Station) -> dict[str, float]:
    heights, depth = _heights(*_slab(points, frame, st), list(BODY_HEIGHTS.values()), st, frame)
    out = {"volume": len(points) * st.voxel, **dict(zip(BODY_HEIGHTS, heights)), "depth": depth}
    out["wedge_ratio"] = out["height_anterior"] / out["height_posterior"]
    return out


def _disc(points: NDArray[np.float64], frame: Frame, st: Station) -> dict[str, float]:
    heights = np.array(_heights(*_slab(points, frame, st), DISC_POSITIONS, st, frame)[0])
    seen = heights[np.isfinite(heights)]
    return {"volume": len(points) * st.voxel, "height_mean": float(seen.mean()) if len(seen) else np.nan,
            "height_max": float(seen.max()) if len(seen) else np.nan, "height_relative": np.nan}  # fmt: skip


def _canal(st: Station, frame: Frame, where: str, level: str) -> list[tuple[str, str, str, float, str, str]]:
    """Canal and cord area and AP diameter in the slab perpendicular to u through the level's centre."""
    # Each voxel counts with a tent weight of its distance from the plane (half-width: a voxel's extent along u):
    # on a grid the weights of a column of voxels sum to one, so the area is exact for a tube along u.
    half = st.extent(frame.u)
    d = st.xyz - frame.centre
    along = d @ frame.u
    weight = np.clip(1 - np.abs(along) / half, 0, None) / half
    in_plane = d - along[:, None] * frame.u
    in_slab = (weight > 0) & np.isin(st.semantic, (L.CANAL, L.CORD)) & (np.linalg.norm(in_plane, axis=1) <= 2 * CANAL_RADIUS_MM)
    if in_slab.any():  # the canal's own centre in this plane; a canal further away (a curve meeting the plane again) is not this level's
        in_slab &= np.linalg.norm(in_plane - in_plane[in_slab].mean(axis=0), axis=1) <= CANAL_RADIUS_MM
    rows, areas = [], {}
    for structure, ids in (("canal", (L.CANAL, L.CORD)), ("cord", (L.CORD,))):
        voxels = in_slab & np.isin(st.semantic, ids)
        reason = CUT if st.border[voxels].any() else ("" if voxels.any() else f"no {structure} at this level")
        sagittal = np.abs(d[voxels] @ frame.l) <= max(st.extent(frame.l) / 2, 1.0)
        area = float(weight[voxels].sum()) * st.voxel if not reason else np.nan
        ap = _span(d[voxels][sagittal] @ frame.a, st.extent(frame.a)) if not reason and sagittal.any() else np.nan
        areas[structure] = area
        rows += [(level, structure, f"area_{where}", area, "mm2", reason), (level, structure, f"ap_{where}", ap, "mm", reason)]
    ratio = areas["cord"] / areas["canal"] if areas["canal"] else np.nan
    rows.append((level, "cord", f"area_ratio_{where}", ratio, "1", "" if np.isfinite(ratio) else "cord or canal not measured"))
    return rows


def cohort_table(stations: list[pd.DataFrame], flags: pd.Series, rejected: set[str]) -> pd.DataFrame:
    """Measurements of stations (label-levels' `layout.MORPHOMETRICS`) as summary/morphometrics.parquet has them
    (`TABLE_SCHEMA`): without the images the review rejected, each row with its image's QC flags (`flags`, by
    image id) and, where another station of the subject measured the same level's measure whole,
    `stations_measured` and `overlap_difference` (this value minus the mean of the other stations' values)."""
    table = pd.concat(stations, ignore_index=True) if stations else pd.DataFrame(columns=list(STATION_COLUMNS), dtype=str)
    table = table[~table.image_id.isin(rejected)].reset_index(drop=True)
    table["value"] = pd.to_numeric(table.value, errors="coerce").astype(float)
    table["qc_flags"] = flags.reindex(table.image_id).fillna("").to_numpy(dtype=object)
    seen = table.value.notna()
    groups = table.assign(known=seen, total=table.value.where(seen, 0.0)).groupby(["subject", "session", "level", "structure", "measure"],
                                                                                  sort=False)  # fmt: skip
    n, total = groups.known.transform("sum"), groups.total.transform("sum")
    table["stations_measured"] = n.astype("int32")
    table["overlap_difference"] = (table.value - (total - table.value) / (n - 1)).where(seen & (n > 1))
    return table


def agreement(predicted: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per station, structure and measure: the pairs measured in both (same image and level), the predicted masks'
    bias (mean difference, predicted - reference), the 95 % limits of agreement (bias -/+ 1.96 SD) and the
    reference's mean, as a Bland-Altman table."""
    keys = ["image_id", "level", "structure", "measure"]
    pairs = predicted.merge(reference[[*keys, "value"]], on=keys, suffixes=("", "_reference")).dropna(subset=["value", "value_reference"])
    pairs = pairs.assign(difference=pairs.value - pairs.value_reference)
    groups = pairs.groupby(["station", "structure", "measure", "unit"], sort=False)
    table = groups.agg(pairs=("difference", "size"), reference_mean=("value_reference", "mean"), bias=("difference", "mean"),
                       sd=("difference", "std")).reset_index()  # fmt: skip
    table["lower"], table["upper"] = table.bias - 1.96 * table.sd, table.bias + 1.96 * table.sd
    return table.drop(columns="sd")
