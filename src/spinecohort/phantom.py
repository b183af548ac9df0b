"""Synthetic sagittal T2w spine phantoms with exact reference labels.

A subject is a curved column of vertebrae (C2 down to the sacrum) described in
"straightened" coordinates along the column: `s` (mm along the body
centre-line, caudal positive), `n` (mm anterior of it, in the sagittal plane)
and `lft` (mm to the patient's left of the midline). Every structure is an
analytic shape in those coordinates, so the labels are exact. A station
(cervical, thoracic, lumbar) is a 300 mm sagittal field of view of that column,
rendered on sub-slices, averaged into thick slices (partial volume), then
noised (Rician) and multiplied by a smooth bias field.

The raw images are stored in (A, S, L) voxel order, as the affine states, so
the pipeline's reorientation to (P, I, R) is exercised.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from . import labels as L

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Preset",
    "PRESETS",
    "Subject",
    "PhantomImage",
    "make_subject",
    "render_station",
    "write_cohort",
    "STATION_LEVELS",
    "FAILURES",
    "inject_failure",
]


@dataclass(frozen=True)
class Preset:
    """Acquisition grid: shape and voxel size (mm) in (A, S, L) order."""

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    subslices: int = 5  # odd: the centre sub-slice carries the reference label


PRESETS: Final = {
    "nako": Preset("nako", (448, 448, 15), (0.6696, 0.6696, 4.0)),
    "small": Preset("small", (160, 160, 14), (1.875, 1.875, 4.4)),
}

# Levels a station must show completely, and levels it must not show at all.
STATION_LEVELS: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "cervical": {"required": ("C2", "C3", "C4", "C5", "C6", "C7", "T1"), "absent": ("T9", "L1", "S1")},
    "thoracic": {"required": tuple(f"T{i}" for i in range(2, 12)), "absent": ("C2", "C3", "L3", "S1")},
    "lumbar": {"required": ("L1", "L2", "L3", "L4", "L5", "S1"), "absent": ("C7", "T1", "T6")},
}

# Anatomical anchors, interpolated along the column: body height, AP depth,
# LR width and thickness of the disc below (mm), after published averages.
_ANCHORS: Final = {
    "C2": (20.0, 15.0, 17.0, 4.5),
    "C7": (14.0, 16.0, 23.0, 5.0),
    "T1": (16.0, 17.0, 25.0, 4.0),
    "T6": (19.0, 24.0, 29.0, 4.5),
    "T12": (23.0, 29.0, 38.0, 7.0),
    "L1": (24.0, 31.0, 42.0, 9.0),
    "L5": (26.0, 34.0, 49.0, 11.0),
}
_FOV_SI_MM: Final = 300.0

# Tissue classes and their T2w intensities (CSF = 1000).
AIR, SOFT, FAT, BODY, PLATE, ANNULUS, NUCLEUS, CSF, CORD_T, BONE, SACRAL = range(11)
_INTENSITY: Final = np.array([0, 300, 680, 450, 130, 360, 860, 1000, 520, 220, 420], dtype=np.float32)
_NOISE_SIGMA: Final = 20.0


@dataclass(frozen=True)
class Vertebra:
    level: int  # instance id
    top: float  # s of the body's upper surface
    height: float
    depth: float
    width: float
    disc: float  # thickness of the disc below (0 for the sacrum)

    @property
    def centre(self) -> float:
        return self.top + self.height / 2

    @property
    def bottom(self) -> float:
        return self.top + self.height

    @property
    def kind(self) -> str:
        return L.VERTEBRA_NAMES[self.level][0]


@dataclass(frozen=True)
class Subject:
    """One synthetic person: a column, its curve, and the midline position (mm)."""

    subject_id: str
    vertebrae: tuple[Vertebra, ...]
    curve_s: NDArray[np.float64]  # arc length samples, mm
    curve_yz: NDArray[np.float64]  # (len(s), 2) world (A, S) of the body centre-line
    midline_x: float  # world R coordinate of the midsagittal plane
    cord_end: float  # s where the conus ends
    seed: tuple[int, ...] = field(default=())
    # (vertebra id, rib shaft length mm) of every vertebra carrying a rib pair (`rib_pairs`); an image feature only
    ribs: tuple[tuple[int, float], ...] = field(default=())

    def level(self, name: str) -> Vertebra:
        lvl = L.VERTEBRA_IDS[name]
        return next(v for v in self.vertebrae if v.level == lvl)


@dataclass(frozen=True)
class PhantomImage:
    image: NDArray[np.float32]
    semantic: NDArray[np.uint8]
    instance: NDArray[np.uint16]
    bias: NDArray[np.float32]
    bias_free: NDArray[np.float32]
    affine: NDArray[np.float64]


def _dims(names: list[str]) -> NDArray[np.float64]:
    """Interpolate the anchor table over a column given by level names (C2 ... S1)."""
    pos = {n: i for i, n in enumerate(names)}
    # Anchors are placed by anatomical name; T13/L6 columns stretch between them.
    known = [(pos[n], v) for n, v in _ANCHORS.items() if n in pos]
    xs = np.array([k for k, _ in known], dtype=float)
    vals = np.array([v for _, v in known], dtype=float)
    idx = np.arange(len(names), dtype=float)
    return np.stack([np.interp(idx, xs, vals[:, j]) for j in range(4)], axis=1)


ANOMALIES: Final = ("none", "l6", "t13", "t11")
MIXED: Final = ("none", "t13", "none", "l6", "t11")  # anomaly "mixed": by subject index, two normal columns in five


def make_subject(seed: int, index: int, *, anomaly: str = "none", rudimentary_t12: float = 0.0, lumbar_ribs: float = 0.0) -> Subject:
    """Draw one subject's anatomy; deterministic in (seed, index).

    `anomaly`: "none", "l6" (six lumbar vertebrae), "t13" (thirteen thoracic), "t11" (eleven thoracic)
    or "random" (none 1/2, l6 and t13 1/4 each), or "mixed" (`MIXED` by the subject's index). Ribs (`rib_pairs`): every thoracic vertebra carries a pair, the
    13th a short one; with the chances `rudimentary_t12` the 12th pair is rudimentary and `lumbar_ribs` L1 carries
    a short pair (drawn from their own stream: the column is the same whatever the rates).
    """
    rng = np.random.default_rng([seed, index, 0])
    if anomaly == "random":
        anomaly = str(rng.choice(["none", "none", "l6", "t13"]))
    elif anomaly == "mixed":
        anomaly = MIXED[index % len(MIXED)]
    if anomaly not in ANOMALIES:
        raise ValueError(f"unknown anomaly {anomaly!r}; expected one of {', '.join(ANOMALIES)} random or mixed")
    thoracic = {"t13": 13, "t11": 11}.get(anomaly, 12)
    ids = L.level_sequence(first="C2", thoracic=thoracic, lumbar=6 if anomaly == "l6" else 5)
    names = [L.VERTEBRA_NAMES[i] for i in ids]
    dims = _dims(names[:-1]) * rng.uniform(0.92, 1.08)
    dims[:, 3] *= rng.uniform(0.9, 1.1)
    vertebrae: list[Vertebra] = []
    s = 0.0
    for lvl, (h, d, w, disc) in zip(ids[:-1], dims):
        vertebrae.append(Vertebra(lvl, s, h, d, w, disc))
        s += h + disc
    last = vertebrae[-1]
    vertebrae.append(Vertebra(L.SACRUM, s, 55.0 * last.height / 26.0, last.depth * 1.05, last.width * 1.15, 0.0))

    # Curvature per region: lordosis (negative), kyphosis (positive), in degrees.
    curv = {
        "C": -30.0 * rng.uniform(0.6, 1.4),
        "T": 40.0 * rng.uniform(0.7, 1.3),
        "L": -50.0 * rng.uniform(0.7, 1.3),
        "S": 35.0,
    }
    ds = 0.25
    s_grid = np.arange(-90.0, vertebrae[-1].bottom + 40.0, ds)
    kappa = np.zeros_like(s_grid)
    for kind in "CTLS":
        members = [v for v in vertebrae if v.kind == kind]
        lo, hi = members[0].top, members[-1].bottom
        kappa[(s_grid >= lo) & (s_grid < hi)] = math.radians(curv[kind]) / (hi - lo)
    kappa = ndimage.gaussian_filter1d(kappa, 30.0 / ds)
    theta = np.cumsum(kappa) * ds
    theta += math.radians(rng.uniform(-4.0, 4.0)) - np.average(theta[(s_grid >= 0) & (s_grid <= s)])
    y = np.cumsum(np.sin(theta)) * ds
    z = -np.cumsum(np.cos(theta)) * ds
    y -= np.interp(0.0, s_grid, y)
    z -= np.interp(0.0, s_grid, z)
    l1, l2 = (next(v for v in vertebrae if v.level == lvl) for lvl in (20, 21))
    cord_end = rng.uniform(l1.centre, l2.top)
    return Subject(
        subject_id="",
        vertebrae=tuple(vertebrae),
        curve_s=s_grid,
        curve_yz=np.stack([y, z], axis=1),
        midline_x=float(rng.uniform(-3.0, 3.0)),
        cord_end=float(cord_end),
        seed=(seed, index),
        ribs=rib_pairs(ids, np.random.default_rng([seed, index, 3]), rudimentary_t12=rudimentary_t12, lumbar_ribs=lumbar_ribs),
    )


RIB_SHAFT_MM: Final = {"full": 45.0, "short": 12.0}  # how far the shaft runs on from the costotransverse joint


def rib_pairs(ids: list[int], rng: np.random.Generator, *, rudimentary_t12: float, lumbar_ribs: float) -> tuple[tuple[int, float], ...]:
    """(vertebra id, shaft length) of the vertebrae carrying ribs: every thoracic one (T13 a short pair; T12 a short
    one with the chance `rudimentary_t12`), L1 a short pair with the chance `lumbar_ribs`."""
    thoracic = [i for i in ids if L.VERTEBRA_NAMES[i].startswith("T")]
    draws = rng.uniform(size=2)  # always two: a rate changes which subjects get them, not the stream
    ribs = {i: RIB_SHAFT_MM["full"] for i in thoracic}
    if L.VERTEBRA_IDS["T13"] in ribs:
        ribs[L.VERTEBRA_IDS["T13"]] = RIB_SHAFT_MM["short"]
    if draws[0] < rudimentary_t12 and L.VERTEBRA_IDS["T12"] in ribs:
        ribs[L.VERTEBRA_IDS["T12"]] = RIB_SHAFT_MM["short"]
    if draws[1] < lumbar_ribs:
        ribs[L.VERTEBRA_IDS["L1"]] = RIB_SHAFT_MM["short"]
    return tuple(ribs.items())


def station_affine(subject: Subject, region: str, preset: Preset, rng: np.random.Generator) -> NDArray[np.float64]:
    """Place a 300 mm field of view on the column like the station of a real scan (A, S, L axes)."""
    if region == "cervical":
        z_top = _z_at(subject, subject.level("C2").top) + 45.0
    elif region == "thoracic":
        thoracic = [v for v in subject.vertebrae if v.kind == "T"]
        mid = (thoracic[0].top + thoracic[-1].bottom) / 2
        z_top = _z_at(subject, mid) + _FOV_SI_MM / 2
    elif region == "lumbar":
        z_top = _z_at(subject, subject.vertebrae[-1].top) - 85.0 + _FOV_SI_MM
    else:
        raise ValueError(f"unknown region {region!r}")
    z_top += rng.uniform(-10.0, 10.0)
    sa, ss, sl = preset.spacing
    na, ns, nl = preset.shape
    # Centre the AP field on the column's mean position, a little anterior.
    in_fov = (subject.curve_yz[:, 1] <= z_top) & (subject.curve_yz[:, 1] >= z_top - ns * ss)
    y_mid = float(subject.curve_yz[in_fov, 0].mean()) + 25.0 + rng.uniform(-10.0, 10.0)
    x_mid = subject.midline_x + rng.uniform(-2.0, 2.0)
    affine = np.zeros((4, 4))
    affine[:3, 0] = (0.0, sa, 0.0)  # i -> anterior
    affine[:3, 1] = (0.0, 0.0, ss)  # j -> superior
    affine[:3, 2] = (-sl, 0.0, 0.0)  # k -> left
    affine[:3, 3] = (x_mid + sl * (nl - 1) / 2, y_mid - sa * (na - 1) / 2, z_top - ss * (ns - 1))
    affine[3, 3] = 1.0
    return affine


def _z_at(subject: Subject, s: float) -> float:
    return float(np.interp(s, subject.curve_s, subject.curve_yz[:, 1]))


def _straighten(subject: Subject, y: NDArray[np.float64], z: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    """Map in-plane world points (A, S) to (s, n) along the column's centre-line."""
    yz = subject.curve_yz
    tangent = np.gradient(yz, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)  # anterior of a caudal tangent
    pts = np.stack([y.ravel(), z.ravel()], axis=1)
    _, idx = cKDTree(yz).query(pts)
    rel = pts - yz[idx]
    s = subject.curve_s[idx] + np.einsum("ij,ij->i", rel, tangent[idx])
    n = np.einsum("ij,ij->i", rel, normal[idx])
    return s.reshape(y.shape), n.reshape(y.shape)


class _Canvas:
    """Fine-grid label and tissue volumes painted shape by shape (later wins)."""

    def __init__(self, s: NDArray, n: NDArray, lft: NDArray) -> None:
        self.s, self.n, self.lft = s, n, lft
        shape = (*s.shape, lft.size)
        self.semantic = np.zeros(shape, np.uint8)
        self.instance = np.zeros(shape, np.uint16)
        self.tissue = np.full(shape, AIR, np.uint8)

    def window(self, s_lo: float, s_hi: float, n_lo: float = -130.0, n_hi: float = 130.0):
        """Pixels with s in [s_lo, s_hi] and n in [n_lo, n_hi], as flat indices plus coordinates."""
        sel = np.flatnonzero((self.s >= s_lo) & (self.s <= s_hi) & (self.n >= n_lo) & (self.n <= n_hi))
        return sel, self.s.ravel()[sel][:, None], self.n.ravel()[sel][:, None]

    def paint(self, sel, inside: NDArray[np.bool_], tissue: int, semantic: int = 0, instance: int = 0) -> None:
        pix, sub = np.nonzero(inside)
        ii, jj = np.unravel_index(sel[pix], self.s.shape)
        self.tissue[ii, jj, sub] = tissue
        self.semantic[ii, jj, sub] = semantic
        self.instance[ii, jj, sub] = instance


def _superellipse(a: NDArray, b: NDArray, p: float = 2.5) -> NDArray:
    return np.abs(a) ** p + np.abs(b) ** p


def _paint_column(cv: _Canvas, subject: Subject, ribs: bool = False) -> None:
    verts = subject.vertebrae
    lumbar_like = {"C": 0.0, "T": 0.5, "L": 1.0, "S": 1.0}
    lft = cv.lft[None, :]
    s_all = np.array([v.centre for v in verts])
    depth_at = lambda s: np.interp(s, s_all, [v.depth for v in verts])  # noqa: E731
    canal_ap = lambda s: np.interp(s, s_all, [7.0 + 1.5 * lumbar_like[v.kind] for v in verts])  # noqa: E731
    canal_lr = lambda s: np.interp(s, s_all, [12.0 - 3.0 * (v.kind == "T") for v in verts])  # noqa: E731

    # Body envelope: soft tissue from the back's skin to the front, fat under the back's skin.
    sel, s, n = cv.window(-1e9, 1e9, -400.0, 400.0)
    back = 75.0 + 10.0 * np.clip((s - verts[0].top) / 400.0, 0, 1)
    # The neck widens into the trunk over the cervicothoracic junction.
    trunk = np.clip((s - subject.level("C6").top) / 60.0, 0.0, 1.0)
    front = 70.0 + 70.0 * trunk
    half_width = 55.0 + 105.0 * trunk
    inside_body = (n > -back) & (n < front) & (np.abs(lft) < half_width)
    cv.paint(sel, inside_body, SOFT)
    cv.paint(sel, inside_body & (n < -back + 9.0), FAT)
    if ribs:
        _paint_ribs(cv, subject, canal_ap, canal_lr)

    # Discs first; bodies painted over them fill the disc surfaces exactly.
    for upper, lower in zip(verts[:-1], verts[1:]):
        sel, s, n = cv.window(upper.bottom - 3, lower.top + 3, -60, 60)
        d = (upper.depth + lower.depth) / 4 * 1.04
        w = (upper.width + lower.width) / 4 * 1.04
        a = _superellipse(n / d, lft / w)
        disc = (a <= 1) & (s >= upper.bottom - 2) & (s <= lower.top + 2)
        cv.paint(sel, disc, ANNULUS, L.IVD, L.IVD_OFFSET + upper.level)
        cv.paint(sel, disc & (a <= 0.45), NUCLEUS, L.IVD, L.IVD_OFFSET + upper.level)

    plate = 1.6  # endplate thickness, mm
    previous = {lower.level: upper.level for upper, lower in zip(verts[:-1], verts[1:])}
    for v in verts[:-1]:
        hh = v.height / 2
        sel, s, n = cv.window(v.top - 1, v.bottom + 1, -60, 60)
        a = _superellipse(n / (v.depth / 2), lft / (v.width / 2))
        ds = np.abs(s - v.centre)
        corpus = a + (ds / hh) ** 10 <= 1
        cv.paint(sel, corpus, BODY, L.CORPUS, v.level)
        plate_zone = corpus & (a + ((ds + plate) / hh) ** 10 > 1)
        upper_plate = plate_zone & (s < v.centre)
        above = previous.get(v.level, v.level - 1)
        cv.paint(sel, upper_plate, PLATE, L.ENDPLATE, L.ENDPLATE_OFFSET + above)
        cv.paint(sel, plate_zone & (s >= v.centre), PLATE, L.ENDPLATE, L.ENDPLATE_OFFSET + v.level)
        _paint_posterior(cv, subject, v, canal_ap, canal_lr)

    _paint_sacrum(cv, verts[-1], previous[L.SACRUM], plate)

    # Dural sac (CSF) down to S2, cord inside it down to the conus.
    sacrum = verts[-1]
    sel, s, n = cv.window(-1e9, sacrum.top + 22.0, -120, 10)
    centre = -(depth_at(s) / 2 + 1.0 + canal_ap(s))
    ra, rl = canal_ap(s), canal_lr(s)
    canal = ((n - centre) / ra) ** 2 + (lft / rl) ** 2 <= 1
    cv.paint(sel, canal, CSF, L.CANAL)
    taper = np.clip((subject.cord_end - s) / 25.0, 0.0, 1.0) ** 0.5
    cord_ra = np.where(s < subject.level("T1").top, 4.5, 4.0) * taper
    cord_rl = np.where(s < subject.level("T1").top, 6.5, 5.0) * taper
    centre_cord = centre + 0.15 * ra
    cord = ((n - centre_cord) / np.maximum(cord_ra, 1e-3)) ** 2 + (lft / np.maximum(cord_rl, 1e-3)) ** 2 <= 1
    cv.paint(sel, cord & (taper > 0), CORD_T, L.CORD)


_LAMINA_MM: Final = {"C": 3.0, "T": 4.0, "L": 5.0}  # lamina thickness
_TRANSVERSE_MM: Final = {"C": 9.0, "T": 16.0, "L": 22.0}  # costal (transverse) process length


def _transverse_span(kind: str, canal_lr: float) -> tuple[float, float]:
    """How far from the midline a transverse process starts and ends (mm)."""
    inner = canal_lr + 0.6 * _LAMINA_MM[kind]
    return inner, inner + _TRANSVERSE_MM[kind]


def rib_path(v: Vertebra, shaft: float, canal_ap: float, canal_lr: float) -> NDArray[np.float64]:
    """The left rib of `v` as a polyline in (s, n, lft): its head at the body's posterolateral corner (at the
    upper endplate: the costovertebral joint), its tubercle under the transverse process's tip (the
    costotransverse joint), then the shaft running posterolaterally and down for `shaft` mm."""
    n_c = -(v.depth / 2 + 1.0 + canal_ap)
    _, tip = _transverse_span("T", canal_lr)
    head = (v.top + 1.0, -0.3 * v.depth, v.width / 2 + 2.0)
    tubercle = (v.centre - 1.0, n_c - 0.4 * canal_ap + 5.0, tip - 2.0)
    direction = np.array([0.35, -0.45, 0.82]) / np.linalg.norm([0.35, -0.45, 0.82])
    return np.array([head, tubercle, np.asarray(tubercle) + shaft * direction])


RIB_RADIUS_MM: Final = 4.0  # a rib's cross-section: marrow inside a 1 mm cortex


def _paint_ribs(cv: _Canvas, subject: Subject, canal_ap, canal_lr) -> None:
    """Ribs as image only (marrow and cortex, no label): painted before the labelled structures, which win."""
    by_level = {v.level: v for v in subject.vertebrae}
    lft = cv.lft[None, :]
    for level, shaft in subject.ribs:
        v = by_level[level]
        path = rib_path(v, shaft, float(canal_ap(v.centre)), float(canal_lr(v.centre)))
        lo, hi = path.min(axis=0) - RIB_RADIUS_MM, path.max(axis=0) + RIB_RADIUS_MM
        sel, s, n = cv.window(lo[0], hi[0], lo[1], hi[1])
        for side in (1.0, -1.0):
            distance = np.full(np.broadcast_shapes(s.shape, lft.shape), np.inf)
            for a, b in zip(path[:-1] * [1, 1, side], path[1:] * [1, 1, side]):
                distance = np.minimum(distance, _segment_distance(s, n, lft, a, b))
            cv.paint(sel, distance <= RIB_RADIUS_MM, BONE)
            cv.paint(sel, distance <= RIB_RADIUS_MM - 1.0, BODY)


def _segment_distance(s: NDArray, n: NDArray, lft: NDArray, a: NDArray, b: NDArray) -> NDArray:
    """Distance (mm) of points (s, n, lft) from the segment a-b."""
    ab = b - a
    t = np.clip(((s - a[0]) * ab[0] + (n - a[1]) * ab[1] + (lft - a[2]) * ab[2]) / float(ab @ ab), 0.0, 1.0)
    return np.sqrt((s - a[0] - t * ab[0]) ** 2 + (n - a[1] - t * ab[1]) ** 2 + (lft - a[2] - t * ab[2]) ** 2)


def _paint_posterior(cv: _Canvas, subject: Subject, v: Vertebra, canal_ap, canal_lr) -> None:
    kind = v.kind
    h = v.height
    ra, rl = float(canal_ap(v.centre)), float(canal_lr(v.centre))
    n_c = -(v.depth / 2 + 1.0 + ra)  # canal centre
    t = _LAMINA_MM[kind]
    lft = cv.lft[None, :]
    sel, s, n = cv.window(v.top - 0.4 * h, v.bottom + 0.8 * h + 20, n_c - ra - t - 45, 5)

    def paint(mask: NDArray, label: int) -> None:
        cv.paint(sel, mask, BONE, label, v.level)

    # Arcus: pedicles and laminae, a ring around the canal behind the body.
    r_in = np.sqrt(((n - n_c) / ra) ** 2 + (lft / rl) ** 2)
    r_out = np.sqrt(((n - n_c) / (ra + t)) ** 2 + (lft / (rl + t)) ** 2)
    s_arc = (s >= v.top + 0.12 * h) & (s <= v.bottom - 0.05 * h)
    paint(s_arc & (r_in > 1) & (r_out <= 1) & (n < -v.depth / 2 + 0.5), L.ARCUS)

    # Costal (transverse) processes: lateral bars from the ring.
    inner, tip = _transverse_span(kind, rl)
    half_s = {"C": 3.0, "T": 4.5, "L": 4.0}[kind]
    bar = (((s - v.centre) / half_s) ** 2 + ((n - (n_c - 0.4 * ra)) / 3.5) ** 2 <= 1) & (np.abs(lft) >= inner)
    bar &= np.abs(lft) <= tip
    paint(bar & (lft > 0), L.COSTAL_L)
    paint(bar & (lft < 0), L.COSTAL_R)

    # Articular processes: superior ones reach up, inferior ones down, forming facet joints.
    x_art = rl + 0.5 * t + 2.0
    half = (0.3 * h, 3.5, 3.2)
    for label_l, label_r, s0, n0 in (
        (L.SUP_ARTICULAR_L, L.SUP_ARTICULAR_R, v.top, n_c - 0.2 * ra),
        (L.INF_ARTICULAR_L, L.INF_ARTICULAR_R, v.bottom, n_c - 0.2 * ra - 7.5),
    ):
        body = ((s - s0) / half[0]) ** 2 + ((n - n0) / half[1]) ** 2
        paint(body + ((lft - x_art) / half[2]) ** 2 <= 1, label_l)
        paint(body + ((lft + x_art) / half[2]) ** 2 <= 1, label_r)

    # Spinous process: from the back of the ring, posteriorly and caudally.
    length = {"C": 16.0 + 14.0 * (v.level == 7), "T": 30.0, "L": 28.0}[kind]
    tilt = {"C": 0.35, "T": 0.9, "L": 0.15}[kind]
    half_h = {"C": 4.0, "T": 5.0, "L": 8.0}[kind]
    n_start = n_c - ra - 0.5 * t
    depth = np.clip(n_start - n, 0.0, None)
    s_line = v.centre + 0.1 * h + tilt * depth
    taper = 1.0 - 0.35 * np.clip(depth / length, 0, 1)
    spine = (((s - s_line) / (half_h * taper)) ** 2 + (lft / 3.0) ** 2 <= 1) & (n <= n_start) & (depth <= length)
    paint(spine, L.SPINOUS)


def _paint_sacrum(cv: _Canvas, sac: Vertebra, above: int, plate: float) -> None:
    lft = cv.lft[None, :]
    sel, s, n = cv.window(sac.top - 1, sac.bottom + 1, -110, 60)
    u = np.clip((s - sac.top) / sac.height, 0, 1)
    d = sac.depth / 2 * (1.0 - 0.45 * u)
    w = sac.width / 2 * (1.25 - 0.75 * u)
    n0 = -12.0 * u**2  # the sacrum curves backwards
    a = _superellipse((n - n0) / d, lft / w)
    rounded = ((s - sac.top) / sac.height - 0.5) * 2
    body = (a + np.abs(rounded) ** 8 <= 1) & (s >= sac.top)
    cv.paint(sel, body, SACRAL, L.SACRUM, L.SACRUM)
    # Sacral laminae behind the sacral canal.
    n_back = -(sac.depth / 2 + 14.0) * (1.0 - 0.3 * u)
    lamina = (np.abs(n - n_back) <= 4.0) & (np.abs(lft) <= w * 0.6) & (u <= 0.7) & (s >= sac.top + 4)
    cv.paint(sel, lamina, SACRAL, L.SACRUM, L.SACRUM)
    top = body & (s < sac.top + plate + 0.6) & (a <= 1)
    cv.paint(sel, top, PLATE, L.ENDPLATE, L.ENDPLATE_OFFSET + above)


def _bias_field(points: NDArray[np.float64], rng: np.random.Generator) -> NDArray[np.float64]:
    """exp of a few random long-wavelength cosines; log-std about 0.2 over a station."""
    log_b = np.zeros(points.shape[0])
    for _ in range(4):
        direction = rng.normal(size=3)
        direction[0] *= 0.3  # coils vary less across the thin left/right extent
        direction /= np.linalg.norm(direction)
        wavelength = rng.uniform(250.0, 600.0)
        log_b += rng.uniform(0.08, 0.16) * np.cos(2 * np.pi * points @ direction / wavelength + rng.uniform(0, 2 * np.pi))
    return np.exp(log_b)


def voxel_world(affine: NDArray[np.float64], shape: tuple[int, ...]) -> NDArray[np.float64]:
    """World (RAS) coordinates of every voxel centre, shape (*shape, 3)."""
    idx = np.stack(np.meshgrid(*[np.arange(k, dtype=float) for k in shape], indexing="ij"), axis=-1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def render_station(subject: Subject, region: str, preset: Preset, *, seed: int, index: int, ribs: bool = False) -> PhantomImage:
    """Render one station of `subject`; deterministic in (seed, index, region). With `ribs`, the subject's ribs
    are in the image (not in the references, which keep SPINEPS's labels)."""
    rng = np.random.default_rng([seed, index, 1 + L.REGIONS.index(region)])
    affine = station_affine(subject, region, preset, rng)
    na, ns, nl = preset.shape
    k = preset.subslices
    # In-plane coordinates of the grid (A, S) and the left offset of every sub-slice.
    plane = voxel_world(affine, (na, ns, 1))[:, :, 0, :]
    s, n = _straighten(subject, plane[..., 1], plane[..., 2])
    sub_k = (np.arange(nl * k) - (k - 1) / 2) / k  # fractional slice index of each sub-slice
    x_world = affine[0, 3] + affine[0, 2] * sub_k
    lft = -(x_world - subject.midline_x)
    cv = _Canvas(s, n, lft)
    _paint_column(cv, subject, ribs)

    centre = slice(k // 2, None, k)
    semantic = cv.semantic[:, :, centre].copy()
    instance = cv.instance[:, :, centre].copy()
    clean = _INTENSITY[cv.tissue].reshape(na, ns, nl, k).mean(axis=-1)

    texture = ndimage.gaussian_filter(rng.normal(size=clean.shape), sigma=(4.0 / preset.spacing[0],) * 2 + (0.5,))
    texture /= texture.std()
    textured = np.isin(cv.tissue[:, :, centre], (SOFT, BODY, SACRAL))
    clean = clean * np.where(textured, 1.0 + 0.12 * texture, 1.0)

    noise = rng.normal(scale=_NOISE_SIGMA, size=(2, *clean.shape))
    bias_free = np.hypot(clean + noise[0], noise[1]).astype(np.float32)
    world = voxel_world(affine, preset.shape).reshape(-1, 3)
    bias = _bias_field(world - world.mean(axis=0), rng).reshape(preset.shape).astype(np.float32)
    image = (bias_free * bias).astype(np.float32)
    return PhantomImage(image, semantic, instance, bias, bias_free, affine)


def station_motion(shape: tuple[int, ...], affine: NDArray[np.float64], *, shift_mm: float, rotation_deg: float,
                   rng: np.random.Generator) -> NDArray[np.float64]:
    """A rigid 4x4 world transform about the station's centre: the patient moved before this station.

    A shift of random direction and a length drawn up to `shift_mm`, a rotation about a random axis by an
    angle drawn up to `rotation_deg`. Applied to a station's affine, it moves the anatomy in the scanner
    frame while image and references keep their voxels, so the truth stays exact.
    """
    axis, direction = rng.normal(size=3), rng.normal(size=3)
    axis, direction = axis / np.linalg.norm(axis), direction / np.linalg.norm(direction)
    angle = math.radians(rng.uniform(-rotation_deg, rotation_deg))
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    rotation = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross  # Rodrigues
    centre = affine[:3, :3] @ ((np.asarray(shape, float) - 1) / 2) + affine[:3, 3]
    motion = np.eye(4)
    motion[:3, :3] = rotation
    motion[:3, 3] = centre - rotation @ centre + direction * rng.uniform(0.0, shift_mm)
    return motion


# Acquisition failures for validating cohort QC (issue 17), each graded by a severity in (0, 1]. They
# change the image only: the references keep the anatomy, so how wrong a segmentation gets is measured.
FAILURES: Final = {
    "noise": "Rician noise up to 0.4 x the CSF signal (the phantom's own: 0.02)",
    "blur": "motion-like blur: a Gaussian of up to 12 mm along the column, 4 mm across it",
    "contrast": "intensities inverted in part (up to 0.8 of the way to a T1w-like contrast)",
    "dropout": "a band across the column, 40-120 mm, whose signal falls by up to 95 % (a failed coil element)",
}
FAILURES_FILE: Final = "injected_failures.tsv"


def inject_failure(image: NDArray[np.float32], spacing: tuple[float, float, float], kind: str, severity: float,
                   rng: np.random.Generator) -> NDArray[np.float32]:
    """`image` ((A, S, L) voxel order, `spacing` mm) with the acquisition failure `kind` of `severity`.

    >>> image = np.full((8, 40, 2), 500.0, np.float32)
    >>> worse = inject_failure(image, (2.0, 2.0, 4.0), "dropout", 1.0, np.random.default_rng(0))
    >>> bool(worse.min() < 0.1 * 500 and worse.max() == 500)
    True
    """
    if not 0.0 < severity <= 1.0:
        raise ValueError(f"failure severity must lie in (0, 1], got {severity}")
    peak = float(_INTENSITY[CSF])
    if kind == "noise":
        sigma = 0.4 * peak * severity
        noise = rng.normal(scale=sigma, size=(2, *image.shape))
        out = np.hypot(image + noise[0], noise[1])
    elif kind == "blur":
        out = ndimage.gaussian_filter(image, sigma=(4.0 * severity / spacing[0], 12.0 * severity / spacing[1], 0.0))
    elif kind == "contrast":
        out = (1.0 - 0.8 * severity) * image + 0.8 * severity * np.clip(peak - image, 0.0, None)
    elif kind == "dropout":
        s_mm = np.arange(image.shape[1]) * spacing[1]
        width = 40.0 + 80.0 * rng.uniform()
        centre = rng.uniform(s_mm[-1] * 0.25, s_mm[-1] * 0.75)
        edge = np.clip((np.abs(s_mm - centre) - width / 2) / 10.0 + 1.0, 0.0, 1.0)  # 10 mm ramps
        out = image * (1.0 - 0.95 * severity * (1.0 - edge))[None, :, None]
    else:
        raise ValueError(f"unknown failure {kind!r}; expected one of {', '.join(FAILURES)}")
    return np.asarray(out, dtype=np.float32)


NAKO_STATION: Final = {"cervical": "HWS", "thoracic": "BWS", "lumbar": "LWS"}


TRUTH_FILE: Final = "truth.tsv"


def column_truth(subject: Subject, ribs: bool) -> dict[str, object]:
    """What a subject's column is: its vertebrae counted per region, the transitional vertebra it has (T13, L6,
    an 11th thoracic as last, or none) and, where the images show ribs, the vertebrae carrying them and the short
    pairs among them."""
    names = [L.VERTEBRA_NAMES[v.level] for v in subject.vertebrae[:-1]]
    thoracic, lumbar = sum(n.startswith("T") for n in names), sum(n.startswith("L") for n in names)
    transitional = "T13" if thoracic == 13 else "L6" if lumbar == 6 else "T11" if thoracic == 11 else ""
    pairs = dict(subject.ribs) if ribs else {}
    return {"cervical": sum(n.startswith("C") for n in names) + 1, "thoracic": thoracic, "lumbar": lumbar,  # C1 is not drawn
            "transitional": transitional, "rib_pairs": " ".join(L.VERTEBRA_NAMES[k] for k in pairs),
            "short_ribs": " ".join(L.VERTEBRA_NAMES[k] for k, shaft in pairs.items() if shaft < RIB_SHAFT_MM["full"])}  # fmt: skip


def _merge_truth(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """The truth table with `new`'s subjects replacing their earlier rows (a cohort grows by --first-index)."""
    import pandas as pd

    if not path.is_file():
        return new
    old = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    return pd.concat([old[~old.subject.isin(new.subject)], new.astype(str)], ignore_index=True).sort_values("subject")


def station_stem(index: int, region: str) -> str:
    """BIDS file stem (= image_id) of phantom subject `index`'s station in `region`."""
    return f"sub-phantom{index:04d}_acq-sag_chunk-{NAKO_STATION[region]}"


def planned_manifest(*, subjects: int, batch_size: int, first_index: int = 1) -> pd.DataFrame:
    """subject, session, region, image_id and batch of the manifest `write_cohort` writes into a fresh
    folder, known before rendering.

    >>> planned_manifest(subjects=2, batch_size=4).query("batch == 'b0002'").image_id.tolist()
    ['sub-phantom0001_acq-sag_chunk-BWS', 'sub-phantom0002_acq-sag_chunk-BWS']
    """
    import pandas as pd

    from . import cohort

    rows = pd.DataFrame(
        [{"subject": f"phantom{i:04d}", "session": "", "region": region, "image_id": station_stem(i, region)}
         for i in range(first_index, first_index + subjects) for region in L.REGIONS]
    )  # fmt: skip
    return cohort.assign_batches(rows, batch_size=batch_size)


def write_cohort(
    out: str | os.PathLike[str],
    *,
    subjects: int,
    preset: str = "small",
    seed: int = 0,
    first_index: int = 1,
    anomaly: str = "none",
    batch_size: int = 10,
    snapshot: bool = False,
    motion_mm: float = 0.0,
    motion_deg: float = 0.0,
    failures: float = 0.0,
    ribs: bool = False,
    rudimentary_t12: float = 0.0,
    lumbar_ribs: float = 0.0,
) -> Path:
    """Render a cohort as a NAKO-style BIDS tree with references and a manifest.

    Layout under `out`: ``rawdata/sub-*/anat/*_acq-sag_chunk-{HWS,BWS,LWS}_T2w.nii.gz``,
    ``derivatives/reference/...`` (``_mod-T2w_seg-spine_msk``, ``_seg-vert_msk``,
    ``_desc-bias_T2w``), ``cohort.tsv`` (written last), ``snapshots/*.png``.
    An existing ``cohort.tsv`` keeps its batches (see `cohort.assign_batches`). With `motion_mm` or
    `motion_deg`, each station is moved by its own rigid `station_motion` (the patient moved between stations).
    With `failures` (a fraction), each station has that chance of an injected acquisition failure (`FAILURES`,
    kind and severity drawn per station); ``injected_failures.tsv`` lists every image's (none, 0 if clean).
    With `ribs`, the images show the subjects' ribs (`make_subject`'s rates). ``truth.tsv`` names every subject's
    column (`column_truth`). Returns the manifest path.
    """
    import pandas as pd

    from . import cohort, io, qc

    if subjects < 1:
        raise ValueError(f"number of subjects must be at least 1, got {subjects}")
    if first_index < 0:
        raise ValueError(f"first subject index must be non-negative, got {first_index}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if anomaly not in (*ANOMALIES, "random", "mixed"):
        raise ValueError(f"unknown anomaly {anomaly!r}; expected one of {', '.join(ANOMALIES)}, random or mixed")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"output folder {out} is not writable")
    for name, rate in (("failure fraction", failures), ("rudimentary 12th rib rate", rudimentary_t12), ("lumbar rib rate", lumbar_ribs)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {rate}")
    raw, ref = out / "rawdata", out / "derivatives" / "reference"
    injected: list[dict[str, object]] = []
    truth: list[dict[str, object]] = []
    for index in range(first_index, first_index + subjects):
        subject = make_subject(seed, index, anomaly=anomaly, rudimentary_t12=rudimentary_t12, lumbar_ribs=lumbar_ribs)
        truth.append({"subject": f"phantom{index:04d}", **column_truth(subject, ribs)})
        for region in L.REGIONS:
            ph = render_station(subject, region, PRESETS[preset], seed=seed, index=index, ribs=ribs)
            if motion_mm or motion_deg:
                rng = np.random.default_rng([seed, index, 10 + L.REGIONS.index(region)])
                moved = station_motion(ph.image.shape, ph.affine, shift_mm=motion_mm, rotation_deg=motion_deg, rng=rng)
                ph = dataclasses.replace(ph, affine=moved @ ph.affine)
            stem = station_stem(index, region)
            rng = np.random.default_rng([seed, index, 20 + L.REGIONS.index(region)])
            kind, severity = ("none", 0.0)
            if rng.uniform() < failures:
                kind, severity = str(rng.choice(list(FAILURES))), float(rng.uniform(0.05, 1.0))
                ph = dataclasses.replace(ph, image=inject_failure(ph.image, PRESETS[preset].spacing, kind, severity, rng))
            injected.append({"image_id": stem, "failure": kind, "severity": round(severity, 4)})
            anat = Path(f"sub-phantom{index:04d}") / "anat"
            io.save_nifti(raw / anat / f"{stem}_T2w.nii.gz", ph.image, ph.affine, dtype=np.float32)
            io.save_nifti(ref / anat / f"{stem}_mod-T2w_seg-spine_msk.nii.gz", ph.semantic, ph.affine, dtype=np.uint8)
            io.save_nifti(ref / anat / f"{stem}_mod-T2w_seg-vert_msk.nii.gz", ph.instance, ph.affine, dtype=np.uint16)
            io.save_nifti(ref / anat / f"{stem}_desc-bias_T2w.nii.gz", ph.bias, ph.affine, dtype=np.float32)
            if snapshot:
                qc.snapshot_png(out / "snapshots" / f"{stem}_snapshot.png", ph.image, ph.semantic, ph.instance, ph.affine,
                                title=f"{stem} ({region}, preset {preset}, seed {seed})")
    if failures:
        io.write_tsv(out / FAILURES_FILE, pd.DataFrame(injected))
    io.write_tsv(out / TRUTH_FILE, _merge_truth(out / TRUTH_FILE, pd.DataFrame(truth)))
    manifest_path = out / "cohort.tsv"
    rows = cohort.manifest_from_bids(raw, references=ref)
    previous = cohort.read_manifest(manifest_path) if manifest_path.is_file() else None
    table = cohort.assign_batches(cohort.relative_paths(rows, out), batch_size=batch_size, previous=previous)
    io.write_tsv(manifest_path, cohort.check_manifest(table, source=str(manifest_path)))
    return manifest_path
