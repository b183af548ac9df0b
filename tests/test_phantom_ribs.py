"""Ribs in the phantom (issue 39): an image feature only; thoracic vertebrae carry them, lumbar ones do not, the
13th thoracic a short pair, the 6th lumbar none, an 11-thoracic column 11 pairs."""

from __future__ import annotations

import numpy as np
import pytest

from spinecohort import labels as L
from spinecohort.phantom import PRESETS, _straighten, make_subject, render_station, rib_path, voxel_world

PRESET = PRESETS["small"]


def ribbed_levels(subject, region: str) -> tuple[set[str], set[str]]:
    """The levels whose rib head shows in the station's image (the image with ribs differs from the one without
    within 3 mm of the head), and the levels whose head lies in the field of view at all."""
    with_ribs = render_station(subject, region, PRESET, seed=0, index=1, ribs=True)
    without = render_station(subject, region, PRESET, seed=0, index=1, ribs=False)
    assert (with_ribs.semantic == without.semantic).all() and (with_ribs.instance == without.instance).all()  # image only
    world = voxel_world(with_ribs.affine, with_ribs.image.shape)
    s, n = _straighten(subject, world[..., 1], world[..., 2])
    lft = np.abs(world[..., 0] - subject.midline_x)
    changed = with_ribs.image != without.image
    shown, in_view = set(), set()
    for v in subject.vertebrae[:-1]:
        head = rib_path(v, 10.0, 8.0, 10.0)[0]
        near = np.sqrt((s - head[0]) ** 2 + (n - head[1]) ** 2 + (lft - head[2]) ** 2) <= 3.0
        near[[0, -1]] = near[:, [0, -1]] = False  # a head on the border is not in view
        if near.any():
            in_view.add(L.VERTEBRA_NAMES[v.level])
            if (changed & near).any():
                shown.add(L.VERTEBRA_NAMES[v.level])
    return shown, in_view


@pytest.mark.parametrize("anomaly, region, rib, none", [
    ("none", "thoracic", "T10", ""), ("none", "lumbar", "T12", "L1"), ("t13", "lumbar", "T13", "L1"),
    ("l6", "lumbar", "", "L6"), ("t11", "lumbar", "T11", "L1"), ("none", "cervical", "T1", "C7"),
])  # fmt: skip
def test_thoracic_vertebrae_carry_ribs_and_lumbar_ones_none(anomaly: str, region: str, rib: str, none: str):
    subject = make_subject(0, 1, anomaly=anomaly)
    shown, in_view = ribbed_levels(subject, region)
    assert {rib, none} - {""} <= in_view, in_view
    assert shown == {name for name in in_view if name.startswith("T")}, (shown, in_view)
    assert rib in shown | {""} and none not in shown


def test_rib_pairs_name_each_column_and_the_rates_change_only_the_ribs():
    pairs = {a: dict(make_subject(0, 1, anomaly=a).ribs) for a in ("none", "t13", "t11", "l6")}
    names = {a: sorted(L.VERTEBRA_NAMES[k] for k in p) for a, p in pairs.items()}
    assert len(pairs["none"]) == 12 and len(pairs["t13"]) == 13 and len(pairs["t11"]) == 11 and len(pairs["l6"]) == 12
    assert "T13" in names["t13"] and "T12" not in names["t11"] and not any(n.startswith("L") for ns in names.values() for n in ns)
    assert pairs["t13"][L.VERTEBRA_IDS["T13"]] < pairs["t13"][L.VERTEBRA_IDS["T12"]]  # the 13th pair is short
    plain, rated = make_subject(0, 1), make_subject(0, 1, rudimentary_t12=1.0, lumbar_ribs=1.0)
    assert plain.vertebrae == rated.vertebrae and np.array_equal(plain.curve_yz, rated.curve_yz)  # the column is the same
    ribs = dict(rated.ribs)
    assert ribs[L.VERTEBRA_IDS["L1"]] < ribs[L.VERTEBRA_IDS["T11"]] and ribs[L.VERTEBRA_IDS["T12"]] < ribs[L.VERTEBRA_IDS["T11"]]
    shown, _ = ribbed_levels(rated, "lumbar")
    assert "L1" in shown  # a lumbar rib


def test_the_cli_writes_ribbed_images_and_a_truth_table_naming_each_column(tmp_path):
    import subprocess
    import sys

    import pandas as pd

    def phantom(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "spinecohort.cli", "phantom", str(tmp_path), "--subjects", "1", *args], check=True)

    phantom("--anomaly", "t13", "--ribs")
    phantom("--anomaly", "l6", "--first-index", "2")  # the cohort grows; no ribs in these images
    truth = pd.read_csv(tmp_path / "truth.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert truth.to_dict("records") == [
        {"subject": "phantom0001", "cervical": "7", "thoracic": "13", "lumbar": "5", "transitional": "T13",
         "rib_pairs": " ".join(f"T{i}" for i in range(1, 13)) + " T13", "short_ribs": "T13"},
        {"subject": "phantom0002", "cervical": "7", "thoracic": "12", "lumbar": "6", "transitional": "L6", "rib_pairs": "", "short_ribs": ""},
    ]  # fmt: skip
