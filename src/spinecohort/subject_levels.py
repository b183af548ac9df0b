"""One numbering for a subject's stations: anatomical levels for the thoracic spine, transitional vertebrae.

A NAKO subject's three stations (cervical, thoracic, lumbar) are acquired in one session, in one
scanner frame, and overlap. Each station arrives numbered on its own (`instances.number_instances`:
from C2, from the sacrum, or a count). Here, per subject:

1. `station_vertebrae`: each station's vertebrae, top first, with their body centroids in world mm.
2. `link`: neighbouring stations share vertebrae. For every way of pairing them (an offset in the
   lists) the pairs' mean displacement is the patient's motion that pairing implies; the pairing
   that implies the least motion wins, if it is consistent (every pair near that displacement)
   and clearly less than the next (else the link is refused as ambiguous, never guessed). A
   one-level slip implies a motion of one vertebra's height (17-40 mm), so the choice is safe while
   the patient moved less than about half of that between two stations. Fields that share no vertebra
   compete as abutting pairings (`abutting_shift`: the column's step bridges the gap).
3. `label_subject`: ids along the column from C2 (position 0) for every station the links reach
   from an anchored cervical station. A link to an anchored lumbar station also counts the column
   from C2 to the sacrum: 23 is the common column (C2-C7, T1-T12, L1-L5), and every station gets
   its levels. 24 (T13 or L6) or 22 (T11 or L4) holds a transitional vertebra that the masks do not
   name (no rib is segmented): levels are claimed down to the last one it cannot move (T12 or T11),
   and the lumbar station, whose levels from the sacrum would be one off, is counted. Counting up
   from the sacrum alone would shift every level above a transitional vertebra: not done. Whatever
   is not claimed keeps or falls back to a count, with the reason. IVD 100+X and endplate 200+X
   follow their vertebra X.
4. The link's displacement, for stitching a whole-spine mask (`stitch`): `refined_shift`, from structures
   whole in both fields, else by matching the two masks; `SubjectLevels.whole_spine` names the stations
   that carry levels from one C2, each with the shift that undoes its motion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from . import labels as L

__all__ = ["Link", "Station", "SubjectLevels", "label_subject", "link", "relabel", "station_vertebrae"]

# Links: at least this many shared vertebrae; every pair within CONSISTENT_MM of the pairing's mean
# displacement; the winner's implied motion under MAX_MOTION_MM and MARGIN_MM below the runner-up's.
MIN_SHARED: Final = 1
CONSISTENT_MM: Final = 8.0
MAX_MOTION_MM: Final = 15.0
MARGIN_MM: Final = 6.0
# Fields that share no vertebra (a short overlap, a longer column) are paired too: the lower one's first vertebra right
# below the upper one's last, or one level further (a vertebra neither shows), by the column's step at that end.
ABUTTING_GAPS: Final = 2
# Vertebrae from C2 to the last one above the sacrum: the common column, and one with a transitional vertebra.
COMMON_COLUMN: Final = len(L.level_sequence(first="C2")) - 1
ORDER: Final[dict[str, int]] = {region: k for k, region in enumerate(L.REGIONS)}  # top to bottom


@dataclass(frozen=True)
class Station:
    """A station's vertebrae as numbering needs them; every array runs top first."""

    image_id: str
    region: str
    mode: str  # its own numbering: "C2", "sacrum" or "count"
    ids: tuple[int, ...]  # its vertebra ids (the sacrum aside)
    centres: NDArray[np.float64]  # (n, 3) body centroid, world mm
    whole: NDArray[np.bool_]  # (n,) the body does not touch the in-plane border: its centroid is sound
    before_top: int  # the id its IVD/endplate above the top vertebra carry (100+/200+ that)
    # The IVD below each vertebra, its centroid (world mm) where it does not touch the in-plane border, else NaN:
    # small and thin, the discs between shared vertebrae often lie whole in both fields where the bodies are cut.
    discs: NDArray[np.float64] | None = None
    mask: NDArray[np.integer] | None = None  # its instance mask, for `refined_shift` where no structure is whole in both
    affine: NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def count_map(self) -> dict[int, int]:
        """Its ids to a count from the top (the IVD above the top vertebra 101): positions, no level claimed."""
        return dict(zip((self.before_top, *self.ids), range(1, len(self) + 2)))


def station_vertebrae(instance: NDArray[np.integer], semantic: NDArray[np.integer], affine: NDArray[np.float64], *,
                      image_id: str, region: str, mode: str) -> Station:
    """The station's vertebrae from its restored instance and semantic masks (one grid), numbered in `mode`
    (`instances.number_instances`: ids ascend from the top, a count from 2)."""
    ids = [int(k) for k in np.unique(instance[L.vertebra_ids(instance)])]
    column = L.level_sequence()
    before_top = 1 if not ids else ids[0] - 1 if mode == "count" else column[max(column.index(ids[0]) - 1, 0)]
    slice_axis = int(np.argmax(np.linalg.norm(affine[:3, :3], axis=0)))

    def inside(box: tuple[slice, ...] | None) -> bool:  # clear of the in-plane border
        return box is not None and all(box[a].start > 0 and box[a].stop < instance.shape[a] for a in range(3) if a != slice_axis)

    top = max(ids, default=0)
    vertebrae = np.where(L.vertebra_ids(instance), instance, 0).astype(np.int32)
    boxes = ndimage.find_objects(np.where(semantic == L.CORPUS, vertebrae, 0), max_label=top)
    vertebra_boxes = ndimage.find_objects(vertebrae, max_label=top)
    centres, whole = [], []
    for k in ids:
        box = vertebra_boxes[k - 1]  # work inside the vertebra's box
        mine = instance[box] == k
        body = mine & (semantic[box] == L.CORPUS)
        voxels = np.argwhere(body if body.any() else mine) + [b.start for b in box]
        centres.append(affine[:3, :3] @ voxels.mean(axis=0) + affine[:3, 3])
        whole.append(inside(boxes[k - 1]))
    discs = np.full((len(ids), 3), np.nan)
    disc_boxes = ndimage.find_objects(np.where(L.ivd_ids(instance), instance - L.IVD_OFFSET, 0).astype(np.int32), max_label=top)
    for n, k in enumerate(ids):
        box = disc_boxes[k - 1]
        if inside(box):
            voxels = np.argwhere(instance[box] == L.IVD_OFFSET + k) + [b.start for b in box]
            discs[n] = affine[:3, :3] @ voxels.mean(axis=0) + affine[:3, 3]
    return Station(image_id, region, mode, tuple(ids), np.array(centres, float).reshape(-1, 3), np.array(whole, bool), before_top,
                   discs, instance, affine)


@dataclass(frozen=True)
class Link:
    """How a lower station's vertebrae continue an upper one's: lower[j] is upper[j + offset]."""

    offset: int | None  # None: no link (see reason)
    motion_mm: float = float("nan")  # the displacement of the lower station against the upper one (norm)
    reason: str = ""
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)  # that displacement, world mm (lower minus upper)


def link(upper: Station, lower: Station) -> Link:
    """The pairing of two stations' vertebrae that implies the least patient motion (see module doc)."""
    candidates: list[tuple[float, int, tuple[float, float, float], bool]] = []  # motion, offset, shift, from cut ones only
    for offset in range(1 - len(lower), len(upper)):
        j = np.arange(len(lower))
        j = j[(j + offset >= 0) & (j + offset < len(upper))]
        if len(j) < MIN_SHARED:
            continue
        sound = upper.whole[j + offset] & lower.whole[j]
        use = j[sound] if sound.sum() >= MIN_SHARED else j
        d = lower.centres[use] - upper.centres[use + offset]
        shift = d.mean(axis=0)
        if np.linalg.norm(d - shift, axis=1).max() <= CONSISTENT_MM:
            candidates.append((float(np.linalg.norm(shift)), offset, _triple(shift), sound.sum() < MIN_SHARED))
    for gap in range(ABUTTING_GAPS):  # fields that share no vertebra: the lower one's top follows `gap` levels below
        shift = abutting_shift(upper, lower, gap)
        if shift is not None:
            candidates.append((float(np.linalg.norm(shift)), len(upper) + gap, _triple(shift), False))
    name = f"{upper.region} and {lower.region}"
    if not candidates:
        return Link(None, reason=f"{name} share no {MIN_SHARED} vertebrae at one displacement")
    candidates.sort()
    # A vertebra cut by a field's border has its centroid pulled inwards, by up to half its height: where one of the
    # two best pairings rests on cut vertebrae alone, both are measured again from the structures themselves.
    refined = {}
    if any(c[3] for c in candidates[:2]):
        for _, offset, shift, _ in candidates[:2]:
            refined[offset] = refined_shift(upper, lower, offset, shift)
        candidates = sorted([(float(np.linalg.norm(refined[c[1]])), c[1], refined[c[1]], False) for c in candidates[:2]] + candidates[2:])
    motion, offset, shift, _ = candidates[0]
    if motion > MAX_MOTION_MM:
        return Link(None, reason=f"{name}: the best pairing implies {motion:.0f} mm of motion (over {MAX_MOTION_MM:.0f})")
    if len(candidates) > 1 and candidates[1][0] - motion < MARGIN_MM:
        return Link(None, reason=f"{name}: ambiguous, pairings imply {motion:.0f} and {candidates[1][0]:.0f} mm of motion")
    return Link(offset, motion, shift=refined[offset] if offset in refined else refined_shift(upper, lower, offset, shift))


def _triple(v: NDArray[np.float64]) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def abutting_shift(upper: Station, lower: Station, gap: int) -> NDArray[np.float64] | None:
    """The displacement (lower minus upper) implied if the lower field's first vertebra lies `gap` levels below the
    upper field's last one: the two ends' sound centroids, less the levels between them at the column's local step
    (the mean of the step each field shows at that end). None where a field shows fewer than two vertebrae."""
    if len(upper) < 2 or len(lower) < 2:
        return None
    i = _sound_end(upper.whole, last=True)
    j = _sound_end(lower.whole, last=False)
    step = ((upper.centres[i] - upper.centres[i - 1]) + (lower.centres[j + 1] - lower.centres[j])) / 2
    levels = (len(upper) - i) + gap + j  # from upper[i] down to lower[j]
    return lower.centres[j] - upper.centres[i] - levels * step


def _sound_end(whole: NDArray[np.bool_], *, last: bool) -> int:
    """The index of the field's end vertebra nearest the other field whose centroid is sound (not cut by the border),
    leaving one neighbour on the inner side to measure the step; the end itself where none is."""
    inner = range(len(whole) - 1, 0, -1) if last else range(len(whole) - 1)
    return next((k for k in inner if whole[k]), len(whole) - 1 if last else 0)


def refined_shift(upper: Station, lower: Station, offset: int, shift: tuple[float, float, float]) -> tuple[float, float, float]:
    """The displacement of a link, from the structures both fields show.

    The link's mean of centroid differences picks the pairing; as a displacement it is biased where a shared
    vertebra is cut by a station's border (its centroid pulled away from the cut), and neighbouring stations
    often share only cut vertebrae. Structures whole in both fields (vertebrae clear of both in-plane borders,
    the IVDs below shared vertebrae) give it unbiased. Where there are none, the masks are matched: the shift
    near the link's estimate under which most of the upper station's shared-structure voxels that fall in the
    lower field carry the same structure there (`match_shift`).
    """
    j = np.arange(max(0, -offset), min(len(lower), len(upper) - offset))
    if not len(j):  # abutting fields: nothing to refine it by
        return shift
    moves = (lower.centres[j] - upper.centres[j + offset])[upper.whole[j + offset] & lower.whole[j]]
    if upper.discs is not None and lower.discs is not None:
        moves = np.concatenate([moves, lower.discs[j] - upper.discs[j + offset]])
    moves = moves[np.isfinite(moves).all(axis=1)]
    if len(moves):
        estimate = moves.mean(axis=0)
    elif upper.mask is not None and lower.mask is not None and upper.affine is not None and lower.affine is not None:
        pairs = {upper.ids[i + offset]: lower.ids[i] for i in j}
        pairs |= {L.IVD_OFFSET + a: L.IVD_OFFSET + b for a, b in pairs.items()}
        estimate = match_shift(upper.mask, upper.affine, lower.mask, lower.affine, pairs, np.array(shift))
    else:
        return shift
    return _triple(estimate)


# match_shift's search, coarse to fine: per stage a cube of that radius (mm) about the last best, in that step (mm),
# trying that many voxels of each field's shared structures (evenly thinned). 15 mm: a cut vertebra's centroid, where
# the start comes from, is pulled inwards by up to half a body's height.
SEARCH_STAGES: Final = ((15.0, 5.0, 500), (5.0, 1.25, 1_000), (1.25, 0.5, 2_000))


def match_shift(upper: NDArray[np.integer], upper_affine: NDArray[np.float64], lower: NDArray[np.integer],
                lower_affine: NDArray[np.float64], pairs: dict[int, int], start: NDArray[np.float64]) -> NDArray[np.float64]:
    """The world shift (lower minus upper) near `start` under which the most voxels of the structures in `pairs`
    (upper id -> lower id) that land in the other field meet their own structure there (nearest voxel), counted both
    ways; ties go to the shift nearest `start`. Both ways, because a structure cut by one field's border fits inside
    its whole self over a range of shifts (the start's side wins the tie), while the whole one lands on the cut one's
    field without a miss only where it truly lies."""
    ways = [w for w in (_landings(upper, upper_affine, lower, lower_affine, pairs, 1.0),
                        _landings(lower, lower_affine, upper, upper_affine, {b: a for a, b in pairs.items()}, -1.0)) if w]  # fmt: skip
    if not ways:
        return start

    def best(centre: NDArray[np.float64], radius: float, step: float, points: int) -> NDArray[np.float64]:
        axis = np.arange(-radius, radius + step / 2, step)
        candidates = centre + np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
        met, landed = np.sum([way(candidates, points) for way in ways], axis=0)
        score = met / np.maximum(landed, 1)
        top = np.flatnonzero(score >= score.max() - 1e-9)
        return candidates[top[np.argmin(np.linalg.norm(candidates[top] - start, axis=1))]]

    found = start
    for radius, step, points in SEARCH_STAGES:
        found = best(found, radius, step, points)
    return found


def _landings(source: NDArray[np.integer], source_affine: NDArray[np.float64], target: NDArray[np.integer],
              target_affine: NDArray[np.float64], pairs: dict[int, int], sign: float) -> Callable[[NDArray[np.float64], int], NDArray[np.int64]] | None:
    """None where `source` holds none of `pairs`; else a function of (shifts (k, 3) world mm, points) giving per shift
    how many of `points` evenly thinned source voxels of those structures, moved by sign * shift, land in the target
    field on their paired structure, and how many land in the field at all."""
    voxels = np.argwhere(np.isin(source, list(pairs)))
    if not len(voxels):
        return None
    lut = np.zeros(max(max(pairs), int(source.max())) + 1, np.int64)
    lut[list(pairs)] = list(pairs.values())
    inverse = np.linalg.inv(target_affine)
    to_target = inverse[:3, :3] @ source_affine[:3, :3]  # source voxel -> target voxel, before the shift
    origin = inverse[:3, :3] @ source_affine[:3, 3] + inverse[:3, 3]
    shape, flat = np.asarray(target.shape), target.ravel()

    def count(shifts: NDArray[np.float64], points: int) -> NDArray[np.int64]:
        tried = voxels[:: max(1, len(voxels) // points)]
        wanted = lut[source[tuple(tried.T)]]
        moved = (tried @ to_target.T + origin).astype(np.float32)[None] + (sign * shifts @ inverse[:3, :3].T).astype(np.float32)[:, None]
        index = np.rint(moved).astype(np.int32)
        inside = ((index >= 0) & (index < shape)).all(axis=2)
        found = flat[np.ravel_multi_index(tuple(np.moveaxis(np.where(inside[..., None], index, 0), 2, 0)), target.shape)]
        return np.stack([((found == wanted) & inside).sum(axis=1), inside.sum(axis=1)])

    return count


@dataclass
class SubjectLevels:
    """The result for one subject: per station the id map (station id -> subject id) and how it was numbered."""

    maps: dict[str, dict[int, int]] = field(default_factory=dict)  # image_id -> {station id: new id}; absent: unchanged
    modes: dict[str, str] = field(default_factory=dict)  # image_id -> "subject", or its own mode
    reasons: dict[str, str] = field(default_factory=dict)  # image_id -> why it kept its own numbering ('' when not)
    levels: dict[str, list[int]] = field(default_factory=dict)  # image_id -> its vertebra ids as finally numbered, top first
    links: dict[str, Link] = field(default_factory=dict)  # "cervical-thoracic" -> Link
    vertebrae: int | None = None  # C2 to the last presacral vertebra, when both anchors chain
    thoracic: int | None = None
    lumbar: int | None = None
    note: str = ""
    # The stations that carry levels from one C2 anchor (two or more), each with the world shift that undoes
    # the patient's motion against the top one: what `stitch` joins into one whole-spine mask.
    whole_spine: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    # The linked components, top first: per station its first vertebra's position in the component's column (the
    # component's first station's first vertebra is 0); and per station the world shift that undoes its motion
    # against its component's first station. Every station is in one (alone where nothing links it).
    components: list[dict[str, int]] = field(default_factory=list)
    shifts: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    margins: dict[str, float] = field(default_factory=dict)  # image_id -> the labelling search's margin (`joint_labeling`)


def label_subject(stations: Sequence[Station]) -> SubjectLevels:
    """Subject-level ids for a subject's stations (one session); see the module doc."""
    out = SubjectLevels(modes={s.image_id: s.mode for s in stations}, reasons={s.image_id: "" for s in stations})
    chain = sorted(stations, key=lambda s: ORDER[s.region])
    if len({s.region for s in chain}) != len(chain):
        out.note = "two stations of one region: not linked"
    elif len(chain) > 1:
        _number_chain(out, chain)
    if not out.components:
        out.components = [{s.image_id: 0} for s in chain]
        out.shifts = {s.image_id: np.zeros(3) for s in chain}
    out.levels = {s.image_id: [out.maps.get(s.image_id, {}).get(k, k) for k in s.ids] for s in chain}
    return out


def _number_chain(out: SubjectLevels, chain: list[Station]) -> None:
    """Link neighbouring stations (top to bottom), then number each linked component."""
    # Linked stations form components; per component, each station's first vertebra's position
    # relative to the component's first station's first vertebra.
    components: list[dict[str, int]] = [{chain[0].image_id: 0}]
    shifts = {chain[0].image_id: np.zeros(3)}  # undoes each station's motion against its component's first
    for upper, lower in zip(chain, chain[1:]):
        missing = L.REGIONS[ORDER[upper.region] + 1 : ORDER[lower.region]]
        found = Link(None, reason=f"no {missing[0]} station") if missing else link(upper, lower)
        out.links[f"{upper.region}-{lower.region}"] = found
        if found.offset is None:
            components.append({lower.image_id: 0})
            shifts[lower.image_id] = np.zeros(3)
        else:
            components[-1][lower.image_id] = components[-1][upper.image_id] + found.offset
            shifts[lower.image_id] = shifts[upper.image_id] - np.array(found.shift)
    out.components, out.shifts = components, shifts
    by_id = {s.image_id: s for s in chain}
    for comp in components:
        members = [by_id[i] for i in comp]
        top = next((s for s in members if s.mode == "C2"), None)
        bottom = next((s for s in members if s.mode == "sacrum"), None)
        if top is None:
            for s in members:
                if s.mode == "count":
                    unlinked = _unlinked_reason(s, out.links)
                    out.reasons[s.image_id] = (unlinked if len(members) == 1 else
                                               f"only the sacrum links to it, and a transitional vertebra would shift every level above ({unlinked})"
                                               if bottom else f"no anchored station links to it ({unlinked})")
            continue
        _number_from_c2(out, members, comp, top, bottom)
        joined = [s.image_id for s in members if s is top or out.modes[s.image_id] == "subject"]
        if len(joined) > 1:
            out.whole_spine = {i: shifts[i] - shifts[top.image_id] for i in joined}


def _number_from_c2(out: SubjectLevels, members: list[Station], comp: dict[str, int], top: Station, bottom: Station | None) -> None:
    """Ids along the common column from C2 for the linked stations, as far as the column's count allows."""
    first = -comp[top.image_id]  # C2 is position 0
    sequence = L.level_sequence(first="C2")[:-1]  # C2 ... L5
    last_sure = len(sequence) - 1
    if bottom is None:
        out.note = "counted down from C2 (no link to the sacrum): a transitional vertebra below T12 would not show"
    else:
        out.vertebrae = first + comp[bottom.image_id] + len(bottom)
        if out.vertebrae == COMMON_COLUMN:
            out.thoracic, out.lumbar = 12, 5
        else:
            one_off = abs(out.vertebrae - COMMON_COLUMN) == 1
            # Levels down to the last one no single transitional vertebra moves: T11 (T11 or L4), T12 (T13 or L6).
            last_sure = (sequence.index(L.VERTEBRA_IDS["T12"]) - (out.vertebrae < COMMON_COLUMN)) if one_off else -1
            kind = ("T13 or L6" if out.vertebrae > COMMON_COLUMN else "T11 or L4") if one_off else "more than one vertebra off"
            out.note = (f"{out.vertebrae} vertebrae from C2 to the sacrum, the common column has {COMMON_COLUMN}: {kind}"
                        + ("; not named, levels below it are not claimed" if one_off else ": a link or an anchor is wrong"))
    for s in members:
        start = first + comp[s.image_id]
        if s is top or (s is bottom and out.vertebrae is not None and last_sure < 0):
            continue  # keeps its own anchor
        if s is bottom and last_sure < len(sequence) - 1:  # the sacrum's levels assume the common column
            out.maps[s.image_id] = s.count_map()
            out.modes[s.image_id], out.reasons[s.image_id] = "count", out.note
            continue
        if start < 0 or start + len(s) - 1 > last_sure:
            out.reasons[s.image_id] = out.note or "its linked vertebrae fall outside C2 … L5"
            continue
        out.maps[s.image_id] = dict(zip((s.before_top, *s.ids), (sequence[p] if p >= 0 else L.VERTEBRA_IDS["C1"] for p in range(start - 1, start + len(s)))))
        out.modes[s.image_id] = "subject"


def _unlinked_reason(station: Station, links: dict[str, Link]) -> str:
    return "; ".join(f"{k}: {v.reason}" for k, v in links.items() if station.region in k.split("-") and v.offset is None)


def relabel(instance: NDArray[np.integer], mapping: dict[int, int]) -> NDArray[np.uint16]:
    """The instance mask with vertebra X -> mapping[X], IVD 100+X -> 100+mapping[X], endplate 200+X -> 200+mapping[X]."""
    lut = np.arange(max(int(instance.max()) + 1, L.ENDPLATE_OFFSET + L.IVD_OFFSET), dtype=np.uint16)
    for old, new in mapping.items():
        for offset in (0, L.IVD_OFFSET, L.ENDPLATE_OFFSET):
            lut[offset + old] = offset + new
    out = lut[instance]
    if unknown := L.unknown_ids(out, L.INSTANCE_MASK_IDS):  # a bug, never the image's fault
        raise AssertionError(f"instance ids outside the SPINEPS scheme: {unknown}")
    return out
