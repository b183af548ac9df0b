"""From a labeling model's per-vertebra posteriors to vertebra ids: SPINEPS 2.1.3's scores, an exact path search.

SPINEPS's labeling phase (VERIDAH) scores every (vertebra, class) pair from its heads and walks the column top
to bottom through the classes C1...L5 (24-class axis: T13 is a second T12, L6 a second L5) or C1...L6 (26-class
axis: T13 and L6 are classes of their own). `scores` builds SPINEPS's score matrix with its weights and
smoothing; `search` returns the path of truly least cost with SPINEPS's moves, by dynamic programming over
(vertebra, class, repeats so far). SPINEPS's own search is a memoised recursion that keeps one path per
(vertebra, class): it checks the repeat limit and adds the last-of-region bonus after it has chosen the next
step, so its answer can cost more than the minimum (upstream issue 50). Here both are part of the state and the
edge, so the minimum is exact. Two more upstream defects are fixed: enforcing 12 thoracic vertebrae on the
26-class axis forbids T13 (SPINEPS forces it), and a T13 head saved under its training name `VT13` is read.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
from scipy.ndimage import gaussian_filter1d

from spinecohort.labels import VERTEBRA_IDS

# Head names and class counts of a SPINEPS labeling model (its `group_2_n_channel`).
HEAD_SIZES: Final = {"REGION": 3, "VERT": 24, "VERTEX": 26, "VERTREL": 6, "VERTGRP": 12, "VERTT13": 2, "FULLYVISIBLE": 2}
HEAD_ALIASES: Final = {"VT13": "VERTT13", "VERTEXACT": "VERTEX"}  # training names SPINEPS's phase does not read

# SPINEPS's weights and smoothing (its `find_vert_path_from_predictions` defaults, which its phase uses).
WEIGHTS: Final = {"REGION": 1.1, "VERT": 0.9, "VERTGRP": 0.8, "VERTREL": 0.6, "VERTT13": 0.4, "visible": 0.5}
VERT_SIGMA: Final = 0.8  # Gaussian across neighbouring classes, within each region, radius 2
VISIBLE_SIGMA: Final = 0.8  # across neighbouring vertebrae, zero beyond the column's ends, radius 2
VERTREL_SIGMA: Final = 0.6  # across neighbouring vertebrae, radius 1
EPS: Final = 1e-8

Axis = Literal[24, 26]
# The first class of each region (cervical, thoracic, lumbar) on each axis.
REGION_STARTS: Final[dict[int, tuple[int, int, int]]] = {24: (0, 7, 19), 26: (0, 7, 20)}
T11, T12, T13_EXACT, L5 = 17, 18, 19, 23
C1, C2 = 0, 1
# VERTGRP's groups as 24-class members: C1-2, C3-5, C6-7, T1-2, T3-4, T5-7, T8-9, T10-11, T12, L1-2, L3-4, L5.
GROUP_SIZES: Final = (2, 3, 2, 2, 2, 3, 2, 2, 1, 2, 2, 1)
FORCED_SCORE: Final = 1e6  # a forced class (dens => C2) always wins, as in SPINEPS


def class_names(axis: Axis) -> list[str]:
    """The classes of an axis, top first."""
    thoracic = 13 if axis == 26 else 12
    lumbar = 6 if axis == 26 else 5
    return [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, thoracic + 1)] + [f"L{i}" for i in range(1, lumbar + 1)]


def canonical_heads(posteriors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Posteriors by SPINEPS's phase names (`VT13` -> `VERTT13`), each (vertebrae, classes) float64."""
    return {HEAD_ALIASES.get(name, name): np.asarray(p, dtype=np.float64) for name, p in posteriors.items()}


def axis_of(heads: dict[str, np.ndarray]) -> Axis:
    """26 when the model has a 26-class head and no 24-class one (as SPINEPS decides), else 24."""
    if not {"VERT", "VERTEX", "VERTGRP"} & heads.keys():
        raise ValueError(f"a labeling model needs a VERT, VERTEX or VERTGRP head; it has {sorted(heads)}")
    return 26 if "VERTEX" in heads and "VERT" not in heads else 24


def _regions(axis: Axis) -> list[slice]:
    s = REGION_STARTS[axis]
    return [slice(s[0], s[1]), slice(s[1], s[2]), slice(s[2], axis)]


def _smooth_normalise(values: np.ndarray, axis: Axis, sigma: float) -> np.ndarray:
    """Gaussian within each region across classes (edges repeated), then the row sums to 1."""
    out = values.copy()
    if sigma > 0:
        for s in _regions(axis):
            out[:, s] = gaussian_filter1d(out[:, s], sigma, axis=1, mode="nearest", radius=2)
    return out / (out.sum(axis=1, keepdims=True) + EPS)


def _fold_exact(vertex: np.ndarray) -> np.ndarray:
    """26 classes onto 24: T13 into T12, L6 into L5."""
    out = np.delete(vertex, [T13_EXACT, 25], axis=1)
    out[:, T12] += vertex[:, T13_EXACT]
    out[:, L5] += vertex[:, 25]
    return out


def _vertrel_columns(vertrel: np.ndarray) -> np.ndarray:
    """Each first/last-of-region column smoothed across vertebrae, then scaled so it sums to at most 1."""
    out = vertrel.copy()
    smooth = out.sum() > 0
    for i in range(1, out.shape[1]):
        if smooth:
            out[:, i] = gaussian_filter1d(out[:, i], VERTREL_SIGMA, mode="nearest", radius=1)
        total = out[:, i].sum() + EPS
        out[:, i] /= total if total > 1 else 1 + total
    return out


def visibility(fully_visible: np.ndarray | None, n: int) -> np.ndarray:
    """Per vertebra the factor its scores are multiplied by: cut vertebrae (and their neighbours) count less."""
    if fully_visible is None:
        chain = np.ones(n)
    else:
        chain = gaussian_filter1d(fully_visible[:, 1], VISIBLE_SIGMA, mode="constant", radius=2)
    chain = np.round(chain, 3)
    return np.clip(1 - (1 - chain) * WEIGHTS["visible"], 0, 1)


@dataclass(frozen=True)
class Scores:
    """What the search walks: per (vertebra, class) a score (higher is better) and per vertebra the bonuses."""

    axis: Axis
    score: np.ndarray  # (vertebrae, classes)
    region_bonus: np.ndarray  # (vertebrae, 6): [-, last C, first T, last T, first L, last L], >= 0
    t13_bonus: np.ndarray  # (vertebrae,): for a vertebra that repeats T12 (24-class axis), >= 0


def scores(posteriors: dict[str, np.ndarray], *, force: dict[int, int] | None = None) -> Scores:
    """SPINEPS 2.1.3's scores from head posteriors ({head: (vertebrae, classes)}); `force` {vertebra: class}."""
    heads = canonical_heads(posteriors)
    axis = axis_of(heads)
    n = len(next(iter(heads.values())))
    zeros = np.zeros((n, axis))
    total = zeros.copy()
    if axis == 26:
        total += WEIGHTS["VERT"] * _smooth_normalise(heads["VERTEX"], 26, VERT_SIGMA)
    else:
        if "VERT" in heads:
            total += WEIGHTS["VERT"] * _smooth_normalise(heads["VERT"], 24, VERT_SIGMA)
        if "VERTEX" in heads:
            total += WEIGHTS["VERT"] * _smooth_normalise(_fold_exact(heads["VERTEX"]), 24, VERT_SIGMA)
        if "VERTGRP" in heads:
            total += WEIGHTS["VERTGRP"] * _smooth_normalise(np.repeat(heads["VERTGRP"], GROUP_SIZES, axis=1), 24, VERT_SIGMA)
    if "REGION" in heads:
        sizes = np.diff([*REGION_STARTS[axis], axis])
        region = np.repeat(heads["REGION"], sizes, axis=1)
        total += WEIGHTS["REGION"] * region / (region.sum(axis=1, keepdims=True) + EPS)
    score = total / (total.sum(axis=1, keepdims=True) + EPS) * visibility(heads.get("FULLYVISIBLE"), n)[:, None]
    for vertebra, cls in (force or {}).items():
        score[vertebra] = 0.0
        score[vertebra, cls] = FORCED_SCORE
    region_bonus = WEIGHTS["VERTREL"] * _vertrel_columns(heads["VERTREL"]) if "VERTREL" in heads else np.zeros((n, 6))
    t13 = heads.get("VERTT13")
    t13_bonus = WEIGHTS["VERTT13"] * t13[:, 1] / (t13[:, 1].sum() + EPS) if t13 is not None else np.zeros(n)
    return Scores(axis, score, region_bonus, t13_bonus)


@dataclass(frozen=True)
class Moves:
    """Which class may follow which: SPINEPS's moves on an axis, with its `--enforce-12-thoracic` fixed."""

    axis: Axis
    enforce_12_thoracic: bool = False
    first_class: int = C2  # C1 only where the semantic model segments C1
    # The top vertebra may itself be a repeat (T13, L6 on the 24-class axis), its T12 or L5 above the field: a
    # station that starts below T12 cannot name its own T13 otherwise. SPINEPS's moves do not allow it.
    open_top: bool = False

    def repeatable(self, c: int) -> bool:
        """May a second vertebra take class `c` (24-class axis: T12 -> T13, L5 -> L6)?"""
        return self.axis == 24 and (c == L5 or (c == T12 and not self.enforce_12_thoracic))

    def allowed(self, c: int) -> bool:
        return self.first_class <= c < self.axis and not (self.axis == 26 and self.enforce_12_thoracic and c == T13_EXACT)

    def successors(self, c: int) -> list[int]:
        """The classes the next vertebra down may take after `c`, besides a repeat."""
        nxt = [c + 1]
        if self.axis == 24 and c == T11 and not self.enforce_12_thoracic:
            nxt.append(c + 2)  # 11 thoracic: T11 -> L1
        if self.axis == 26 and not self.enforce_12_thoracic and c in (T11, T12):
            nxt.append(REGION_STARTS[26][2])  # T12 and T13 are optional: T11 -> L1, T12 -> L1
        if self.axis == 26 and self.enforce_12_thoracic and c == T12:
            nxt = [REGION_STARTS[26][2]]
        return [d for d in nxt if self.allowed(d)]


def _region(c: int, axis: Axis) -> int:
    starts = REGION_STARTS[axis]
    return 2 if c >= starts[2] else 1 if c >= starts[1] else 0


def node_cost(s: Scores, r: int, c: int) -> float:
    """Cost of vertebra `r` taking class `c`: its negative score, less a first-of-region bonus."""
    region = _region(c, s.axis)
    first = s.region_bonus[r, 2 * region] if region > 0 and c == REGION_STARTS[s.axis][region] else 0.0
    return -s.score[r, c] - first


def edge_cost(s: Scores, r: int, c: int, d: int) -> float:
    """Cost of vertebra `r` at class `c` followed by vertebra r+1 at `d`: last-of-region and T13 bonuses."""
    cost = 0.0
    region = _region(c, s.axis)
    if _region(d, s.axis) > region:
        cost -= s.region_bonus[r, 2 * region + 1]
    if d == c == T12 and s.axis == 24:
        cost -= s.t13_bonus[r + 1]
    return cost


def path_cost(s: Scores, path: list[int]) -> float:
    """The total cost of a class path (one class per vertebra, top first), as SPINEPS defines it."""
    return sum(node_cost(s, r, c) for r, c in enumerate(path)) + sum(
        edge_cost(s, r, c, d) for r, (c, d) in enumerate(zip(path, path[1:]))
    )


State = tuple[int, int, int]  # (vertebra, class, run): run 1 is a repeated class (T13 or L6 on the 24-class axis)


def states(path: list[int]) -> list[State]:
    """The search states of a class path: (vertebra, class, run)."""
    return [(r, c, int(r > 0 and path[r - 1] == c)) for r, c in enumerate(path)]


def search(s: Scores, moves: Moves, *, last: Collection[int] | None = None, blocked: Collection[State] = ()) -> tuple[list[int], float]:
    """The class path of least cost (one class per vertebra, top first) and its cost (`search_states`)."""
    found, cost = search_states(s, moves, last=last, blocked=blocked)
    return [c for _, c, _ in found], cost


def search_states(s: Scores, moves: Moves, *, last: Collection[int] | None = None, blocked: Collection[State] = ()) -> tuple[list[State], float]:
    """The states of the path of least cost (one per vertebra, top first) and its cost.

    State (class, run): the vertebra's class and how many vertebrae in a row hold it (a repeat is allowed once).
    `last`: the classes the last vertebra may take (every one if None); `blocked`: states no path may pass.
    Ties go to the lower class, as in SPINEPS. Raises ValueError when no path fits (more vertebrae than classes).
    """
    n, k = s.score.shape
    inf = float("inf")
    best = np.full((n, k, 2), inf)
    back = np.zeros((n, k, 2, 2), dtype=int)
    closed = np.zeros((n, k, 2), dtype=bool)
    for state in blocked:
        closed[state] = True
    for c in range(k):
        if moves.allowed(c) and not closed[0, c, 0]:
            best[0, c, 0] = node_cost(s, 0, c)
        if moves.open_top and moves.allowed(c) and moves.repeatable(c) and not closed[0, c, 1]:
            best[0, c, 1] = node_cost(s, 0, c) - (s.t13_bonus[0] if c == T12 else 0.0)
    for r in range(n - 1):
        for c in range(k):
            for run in (0, 1):
                here = best[r, c, run]
                if here == inf:
                    continue
                steps = [(d, 0) for d in moves.successors(c)]
                if run == 0 and moves.repeatable(c):
                    steps.append((c, 1))
                for d, next_run in steps:
                    if closed[r + 1, d, next_run]:
                        continue
                    total = here + edge_cost(s, r, c, d) + node_cost(s, r + 1, d)
                    if total < best[r + 1, d, next_run]:
                        best[r + 1, d, next_run] = total
                        back[r + 1, d, next_run] = (c, run)
    final = best[-1] if last is None else np.where(np.isin(np.arange(k), list(last))[:, None], best[-1], inf)
    end = np.unravel_index(np.argmin(final), final.shape)
    cost = float(final[end])
    if cost == inf:
        raise ValueError(f"{n} vertebrae do not fit one column of {k} classes")
    c, run = int(end[0]), int(end[1])
    path = [(n - 1, c, run)]
    for r in range(n - 1, 0, -1):
        c, run = (int(v) for v in back[r, c, run])
        path.append((r - 1, c, run))
    return path[::-1], cost


def ids_from_path(path: list[int], axis: Axis) -> list[int]:
    """SPINEPS instance ids of a class path: a second T12 is T13 (28), a second L5 is L6 (25)."""
    return ids_from_states(states(path), axis)


def ids_from_states(path: list[State], axis: Axis) -> list[int]:
    """SPINEPS instance ids of a path's states: a repeated T12 is T13 (28), a repeated L5 is L6 (25)."""
    names = class_names(axis)
    return [VERTEBRA_IDS[{"T12": "T13", "L5": "L6"}[names[c]] if run else names[c]] for _, c, run in path]
