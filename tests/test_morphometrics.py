"""Per-level measurements (issue 42) on analytic columns: boxes along a straight, a tilted and a curved centre line,
with the exact sizes they were built with (within one voxel's size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinecohort import labels as L
from spinecohort.morphometrics import CUT, measure

HEIGHT, DEPTH, WIDTH, DISC = 20.0, 30.0, 40.0, 8.0  # body height, depth and width; disc height (mm)
CANAL_AP, CANAL_W, CORD_AP, CORD_W = 15.0, 20.0, 8.0, 10.0  # the canal's and cord's boxes behind the bodies
LEVELS = ("L1", "L2", "L3", "L4")


def column(tilt_deg: float = 0.0, bend_deg: float = 0.0, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
           wedge: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Instance and semantic masks and a RAS affine (i lateral, j anterior, k superior) of four bodies with discs,
    the canal and cord behind them, the column tilted by `tilt_deg` in the sagittal plane and bent by `bend_deg`
    per level; `wedge` mm less anterior height than posterior (the middle height is HEIGHT - wedge / 2)."""
    shape = tuple(int(n / s) for n, s in zip((70.0, 140.0, 200.0), spacing))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-34.63, -69.63, -99.63]  # no voxel centre on a box face
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).reshape(-1, 3)
    xyz = ijk * np.array(spacing) + affine[:3, 3]
    instance, semantic = np.zeros(len(xyz), np.uint16), np.zeros(len(xyz), np.uint8)
    step = HEIGHT + DISC
    angles = np.radians(tilt_deg + bend_deg * (np.arange(len(LEVELS)) - 1.5))
    centre = np.zeros(3)
    centres = [centre]
    for k in range(1, len(LEVELS)):  # consecutive centres one step apart along the mean of their axes
        mean = (angles[k - 1] + angles[k]) / 2
        centre = centre + step * np.array([0.0, np.sin(mean), -np.cos(mean)])
        centres.append(centre)
    centres_arr = np.array(centres) - np.mean(centres, axis=0)
    for k, (name, c, angle) in enumerate(zip(LEVELS, centres_arr, angles)):
        u = np.array([0.0, np.sin(angle), -np.cos(angle)])  # down the column
        a = np.array([0.0, np.cos(angle), np.sin(angle)])  # anterior
        d = xyz - c
        su, sa, sl = d @ u, d @ a, d[:, 0]
        level = L.VERTEBRA_IDS[name]
        top = -HEIGHT / 2 + wedge * (sa + DEPTH / 2) / DEPTH  # the anterior top edge lower by `wedge`
        body = (su >= top) & (su <= HEIGHT / 2) & (np.abs(sa) <= DEPTH / 2) & (np.abs(sl) <= WIDTH / 2)
        instance[body], semantic[body] = level, L.CORPUS
        if k < len(LEVELS) - 1:
            disc = (su > HEIGHT / 2) & (su <= HEIGHT / 2 + DISC) & (np.abs(sa) <= DEPTH / 2) & (np.abs(sl) <= WIDTH / 2)
            instance[disc], semantic[disc] = L.IVD_OFFSET + level, L.IVD
        reach = (np.abs(su) <= step / 2 + 4) & (np.abs(sl) <= CANAL_W / 2)  # segments overlap: no gap where a bent column turns
        behind = sa + DEPTH / 2 + 5 + CANAL_AP / 2  # the canal's centre 5 mm behind the body
        canal = reach & (np.abs(behind) <= CANAL_AP / 2) & (semantic == 0)
        semantic[canal] = L.CANAL
        semantic[canal & (np.abs(behind) <= CORD_AP / 2) & (np.abs(sl) <= CORD_W / 2)] = L.CORD
    return instance.reshape(shape), semantic.reshape(shape), affine


def values(table: pd.DataFrame, structure: str, measure_name: str) -> pd.Series:
    rows = table[(table.structure == structure) & (table.measure == measure_name)]
    return rows.set_index("level").value


@pytest.mark.parametrize("tilt, bend", [(0.0, 0.0), (25.0, 0.0), (10.0, 6.0)], ids=["straight", "tilted", "curved"])
def test_a_column_measures_its_sizes_along_itself(tilt: float, bend: float):
    table = measure(*column(tilt, bend), image_id="x")
    voxel = 1.0 * np.sqrt(2)  # one voxel's extent along an oblique direction in the sagittal plane, at most
    body = table[table.structure == "body"]
    assert set(body.level) == set(LEVELS) and (body.reason == "").all()
    for m in ("height_anterior", "height_middle", "height_posterior"):
        assert values(table, "body", m).sub(HEIGHT).abs().max() <= voxel, (m, values(table, "body", m))
    assert values(table, "body", "depth").sub(DEPTH).abs().max() <= voxel
    assert values(table, "body", "wedge_ratio").sub(1).abs().max() <= 0.1
    assert values(table, "body", "volume").div(HEIGHT * DEPTH * WIDTH).sub(1).abs().max() <= 0.06
    discs = values(table, "disc", "height_mean")
    assert list(discs.index) == ["L1-L2", "L2-L3", "L3-L4"] and discs.sub(DISC).abs().max() <= voxel
    assert values(table, "disc", "height_relative").sub(DISC / HEIGHT).abs().max() <= 0.08
    for where in ("mid_body", "mid_disc"):
        canal, cord = values(table, "canal", f"area_{where}"), values(table, "cord", f"area_{where}")
        assert canal.div(CANAL_AP * CANAL_W).sub(1).abs().max() <= 0.12, canal
        assert cord.div(CORD_AP * CORD_W).sub(1).abs().max() <= 0.2, cord
        assert values(table, "canal", f"ap_{where}").sub(CANAL_AP).abs().max() <= voxel
        assert values(table, "cord", f"ap_{where}").sub(CORD_AP).abs().max() <= voxel


def test_a_tilted_column_is_not_measured_along_the_image_axis():
    """The image-axis extent of a 25-degree tilted body is about 20 cos + 30 sin = 30.8 mm: a height measured along
    the superior axis would be 10 mm off; along the column it is 20."""
    instance, semantic, affine = column(25.0)
    table = measure(instance, semantic, affine)
    mask = (instance == L.VERTEBRA_IDS["L2"]) & (semantic == L.CORPUS)
    rows = np.flatnonzero(mask.any(axis=(0, 1)))
    assert rows.max() - rows.min() + 1 > HEIGHT + 8  # the image axis would fail the test
    assert abs(values(table, "body", "height_middle")["L2"] - HEIGHT) <= np.sqrt(2)  # one voxel along an oblique axis


def test_a_wedge_shows_in_the_anterior_height_and_the_ratio():
    table = measure(*column(wedge=6.0))
    heights = values(table, "body", "height_anterior"), values(table, "body", "height_posterior")
    assert heights[0].sub(HEIGHT - 6.0 * 0.9).abs().max() <= 1.0 and heights[1].sub(HEIGHT - 6.0 * 0.1).abs().max() <= 1.0
    assert values(table, "body", "wedge_ratio").between(0.68, 0.80).all()


def test_sagittal_slices_measure_within_a_voxel_of_the_truth():
    """NAKO-like voxels: 3.3 mm sagittal slices, 1.1 mm in plane."""
    table = measure(*column(10.0, spacing=(3.3, 1.1, 1.1)))
    assert values(table, "body", "height_middle").sub(HEIGHT).abs().max() <= 1.1 * np.sqrt(2)
    assert values(table, "canal", "area_mid_body").div(CANAL_AP * CANAL_W).sub(1).abs().max() <= 0.2


def test_the_image_axes_order_and_direction_do_not_change_a_measure():
    """The same tilted column stored with its superior axis flipped and with the axes permuted (slices first):
    the same levels, discs and values (a column read bottom to top would name every disc after the wrong body)."""
    instance, semantic, affine = column(15.0)
    n = instance.shape[2]
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, n - 1
    permute = np.eye(4)[[2, 1, 0, 3]]
    stored = {"flipped": (instance[:, :, ::-1], semantic[:, :, ::-1], affine @ flip),
              "permuted": (instance.transpose(2, 1, 0), semantic.transpose(2, 1, 0), affine @ permute)}
    expected = measure(instance, semantic, affine).set_index(["level", "structure", "measure"]).value
    for name, masks in stored.items():
        got = measure(*masks).set_index(["level", "structure", "measure"]).value
        pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), rtol=1e-6, obj=name)


def test_a_body_the_border_cuts_is_not_measured_and_says_why():
    instance, semantic, affine = column()
    top = np.flatnonzero((instance == L.VERTEBRA_IDS["L1"]).any(axis=(0, 1))).max()
    table = measure(instance[:, :, : top - 5], semantic[:, :, : top - 5], affine)  # k is superior: cut L1's top off
    l1 = table[(table.level == "L1") & (table.structure == "body")]
    assert l1.value.isna().all() and (l1.reason == CUT).all()
    assert table[(table.level == "L2") & (table.structure == "body")].value.notna().all()



def test_the_cohort_table_leaves_rejected_images_out_carries_flags_and_compares_overlapping_stations():
    from spinecohort.morphometrics import cohort_table

    def station(image_id: str, station: str, values: dict[str, str]) -> pd.DataFrame:
        return pd.DataFrame({"subject": "1", "session": "", "station": station, "image_id": image_id, "level": list(values),
                             "structure": "body", "measure": "height_middle", "value": list(values.values()), "unit": "mm",
                             "reason": ["" if v else CUT for v in values.values()]})  # fmt: skip

    stations = [station("c", "cervical", {"T1": "20.0", "T2": ""}), station("t", "thoracic", {"T1": "21.0", "T2": "19.0"}),
                station("x", "lumbar", {"L1": "30"})]  # fmt: skip
    qc = pd.DataFrame({"image_id": ["c", "t", "x"], "flags": ["", "canal_gap", ""]})
    table = cohort_table(stations, qc.set_index("image_id")["flags"], rejected={"x"}).set_index(["image_id", "level"])
    assert "x" not in table.index.get_level_values(0)
    assert table.qc_flags.to_dict() == {("c", "T1"): "", ("c", "T2"): "", ("t", "T1"): "canal_gap", ("t", "T2"): "canal_gap"}
    assert table.stations_measured.to_dict() == {("c", "T1"): 2, ("c", "T2"): 1, ("t", "T1"): 2, ("t", "T2"): 1}  # T2 is cut in c
    assert table.overlap_difference.loc[[("c", "T1"), ("t", "T1")]].tolist() == [-1.0, 1.0]
    assert table.overlap_difference.loc[[("c", "T2"), ("t", "T2")]].isna().all()


@pytest.mark.slow
def test_the_demo_writes_the_table_that_pandas_polars_and_duckdb_read_and_it_agrees_with_the_references(demo_local_run: Path):
    """summary/morphometrics.parquet of the demo run: read alike by pandas, polars and duckdb; every station with
    levels measured; the predicted masks' heights within half a millimetre of the references' on average
    (scripts/morphometrics_agreement.py, the docs' table)."""
    import sys

    import duckdb
    import polars as pl

    from spinecohort import layout

    path = demo_local_run / "summary" / layout.MORPHOMETRICS_TABLE
    table = pd.read_parquet(path)
    assert pl.read_parquet(path).height == len(table) == duckdb.sql(f"select count(*) from read_parquet('{path}')").fetchall()[0][0]
    assert list(table.columns[:10]) == ["subject", "session", "station", "image_id", "level", "structure", "measure", "value", "unit", "reason"]
    assert (table.value.isna() == (table.reason != "")).all()  # a value, or the reason it has none
    assert table.image_id.nunique() == 12 and set(table.station) == {"cervical", "thoracic", "lumbar"}
    l3 = table[(table.level == "L3") & (table.measure == "height_middle")]
    assert len(l3) == table.subject.nunique() == 4 and l3.value.between(15, 35).all()  # every demo subject's L3: a lumbar body's size

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from morphometrics_agreement import reference_measures

    from spinecohort.morphometrics import agreement

    rows = agreement(table, reference_measures(demo_local_run / "demo" / "cohort.tsv", table)).set_index(["station", "structure", "measure"])
    for station in ("cervical", "thoracic", "lumbar"):
        for structure, measure_name in (("body", "height_middle"), ("body", "depth"), ("disc", "height_mean"), ("canal", "ap_mid_body")):
            row = rows.loc[(station, structure, measure_name)]
            assert row.pairs >= 15 and abs(row.bias) <= 0.5, (station, structure, measure_name, row.to_dict())
