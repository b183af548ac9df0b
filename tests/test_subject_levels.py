"""Subject-level levels across a subject's stations, against the phantoms' truth.

Each phantom station's reference instance mask is numbered the way the instance phase numbers a
station (from C2, from the sacrum, or a count from 2: `instances.vertebra_levels`), moved by its own
rigid patient motion (`phantom.station_motion`), and handed to `subject_levels`; every id it claims
is compared with the reference's own level. The demo test in test_levels.py runs the same on the
shipped models' output.
"""

import dataclasses

import numpy as np
import pytest

from spinecohort import instances
from spinecohort import labels as L
from spinecohort import subject_levels as SL
from spinecohort.phantom import PRESETS, make_subject, render_station, station_motion, write_cohort

LAST_SURE = {"T13 or L6": "T12", "T11 or L4": "T11"}  # the last level a transitional vertebra cannot move
OWN_NUMBERING = {"cervical": "C2", "thoracic": "count", "lumbar": "sacrum"}


def as_station(ph, region, affine, mode=None):
    """(Station, truth: station id -> true level) of a phantom station numbered by the station alone."""
    mode = mode or OWN_NUMBERING[region]
    mask, truth = numbered_alone(ph, mode)
    return SL.station_vertebrae(mask, ph.semantic, affine, image_id=region, region=region, mode=mode), truth


def numbered_alone(ph, mode):
    """(instance mask, truth: its id -> true level): the reference's vertebrae with a body renumbered in `mode`."""
    ref = ph.instance
    ids = [int(k) for k in np.unique(ref[L.vertebra_ids(ref)]) if ((ref == k) & (ph.semantic == L.CORPUS)).sum() >= 10]
    ids.sort(key=lambda k: -np.argwhere(ref == k)[:, 1].mean())  # top first: S grows with axis 1
    station_ids, _ = instances.vertebra_levels(len(ids), mode)
    lut = np.zeros(L.ENDPLATE_OFFSET + L.IVD_OFFSET, np.uint16)
    lut[L.SACRUM] = L.SACRUM
    for true, new in zip(ids, station_ids):
        lut[true], lut[L.IVD_OFFSET + true], lut[L.ENDPLATE_OFFSET + true] = new, L.IVD_OFFSET + new, L.ENDPLATE_OFFSET + new
    return lut[ref], dict(zip(station_ids, ids))


def subject_stations(index, *, anomaly="none", shift_mm=0.0, rotation_deg=0.0, regions=("cervical", "thoracic", "lumbar")):
    subject = make_subject(0, index, anomaly=anomaly)
    stations, truth = [], {}
    for region in regions:
        ph = render_station(subject, region, PRESETS["small"], seed=0, index=index)
        rng = np.random.default_rng([0, index, 10 + L.REGIONS.index(region)])
        motion = station_motion(ph.image.shape, ph.affine, shift_mm=shift_mm, rotation_deg=rotation_deg, rng=rng)
        station, truth[region] = as_station(ph, region, motion @ ph.affine)
        stations.append(station)
    return stations, truth


def claimed(result, stations, truth):
    """(right, wrong) claimed vertebra ids per region: those of stations numbered other than by a count."""
    right, wrong = {}, {}
    for s in stations:
        if result.modes[s.image_id] == "count":
            continue
        ids = {k: result.maps[s.image_id][k] if s.image_id in result.maps else k for k in s.ids}
        right[s.region] = sum(ids[k] == truth[s.region][k] for k in s.ids)
        wrong[s.region] = [(L.VERTEBRA_NAMES[truth[s.region][k]], L.VERTEBRA_NAMES.get(ids[k])) for k in s.ids
                           if ids[k] != truth[s.region][k]]
    return right, wrong


@pytest.mark.parametrize(("shift_mm", "rotation_deg", "chains", "thoracic_levels"), [(5.0, 2.0, 20, 20), (10.0, 3.0, 14, 15)])
def test_thoracic_stations_get_their_levels_from_the_chain_and_no_id_is_wrong(shift_mm, rotation_deg, chains, thoracic_levels):
    """20 subjects, each station moved on its own. Where all three stations chain, the thoracic station has
    exactly its levels; a link refused for too much or ambiguous motion leaves it counted; nothing is mislabelled."""
    chained = thoracic_right = thoracic_total = with_levels = 0
    for index in range(1, 21):
        stations, truth = subject_stations(index, shift_mm=shift_mm, rotation_deg=rotation_deg)
        result = SL.label_subject(stations)
        right, wrong = claimed(result, stations, truth)
        assert not any(wrong.values()), (index, wrong, result.links)
        with_levels += result.modes["thoracic"] == "subject"
        if all(link.offset is not None for link in result.links.values()):
            chained += 1
            assert result.vertebrae == 23 and (result.thoracic, result.lumbar) == (12, 5)
            assert result.modes == {"cervical": "C2", "thoracic": "subject", "lumbar": "subject"}
            thoracic_right += right["thoracic"]
            thoracic_total += len(stations[1])
        elif result.modes["thoracic"] == "count":
            assert "motion" in result.reasons["thoracic"] or "share no" in result.reasons["thoracic"], result.reasons
    # The README states these counts.
    assert (chained, with_levels) == (chains, thoracic_levels) and thoracic_right == thoracic_total >= 10 * chained


@pytest.mark.parametrize(("anomaly", "count", "kind"), [("t13", 24, "T13 or L6"), ("l6", 24, "T13 or L6"), ("t11", 22, "T11 or L4")])
def test_a_transitional_vertebra_is_counted_and_no_level_it_could_move_is_claimed(anomaly, count, kind):
    for index in range(1, 9):  # L6 columns whose thoracic and lumbar fields share no vertebra included: they abut
        stations, truth = subject_stations(index, anomaly=anomaly)
        result = SL.label_subject(stations)
        right, wrong = claimed(result, stations, truth)
        assert not any(wrong.values()), (index, wrong)
        assert result.vertebrae == count and kind in result.note and result.thoracic is None
        assert result.modes["lumbar"] == "count" and kind in result.reasons["lumbar"]
        assert result.modes["cervical"] == "C2" and right["cervical"] == len(stations[0])
        if result.modes["thoracic"] == "subject":  # its levels end above what the transitional vertebra could move
            column = L.level_sequence()
            assert set(result.maps["thoracic"].values()) <= set(column[: column.index(L.VERTEBRA_IDS[LAST_SURE[kind]]) + 1])


def test_fields_that_share_no_vertebra_are_linked_one_step_of_the_column_apart():
    """An L6 column is longer: its thoracic and lumbar fields often share no vertebra. The lower one's first vertebra
    then follows the upper one's last, one step of the column below (20 subjects, each station moved up to 5 mm and
    2 degrees): each such link is right or refused for its motion, and none is ever a level off."""
    abutting = linked = 0
    for index in range(1, 21):
        (upper, lower), truth = subject_stations(index, anomaly="l6", shift_mm=5.0, rotation_deg=2.0, regions=("thoracic", "lumbar"))
        true_offset = truth["lumbar"][lower.ids[0]] - truth["thoracic"][upper.ids[0]]  # ids run down an L6 column (no T13)
        found = SL.link(upper, lower)
        assert found.offset in (None, true_offset), (index, found)
        if true_offset == len(upper):
            abutting += 1
            linked += found.offset is not None
            assert found.offset is not None or "motion" in found.reason, found
    assert (abutting, linked) == (6, 5)


def test_abutting_fields_moved_half_a_level_are_refused():
    (upper, lower), _ = subject_stations(4, anomaly="l6", regions=("thoracic", "lumbar"))
    assert SL.link(upper, lower).offset == len(upper)  # they abut
    step = lower.centres[2] - lower.centres[1]
    assert SL.link(upper, dataclasses.replace(lower, centres=lower.centres + 0.5 * step)).offset is None


def test_a_subject_without_a_thoracic_station_keeps_its_anchors_and_says_why():
    stations, truth = subject_stations(1, regions=("cervical", "lumbar"))
    result = SL.label_subject(stations)
    assert result.links["cervical-lumbar"].offset is None and result.links["cervical-lumbar"].reason == "no thoracic station"
    assert result.modes == {"cervical": "C2", "lumbar": "sacrum"} and not result.maps
    right, wrong = claimed(result, stations, truth)
    assert not any(wrong.values()) and right == {"cervical": len(stations[0]), "lumbar": len(stations[1])}


def test_a_thoracic_station_linked_only_to_the_sacrum_stays_counted():
    """Counting up from the sacrum would shift every level above a transitional vertebra."""
    subject = make_subject(0, 2)
    stations, truth = [], {}
    for region, mode in (("cervical", "count"), ("thoracic", "count"), ("lumbar", "sacrum")):
        ph = render_station(subject, region, PRESETS["small"], seed=0, index=2)
        station, truth[region] = as_station(ph, region, ph.affine, mode)
        stations.append(station)
    result = SL.label_subject(stations)
    assert all(link.offset is not None for link in result.links.values())
    assert result.modes == {"cervical": "count", "thoracic": "count", "lumbar": "sacrum"}
    assert result.reasons["thoracic"].startswith("only the sacrum links to it")


def test_one_level_of_motion_is_refused_not_taken_for_a_shifted_pairing():
    """A thoracic station displaced by about one vertebra's height against the cervical one is ambiguous."""
    stations, _ = subject_stations(3)
    cervical, thoracic = stations[0], stations[1]
    shared = SL.link(cervical, thoracic)
    assert shared.offset is not None and shared.motion_mm < 1.0
    step = thoracic.centres[1] - thoracic.centres[0]  # one level along the column
    for fraction in (0.5, 0.45):
        moved = SL.Station(thoracic.image_id, thoracic.region, thoracic.mode, thoracic.ids,
                           thoracic.centres - fraction * step, thoracic.whole, thoracic.before_top)
        found = SL.link(cervical, moved)
        assert found.offset is None and found.reason.startswith("cervical and thoracic: ambiguous"), found


def test_relabel_moves_every_vertebra_ivd_and_endplate_id_and_keeps_the_sacrum():
    mask = np.array([2, 3, 102, 203, 101, 26, 0, 124], np.uint16).reshape(2, 2, 2)
    out = SL.relabel(mask, {1: 7, 2: 8, 3: 9, 24: 24})
    assert out.ravel().tolist() == [8, 9, 108, 209, 107, 26, 0, 124]


def test_phantom_motion_moves_the_station_rigidly_and_keeps_its_voxels(tmp_path):
    import nibabel as nib

    still = write_cohort(tmp_path / "still", subjects=1, seed=0)
    moved = write_cohort(tmp_path / "moved", subjects=1, seed=0, motion_mm=10.0, motion_deg=3.0)
    for path in sorted((still.parent / "rawdata").rglob("*_T2w.nii.gz")):
        a = nib.load(path)
        b = nib.load(moved.parent / path.relative_to(still.parent))
        assert np.array_equal(a.get_fdata(), b.get_fdata())
        motion = b.affine @ np.linalg.inv(a.affine)
        rotation = motion[:3, :3]
        assert np.allclose(rotation @ rotation.T, np.eye(3)) and np.isclose(np.linalg.det(rotation), 1.0)
        angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))
        centre = a.affine @ np.r_[(np.array(a.shape) - 1) / 2, 1]
        shift = np.linalg.norm((motion @ centre - centre)[:3])
        assert 0 < angle <= 3.0 and 0 < shift <= 10.0


@pytest.mark.slow
@pytest.mark.parametrize(("shift_mm", "rotation_deg"), [(0.0, 0.0), (10.0, 3.0)])
def test_the_demos_own_stations_under_motion_keep_their_levels(demo_local_run, shift_mm, rotation_deg):
    """The real path: the demo's restored masks (shipped models), each station moved by its own rigid motion,
    numbered together, and every vertebra with a body in view compared with the phantom's reference."""
    from spinecohort import cohort, io, layout

    manifest = demo_local_run / "demo" / "cohort.tsv"
    table = cohort.resolve_paths(cohort.read_manifest(manifest), manifest.parent)
    right, total, chained = {}, {}, 0
    for subject, rows in table.groupby("subject"):
        stations, masks = [], {}
        for row in rows.itertuples():
            folder = next(demo_local_run.glob(f"work/*/restore/{layout.derivative_name(row.image_id, 'vert')}")).parent
            instance, affine = io.load_mask(folder / layout.derivative_name(row.image_id, "vert"))
            semantic = io.load_mask(folder / layout.derivative_name(row.image_id, "spine"))[0]
            index = int(subject.removeprefix("phantom"))
            rng = np.random.default_rng([0, index, 10 + L.REGIONS.index(row.region)])
            moved = station_motion(instance.shape, affine, shift_mm=shift_mm, rotation_deg=rotation_deg, rng=rng) @ affine
            mode = OWN_NUMBERING[row.region]
            stations.append(SL.station_vertebrae(instance, semantic, moved, image_id=row.image_id, region=row.region, mode=mode))
            masks[row.image_id] = (instance, io.load_mask(row.reference_instance)[0], io.load_mask(row.reference_semantic)[0])
        result = SL.label_subject(stations)
        chained += all(link.offset is not None for link in result.links.values())
        for row in rows.itertuples():
            if result.modes[row.image_id] == "count":
                continue
            instance, reference, truth = masks[row.image_id]
            ids = SL.relabel(instance, result.maps[row.image_id]) if row.image_id in result.maps else instance
            found = [k for k in np.unique(reference[L.vertebra_ids(reference)])
                     if ((reference == k) & (truth == L.CORPUS)).sum() >= 10]
            right[row.region] = right.get(row.region, 0) + sum(np.bincount(ids[reference == k]).argmax() == k for k in found)
            total[row.region] = total.get(row.region, 0) + len(found)
    assert chained >= 3
    assert right["cervical"] == total["cervical"] and right["lumbar"] == total["lumbar"]
    assert right["thoracic"] >= 0.98 * total["thoracic"] and total["thoracic"] >= 12 * chained, (right, total)


def stitched_subject(index, *, shift_mm, use_link_shifts=True):
    """(stitched instance mask from the stations numbered alone, then by the subject; the same stitch of the
    references with the true motion undone): both on the stitch grid of the cervical station's frame."""
    from spinecohort.geometry import resample
    from spinecohort.stitch import Piece, stitch

    subject = make_subject(0, index)
    stations, ours, truth = [], [], []
    motions = {}
    for region in L.REGIONS:
        ph = render_station(subject, region, PRESETS["small"], seed=0, index=index)
        rng = np.random.default_rng([0, index, 10 + L.REGIONS.index(region)])
        motions[region] = station_motion(ph.image.shape, ph.affine, shift_mm=shift_mm, rotation_deg=0.0, rng=rng)
        moved = motions[region] @ ph.affine
        mode = OWN_NUMBERING[region]
        mask, _ = numbered_alone(ph, mode)
        stations.append(SL.station_vertebrae(mask, ph.semantic, moved, image_id=region, region=region, mode=mode))
        ours.append((mask, moved))
        truth.append((ph.instance, moved))
    result = SL.label_subject(stations)
    assert set(result.whole_spine) == set(L.REGIONS), result.reasons
    true_shift = {r: motions["cervical"][:3, 3] - motions[r][:3, 3] for r in L.REGIONS}  # pure translations
    pieces = [Piece((SL.relabel(mask, result.maps.get(r, {})),), moved, result.whole_spine[r] if use_link_shifts else np.zeros(3))
              for r, (mask, moved) in zip(L.REGIONS, ours)]
    references = [Piece((mask,), moved, true_shift[r]) for r, (mask, moved) in zip(L.REGIONS, truth)]
    (mine,), grid = stitch(pieces, ("nearest",))
    (expected,), (_, expected_affine) = stitch(references, ("nearest",))
    return mine, resample(expected, expected_affine, grid, kind="nearest")


def test_the_whole_spine_stitch_has_every_level_once_where_the_truth_has_it():
    """Three stations, each moved up to 10 mm: stitched by the links' shifts, the whole-spine mask holds C2 to
    the sacrum each as one piece, matching the references stitched with the true motion undone (Dice per level).
    Without undoing the motion the same comparison fails: the test sees the shift. Subjects 1, 3 and 4 share no
    structure whole in both the thoracic and the lumbar field: their shift comes from matching the masks."""
    from scipy import ndimage

    worst_without = 1.0
    for index in (1, 2, 3, 4):
        mine, expected = stitched_subject(index, shift_mm=10.0)
        levels = [int(k) for k in np.unique(expected[L.vertebra_ids(expected)])]
        assert levels == L.level_sequence(first="C2")[:-1] and (expected == L.SACRUM).any()  # C2 ... L5, the sacrum
        levels.append(L.SACRUM)
        assert [int(k) for k in np.unique(mine[L.vertebra_ids(mine) | (mine == L.SACRUM)])] == levels
        dice = {}
        for k in levels:
            # No level twice: never more pieces than the truth's (its thin arches fall apart at this grid).
            assert ndimage.label(mine == k)[1] <= ndimage.label(expected == k)[1], (index, L.VERTEBRA_NAMES[k])
            dice[k] = 2 * ((mine == k) & (expected == k)).sum() / ((mine == k).sum() + (expected == k).sum())
        # A stitch off by one voxel (1.9 x 1.9 x 4.4 mm) costs a level 0.12 of Dice; one level off would cost it all.
        assert min(dice.values()) > 0.85 and np.mean(list(dice.values())) > 0.95, (index, dice)
        unmoved, expected = stitched_subject(index, shift_mm=10.0, use_link_shifts=False)
        worst_without = min(worst_without, min(2 * ((unmoved == k) & (expected == k)).sum() / ((unmoved == k).sum() + (expected == k).sum())
                                               for k in levels))
    assert worst_without < 0.8


def test_a_pairing_on_cut_vertebrae_alone_is_measured_from_the_masks():
    """A vertebra cut by a field's border has its centroid pulled inwards, by up to half its height. Here the one
    vertebra two fields share is cut by the upper field's border (whole in the lower one), and its centroid there is
    pulled 12 mm up the column: by the centroids the pairing implies 17 mm of motion (refused); measured from the masks (the
    stitch's matching, both ways) it implies under 1.5 voxels (2.8 mm), as the stations were not moved."""
    (upper, lower), _ = subject_stations(5, anomaly="l6", regions=("thoracic", "lumbar"))
    assert not upper.whole[-1] and lower.whole[0]
    along = (upper.centres[-1] - upper.centres[-2]) / np.linalg.norm(upper.centres[-1] - upper.centres[-2])
    centres = upper.centres.copy()
    centres[-1] -= 12.0 * along
    found = SL.link(dataclasses.replace(upper, centres=centres), lower)
    assert found.offset == len(upper) - 1 and found.motion_mm < 2.8, found  # they share one vertebra
    no_masks = dataclasses.replace(upper, centres=centres, discs=None, mask=None, affine=None)
    assert "17 mm of motion" in SL.link(no_masks, lower).reason
