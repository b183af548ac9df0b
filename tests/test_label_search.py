"""The labeling phase's path search (issue 38): SPINEPS's scores, and a minimum that is exact.

Posteriors are constructed from a known column: each vertebra's heads put most of their mass on its true class.
Exactness is checked against brute force over every path SPINEPS's moves allow.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from spinecohort.label_search import (
    GROUP_SIZES,
    Moves,
    class_names,
    ids_from_path,
    ids_from_states,
    path_cost,
    scores,
    search,
    search_states,
    states,
)
from spinecohort.labels import VERTEBRA_IDS

EXACT_NAMES = class_names(26)


def peaked(index: int, size: int, mass: float) -> np.ndarray:
    p = np.full(size, (1 - mass) / (size - 1))
    p[index] = mass
    return p


def posteriors(
    column: list[str], *, mass: float = 0.8, cut: tuple[int, ...] = (), heads: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """Heads of a model that sees `column` (names top first) well: each vertebra's true class gets `mass`."""
    heads = heads or ("REGION", "VERT", "VERTEX", "VERTREL", "VERTGRP", "VERTT13", "FULLYVISIBLE")
    rows: dict[str, list[np.ndarray]] = {h: [] for h in heads}
    for i, name in enumerate(column):
        exact = EXACT_NAMES.index(name)
        folded = {"T13": "T12", "L6": "L5"}.get(name, name)
        vert = class_names(24).index(folded)
        region = "CTL".index(name[0])
        group = int(np.searchsorted(np.cumsum(GROUP_SIZES), vert, side="right"))
        starts = name in ("T1", "L1")
        last = i + 1 < len(column) and "CTL".index(column[i + 1][0]) > region
        rel = 0 if not (starts or last) else {("C", True): 1, ("T", False): 2, ("T", True): 3, ("L", False): 4}[(name[0], last)]
        values = {"REGION": peaked(region, 3, mass), "VERT": peaked(vert, 24, mass), "VERTEX": peaked(exact, 26, mass),
                  "VERTREL": peaked(rel, 6, mass), "VERTGRP": peaked(group, 12, mass),
                  "VERTT13": peaked(int(name == "T13"), 2, mass), "FULLYVISIBLE": peaked(int(i not in cut), 2, mass)}  # fmt: skip
        for h in heads:
            rows[h].append(values[h])
    return {h: np.array(v) for h, v in rows.items()}


def levels(column: list[str], moves: Moves | None = None, **kwargs) -> list[str]:
    s = scores(posteriors(column, **kwargs))
    path, _ = search(s, moves or Moves(s.axis))
    names = {v: k for k, v in VERTEBRA_IDS.items()}
    return [names[i] for i in ids_from_path(path, s.axis)]


def names(first: str, last: str, *, thoracic: int = 12, lumbar: int = 5) -> list[str]:
    full = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, thoracic + 1)] + [f"L{i}" for i in range(1, lumbar + 1)]
    return full[full.index(first) : full.index(last) + 1]


@pytest.mark.parametrize(
    "column",
    [names("C2", "T3"), names("T2", "L1"), names("T9", "L5"), names("T8", "L6", lumbar=6), names("T5", "L3", thoracic=13),
     names("T4", "L5", thoracic=11), names("C2", "L5")],
    ids=["cervical", "thoracic", "lumbar", "L6", "T13", "11 thoracic", "whole spine"],
)  # fmt: skip
def test_a_well_seen_column_is_named_as_it_is(column):
    assert levels(column) == column


def test_the_26_class_head_names_t13_and_l6_by_itself():
    column = names("T7", "L6", thoracic=13, lumbar=6)
    assert levels(column, heads=("REGION", "VERTEX", "VERTREL", "FULLYVISIBLE")) == column


def test_enforcing_12_thoracic_forbids_t13_on_both_axes():
    column = names("T7", "L3", thoracic=13)
    for heads in [(), ("REGION", "VERTEX", "VERTREL")]:
        s = scores(posteriors(column, heads=heads))
        named = ids_from_path(search(s, Moves(s.axis, enforce_12_thoracic=True))[0], s.axis)
        assert VERTEBRA_IDS["T13"] not in named
        normal = [VERTEBRA_IDS[n] for n in names("C1", "L5")]
        start = normal.index(named[0])
        assert named == normal[start : start + len(column)]  # the extra vertebra shifts the column instead


def test_cut_end_vertebrae_count_less_and_the_column_still_reads_right():
    column = names("T10", "L5")
    cut = posteriors(column, cut=(0, len(column) - 1))
    whole = posteriors(column)
    assert scores(cut).score[0].max() < scores(whole).score[0].max()
    assert scores(cut).score[len(column) // 2].max() == pytest.approx(scores(whole).score[len(column) // 2].max())
    assert levels(column, cut=(0, len(column) - 1)) == column


def all_paths(n: int, moves: Moves) -> list[list[int]]:
    """Every class path of n vertebrae SPINEPS's moves allow (brute force)."""
    out: list[list[int]] = []

    def walk(path: list[int]) -> None:
        if len(path) == n:
            out.append(path)
            return
        c = path[-1]
        nexts = moves.successors(c) + ([c] if moves.repeatable(c) and (len(path) < 2 or path[-2] != c) else [])
        for d in nexts:
            walk([*path, d])

    for c in range(moves.axis):
        if moves.allowed(c):
            walk([c])
    return out


@pytest.mark.parametrize("axis_heads", [(), ("REGION", "VERTEX", "VERTREL", "FULLYVISIBLE")], ids=["24", "26"])
@pytest.mark.parametrize("enforce", [False, True])
def test_the_search_finds_the_minimum_that_brute_force_finds(axis_heads, enforce):
    rng = np.random.default_rng(7)
    for _ in range(40):
        n = int(rng.integers(3, 7))
        first = int(rng.integers(14, 20))  # around the thoracolumbar junction, where the moves branch
        column = EXACT_NAMES[first : first + n]
        p = posteriors(column, mass=0.4, heads=axis_heads)
        p = {h: v * rng.uniform(0.2, 1.0, v.shape) for h, v in p.items()}  # noisy, disagreeing heads
        s = scores(p)
        moves = Moves(s.axis, enforce_12_thoracic=enforce)
        path, cost = search(s, moves)
        costs = [path_cost(s, q) for q in all_paths(n, moves)]
        assert cost == pytest.approx(min(costs), abs=1e-12)
        assert path_cost(s, path) == pytest.approx(cost, abs=1e-12)


@pytest.mark.parametrize("axis_heads", [(), ("REGION", "VERTEX", "VERTREL", "FULLYVISIBLE")], ids=["24", "26"])
def test_the_joint_searchs_constraints_give_the_minimum_of_the_paths_that_keep_them(axis_heads):
    """`last` (the vertebra on the sacrum ends the lumbar spine) and `blocked` states (an anchor, a margin's
    alternative): the search's cost is brute force's minimum over the allowed paths that keep both."""
    rng = np.random.default_rng(11)
    for _ in range(40):
        n = int(rng.integers(3, 7))
        first = int(rng.integers(14, 20))
        p = posteriors(EXACT_NAMES[first : first + n], mass=0.4, heads=axis_heads)
        s = scores({h: v * rng.uniform(0.2, 1.0, v.shape) for h, v in p.items()})
        moves = Moves(s.axis)
        best, _ = search_states(s, moves)
        last = {class_names(s.axis).index("L5")}
        blocked = {best[int(rng.integers(n))]}
        kept = [q for q in all_paths(n, moves) if q[-1] in last and not blocked & set(states(q))]
        if not kept:
            continue
        found, cost = search_states(s, moves, last=last, blocked=blocked)
        assert cost == pytest.approx(min(path_cost(s, q) for q in kept), abs=1e-12)
        assert found[-1][1] in last and not blocked & set(found)


def test_an_open_top_lets_a_station_that_starts_below_t12_name_its_t13():
    """A lumbar field whose top vertebra is a T13 (its T12 above the field): SPINEPS's moves can only call it T12;
    with `open_top` the T13 head names it, and its ids run T13, L1 ... L5."""
    column = ["T13", "L1", "L2", "L3", "L4", "L5"]
    s = scores(posteriors(column, heads=("REGION", "VERT", "VERTREL", "VERTT13", "FULLYVISIBLE")))
    closed = ids_from_path(search(s, Moves(24))[0], 24)
    opened = ids_from_states(search_states(s, Moves(24, open_top=True))[0], 24)
    assert [VERTEBRA_IDS[n] for n in column] == opened != closed
    assert closed[0] == VERTEBRA_IDS["T12"]


def test_three_vertebrae_that_look_like_t12_get_t12_t13_and_l1_at_most():
    """Upstream issue 50: SPINEPS's search gave three T12; the exact search repeats T12 once."""
    column = names("T9", "L2", thoracic=13)
    p = posteriors(column)
    t12 = class_names(24).index("T12")
    p["VERT"][column.index("L1")] = peaked(t12, 24, 0.8)  # L1 looks like a third T12
    s = scores(p)
    path, _ = search(s, Moves(24))
    assert path.count(t12) == 2
    named = ids_from_path(path, 24)
    assert [VERTEBRA_IDS[n] for n in ("T12", "T13")] == named[column.index("T12") : column.index("T12") + 2]
    assert min(path_cost(s, q) for q in all_paths(len(column), Moves(24))) == pytest.approx(path_cost(s, path))


def test_a_t13_head_under_its_training_name_is_read():
    column = names("T9", "L2", thoracic=13)
    p = posteriors(column)
    renamed = {("VT13" if h == "VERTT13" else h): v for h, v in p.items()}
    assert np.array_equal(scores(renamed).t13_bonus, scores(p).t13_bonus)
    assert scores(renamed).t13_bonus.max() > 0


def test_more_vertebrae_than_classes_is_a_clear_error():
    s = scores(posteriors(names("C2", "L5") * 2))
    with pytest.raises(ValueError, match="do not fit"):
        search(s, Moves(24))


def test_forcing_c2_names_the_vertebra_c2_and_the_next_c3():
    column = names("C2", "C6")
    p = posteriors(column)
    p["VERT"][:] = posteriors(names("C4", "T1"))["VERT"]  # the heads think it starts at C4
    p["REGION"][:] = posteriors(names("C4", "T1"))["REGION"]
    s = scores(p, force={0: 1})
    assert ids_from_path(search(s, Moves(24))[0], 24)[:2] == [2, 3]


def test_every_allowed_path_is_priced_in_one_way():
    """path_cost adds up the search's own terms: for one column, the best brute-force path equals the search's."""
    column = names("C5", "T2")
    s = scores(posteriors(column))
    paths = all_paths(len(column), Moves(24))
    best = min(paths, key=lambda q: path_cost(s, q))
    assert best == search(s, Moves(24))[0]
    assert len(paths) == len({tuple(q) for q in paths}) > 1
    assert list(itertools.islice(paths, 1))[0][0] == 1  # C2 is the first class a path may start at
