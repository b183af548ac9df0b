"""One labelling per subject: the labelling model's posteriors of a subject's linked stations searched as one column.

A subject's stations overlap, and `subject_levels` links them (which vertebra of one station is which of the next).
Each linked component becomes one column of nodes, top first:

- a vertebra two stations share is one node; its posteriors are the mean of both views, each weighted by how whole
  the model saw it (its FULLYVISIBLE head): a vertebra cut by one station's border is a poor view of it there;
- a vertebra no view names (no corpus in its cutout, or a station the model did not run on) is a node of flat
  posteriors: its neighbours place it;
- the stations' own anchors are constraints: a cervical station's C2 (the dens, `instances`) is class C2, and a
  lumbar station's last vertebra, the one on the sacrum, ends the lumbar spine (L5; L6 where the column has six).

`label_search.search_states` then names every node at once, so C2, the sacrum and each station's rib evidence constrain
every level (SPINEPS's model sees one station at a time). Unlinked stations are components of one, labelled alone
with their own anchor. A station's margin is how much more the cheapest path that names any of its vertebrae
otherwise costs: 0 is a tie, the evidence does not decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from . import labels as L
from .label_search import Moves, axis_of, canonical_heads, class_names, ids_from_states, scores, search_states
from .labeling import Posteriors, level_above, level_span
from .subject_levels import Station, SubjectLevels

CUT_VIEW_WEIGHT: Final = 0.05  # a view the model calls cut still counts, a little (two cut views: their mean)
# A column without both anchors (C2 and the sacrum) has no count to tell a T13 from a T12, an L6 from an L5: there, a
# station whose margin is below this is counted, not named (config labeling_model.min_margin). Calibrated on the demo
# labelling model: the smallest margin above every contradicted claim of an unanchored column, alone or linked, in
# 40 phantom subjects (seed 501; docs/labeling.md). Another model needs its own.
MIN_MARGIN: Final = 0.55


@dataclass(frozen=True)
class ColumnLabels:
    """A component's answer: per station its vertebrae's ids (top first) and margin; the column's facts."""

    ids: dict[str, list[int]]
    margins: dict[str, float]
    above: dict[str, int]  # per station the id above its top vertebra (its top IVD and endplate carry it)
    column: list[int]  # every node's id, top first
    anchored: bool  # C2 and the sacrum both in the column: its count is the subject's
    cost: float

    def undecided(self, image_id: str, min_margin: float = MIN_MARGIN) -> bool:
        """Does the evidence leave this station's levels open (no count from C2 to the sacrum, a small margin)?"""
        return not self.anchored and self.margins[image_id] < min_margin


def combine(views: Sequence[dict[str, NDArray[np.float64]]], heads: dict[str, int]) -> dict[str, NDArray[np.float64]]:
    """One node's posteriors from its views (module doc); flat where there is no view."""
    if not views:
        return {h: np.full(k, 1.0 / k) for h, k in heads.items()}
    whole = np.array([v["FULLYVISIBLE"][1] if "FULLYVISIBLE" in v else 1.0 for v in views])
    weights = np.maximum(whole, CUT_VIEW_WEIGHT)
    out = {h: sum(w * v[h] for w, v in zip(weights, views)) / weights.sum() for h in heads if h != "FULLYVISIBLE"}
    if "FULLYVISIBLE" in heads:  # seen whole by any station is whole
        out["FULLYVISIBLE"] = np.array([1 - whole.max(), whole.max()])
    return out


def label_column(members: Sequence[Station], positions: dict[str, int], posteriors: dict[str, Posteriors], *,
                 enforce_12_thoracic: bool = False) -> ColumnLabels | None:
    """The joint labelling of one linked component (`positions`: each station's first vertebra in the column), or
    None where no station of it has posteriors or no path fits its constraints."""
    views = [posteriors[s.image_id] for s in members if s.image_id in posteriors]
    if not views:
        return None
    heads = {h: len(p) for h, p in canonical_heads(next(iter(views[0].values()))).items()}
    axis = axis_of({h: np.zeros((1, k)) for h, k in heads.items()})
    first = min(positions[s.image_id] for s in members)
    size = max(positions[s.image_id] + len(s) for s in members) - first
    seen: list[list[dict[str, NDArray[np.float64]]]] = [[] for _ in range(size)]
    blocked: set[tuple[int, int, int]] = set()
    last = None
    for s in members:
        mine = posteriors.get(s.image_id, {})
        for j, vertebra in enumerate(s.ids):
            node = positions[s.image_id] - first + j
            if vertebra in mine:
                seen[node].append(canonical_heads(mine[vertebra]))
            if s.mode == "C2" and vertebra == L.VERTEBRA_IDS["C2"]:
                blocked |= {(node, c, run) for c in range(axis) for run in (0, 1) if c != class_names(axis).index("C2")}
        if s.mode == "sacrum" and positions[s.image_id] - first + len(s) == size:
            last = {class_names(axis).index("L5")} | ({class_names(axis).index("L6")} if axis == 26 else set())
    nodes = [combine(v, heads) for v in seen]
    table = scores({h: np.stack([n[h] for n in nodes]) for h in heads})
    # Without a C2 the column may start below T12, so its top may be a T13 or L6.
    moves = Moves(axis, enforce_12_thoracic=enforce_12_thoracic, open_top=not blocked)
    try:
        path, cost = search_states(table, moves, last=last, blocked=blocked)
    except ValueError:
        return None
    ids = ids_from_states(path, axis)
    # Per node, the cost of the cheapest path that names it otherwise: once, though shared nodes serve two stations.
    otherwise = [_cost_without(table, moves, last, blocked, state) - cost for state in path]
    out_ids, margins, above = {}, {}, {}
    for s in members:
        start = positions[s.image_id] - first
        out_ids[s.image_id] = ids[start : start + len(s)]
        above[s.image_id] = ids[start - 1] if start > 0 else level_above(ids[start])
        margins[s.image_id] = min(otherwise[start : start + len(s)], default=float("inf"))
    anchored = bool(blocked) and last is not None
    return ColumnLabels(out_ids, margins, above, ids, anchored, cost)


def _cost_without(table, moves: Moves, last, blocked: set, state: tuple[int, int, int]) -> float:
    try:
        return search_states(table, moves, last=last, blocked=blocked | {state})[1]
    except ValueError:  # no other path: nothing else fits the anchors
        return float("inf")


def column_facts(ids: Sequence[int]) -> tuple[int, int, str]:
    """(thoracic, lumbar, what is unusual) of a column's ids from C2 to the sacrum."""
    thoracic = sum(L.VERTEBRA_NAMES[k].startswith("T") for k in ids)
    lumbar = sum(L.VERTEBRA_NAMES[k].startswith("L") for k in ids)
    unusual = ", ".join(filter(None, ["T13" if L.VERTEBRA_IDS["T13"] in ids else "", "L6" if L.VERTEBRA_IDS["L6"] in ids else "",
                                      f"{thoracic} thoracic" if thoracic < 12 else ""]))  # fmt: skip
    return thoracic, lumbar, unusual


def apply_joint(result: SubjectLevels, stations: Sequence[Station], posteriors: dict[str, Posteriors], *,
                enforce_12_thoracic: bool = False, min_margin: float = MIN_MARGIN) -> None:
    """Put one labelling per linked component into `result` (see the module doc). Where the model's column differs
    from what the links and anchors alone gave, the model's ids stand and the station's reason says so with both."""
    by_id = {s.image_id: s for s in stations}
    stitched: list[str] = []
    for component in result.components:
        members = [by_id[i] for i in component if i in by_id]
        column = label_column(members, component, posteriors, enforce_12_thoracic=enforce_12_thoracic)
        if column is None:
            continue
        for s in members:
            result.margins[s.image_id] = column.margins[s.image_id]
            if column.undecided(s.image_id, min_margin):  # counted: a count claims no level
                result.maps[s.image_id] = s.count_map()
                result.modes[s.image_id], result.levels[s.image_id] = "count", list(range(2, len(s) + 2))
                result.reasons[s.image_id] = (f"the labelling model's column has no count from C2 to the sacrum and its levels here are not "
                                              f"clear (margin {column.margins[s.image_id]:.2f} < {min_margin:g}): counted")  # fmt: skip
                continue
            before, after, mode = result.levels[s.image_id], column.ids[s.image_id], result.modes[s.image_id]
            result.reasons[s.image_id] = (f"labelling model {level_span(after)} and {mode} numbering {level_span(before)} differ: the model's ids stand"
                                          if mode != "count" and before != after else "")  # fmt: skip
            result.maps[s.image_id] = {s.before_top: column.above[s.image_id], **dict(zip(s.ids, after))}
            result.modes[s.image_id], result.levels[s.image_id] = "model", after
        if column.anchored:
            result.vertebrae = len(column.column)
            result.thoracic, result.lumbar, unusual = column_facts(column.column)
            result.note = f"{result.vertebrae} vertebrae from C2 to the sacrum" + (f": {unusual} (labelling model)" if unusual else "")
        named = [s.image_id for s in members if result.modes[s.image_id] == "model"]
        if len(named) > 1 and len(named) > len(stitched):
            stitched = named
    if stitched:
        top = result.shifts[stitched[0]]
        result.whole_spine = {i: result.shifts[i] - top for i in stitched}
    else:  # what the links alone joined, less what is now counted: a stitch never mixes counts with levels
        kept = {i: v for i, v in result.whole_spine.items() if result.modes[i] != "count"}
        result.whole_spine = kept if len(kept) > 1 else {}


