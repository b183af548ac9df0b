"""Metrics against independent references: MedPy, panoptica and shapes with known answers."""

import math

import numpy as np
import pytest
from medpy.metric import binary as medpy
from panoptica import InputType, NaiveThresholdMatching, Panoptica_Evaluator
from panoptica.metrics import Metric
from scipy import ndimage

from spinecohort import labels as L
from spinecohort import metrics
from spinecohort.geometry import spacing_of
from spinecohort.phantom import PRESETS, make_subject, render_station

SPACINGS = [(1.0, 1.0, 1.0), (0.7, 0.9, 2.5), (0.6696, 0.6696, 4.4)]


def random_labels(rng: np.random.Generator, shape=(64, 56, 28), n_labels=4, blobs=9) -> np.ndarray:
    """Unions of random ellipsoids with random label ids."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    out = np.zeros(shape, np.uint8)
    for _ in range(blobs):
        centre = rng.uniform(0.2, 0.8, 3) * shape
        radii = rng.uniform(2.5, 10.0, 3) * np.array([1, 1, 0.5])
        out[(((grid - centre) / radii) ** 2).sum(-1) <= 1] = rng.integers(1, n_labels + 1)
    return out


def perturb(rng: np.random.Generator, lab: np.ndarray) -> np.ndarray:
    """Shift the whole mask, peel one label's surface, add a stray island: a plausible prediction."""
    out = np.roll(lab, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2))
    peel = out == out[out > 0].min()
    out[peel & ~ndimage.binary_erosion(peel)] = 0
    c = rng.integers(5, np.array(lab.shape) - 5)
    out[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 1 : c[2] + 1] = rng.integers(1, 5)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_scores_match_medpy_and_panoptica_on_random_shapes(seed, spacing):
    rng = np.random.default_rng(seed)
    ref = random_labels(rng)
    pred = perturb(rng, ref)
    structures = {"a": [1], "b": [2], "c+d": [3, 4]}
    pooled = metrics.score_structures(pred, ref, spacing, structures, definition="pooled")
    means = metrics.score_structures(pred, ref, spacing, structures)
    checked, differ = 0, 0
    for ids, p, m in zip(structures.values(), pooled, means):
        pm, rm = np.isin(pred, ids), np.isin(ref, ids)
        if not (pm.any() and rm.any()):
            continue
        checked += 1
        assert p.dsc == m.dsc == pytest.approx(medpy.dc(pm, rm), abs=1e-12)
        assert p.assd == pytest.approx(medpy.assd(pm, rm, voxelspacing=spacing), abs=1e-6)
        assert m.assd == pytest.approx(Metric.ASSD(rm, pm, voxelspacing=spacing), abs=1e-6)
        differ += p.assd != pytest.approx(m.assd, abs=1e-9)
    assert checked >= 2
    assert differ, "the two definitions differ where the surfaces differ in size (the stray island)"


def cube_shift_distances(n: int, d: int, spacing) -> np.ndarray:
    """Directed distances from the surface of an n-voxel cube to the surface of the same cube shifted by d along axis 0.

    Derived by hand: a lateral-surface voxel at height x lies on the shifted
    cube's surface when x >= d, else (d - x) below its bottom face; a voxel of
    the bottom face (x = 0, interior in y, z) is d below the shifted bottom
    face; a voxel of the top face (x = n - 1) is inside the shifted cube, its
    nearest surface is the shifted top face (d away), a side face, or the
    shifted bottom face (n - 1 - d away).
    """
    sx, sy, sz = spacing
    out = []
    for x in range(n):
        for y in range(n):
            for z in range(n):
                lateral = y in (0, n - 1) or z in (0, n - 1)
                if lateral:
                    out.append(max(0, d - x) * sx)
                elif x == 0:
                    out.append(d * sx)
                elif x == n - 1:
                    out.append(min(d * sx, (n - 1 - d) * sx, min(y, n - 1 - y) * sy, min(z, n - 1 - z) * sz))
    return np.array(out)


@pytest.mark.parametrize(("n", "d", "spacing"), [(10, 1, (1.0, 1.0, 1.0)), (12, 3, (0.75, 0.75, 1.65)), (9, 5, (2.0, 0.5, 1.0))])
def test_shifted_cube_has_the_hand_derived_dice_and_assd(n, d, spacing):
    ref = np.zeros((n + d + 4,) + (n + 4,) * 2, np.uint8)
    pred = ref.copy()
    ref[2 : 2 + n, 2 : 2 + n, 2 : 2 + n] = 1
    pred[2 + d : 2 + d + n, 2 : 2 + n, 2 : 2 + n] = 1
    (score,) = metrics.score_structures(pred, ref, spacing, {"cube": [1]})
    assert score.dsc == pytest.approx((n - d) / n)
    expected = cube_shift_distances(n, d, spacing).mean()  # both directions are mirror images
    assert score.assd == pytest.approx(expected, abs=1e-6)
    (pooled,) = metrics.score_structures(pred, ref, spacing, {"cube": [1]}, definition="pooled")
    assert pooled.assd == pytest.approx(expected, abs=1e-6)


def test_concentric_spheres_are_their_radius_difference_apart():
    spacing = (0.5, 0.5, 0.5)
    grid = np.stack(np.meshgrid(*[np.arange(80) * 0.5] * 3, indexing="ij"), axis=-1)
    r = np.linalg.norm(grid - 20.0, axis=-1)
    ref, pred = (r <= 10.0).astype(np.uint8), (r <= 13.0).astype(np.uint8)
    (score,) = metrics.score_structures(pred, ref, spacing, {"ball": [1]})
    assert score.assd == pytest.approx(3.0, abs=0.25)  # voxelised spheres: within half a voxel
    assert score.dsc == pytest.approx(2 * 10**3 / (10**3 + 13**3), rel=0.02)


def test_empty_masks_follow_the_documented_policy():
    a = np.zeros((10, 10, 10), np.uint8)
    b = a.copy()
    b[3:6, 3:6, 3:6] = 1
    structures = {"x": [1]}
    (both,) = metrics.score_structures(a, a, (1, 1, 1), structures)
    (missed,) = metrics.score_structures(a, b, (1, 1, 1), structures)
    (extra,) = metrics.score_structures(b, a, (1, 1, 1), structures)
    assert both.flag == "both_empty" and math.isnan(both.dsc) and math.isnan(both.assd)
    assert missed.flag == "pred_empty" and missed.dsc == 0.0 and math.isnan(missed.assd) and missed.ref_voxels == 27
    assert extra.flag == "ref_empty" and extra.dsc == 0.0 and math.isnan(extra.assd) and extra.pred_voxels == 27
    assert set(metrics.EMPTY_POLICY) == {"both_empty", "pred_empty", "ref_empty"}
    assert math.isnan(metrics.assd(a.astype(bool), b.astype(bool), (1, 1, 1)))


def test_a_structure_of_several_labels_is_scored_as_their_union():
    rng = np.random.default_rng(7)
    ref = random_labels(rng)
    pred = perturb(rng, ref)
    (union,) = metrics.score_structures(pred, ref, (1, 1, 2), {"all": [1, 2, 3, 4]})
    assert union.dsc == pytest.approx(medpy.dc(pred > 0, ref > 0))


def phantom_instances():
    ph = render_station(make_subject(2, 1), "lumbar", PRESETS["small"], seed=3, index=2)
    vert = np.where(np.isin(ph.instance, list(L.VERTEBRA_IDS.values())), ph.instance, 0).astype(np.int32)
    return vert, spacing_of(ph.affine)


def inject_errors(ref: np.ndarray) -> np.ndarray:
    """Merge the first two vertebrae, split the third in two, drop the fourth."""
    pred = ref.copy()
    ids = [int(i) for i in np.unique(ref) if i]
    pred[pred == ids[1]] = ids[0]
    third = np.argwhere(pred == ids[2])
    cut = np.median(third[:, 1])
    upper = third[third[:, 1] < cut]
    pred[tuple(upper.T)] = 90
    pred[pred == ids[3]] = 0
    return pred


def test_instance_scores_agree_with_panoptica_on_phantom_errors():
    ref, spacing = phantom_instances()
    assert len(np.unique(ref)) - 1 >= 5
    pred = inject_errors(ref)
    ours = metrics.score_instances(pred, ref, spacing)
    evaluator = Panoptica_Evaluator(expected_input=InputType.UNMATCHED_INSTANCE, instance_matcher=NaiveThresholdMatching(),
                                    decision_metric=Metric.IOU, decision_threshold=0.5)
    theirs = evaluator.evaluate(pred, ref, voxelspacing=tuple(spacing), verbose=False)["ungrouped"]
    assert (ours.tp, ours.fp, ours.fn) == (theirs.tp, theirs.fp, theirs.fn)
    assert ours.fn >= 2  # the dropped vertebra, and a merged partner or split half below IoU 0.5
    for mine, key in ((ours.rq, "rq"), (ours.sq, "sq"), (ours.pq, "pq")):
        assert mine == pytest.approx(getattr(theirs, key), abs=1e-9)
    assert np.mean([m[3] for m in ours.matched]) == pytest.approx(theirs.sq_dsc, abs=1e-9)
    assert np.mean([m[4] for m in ours.matched]) == pytest.approx(theirs.sq_assd, abs=1e-6)
    assert ours.recall == pytest.approx(ours.tp / (ours.tp + ours.fn))


def test_perfect_instances_score_one():
    ref, spacing = phantom_instances()
    s = metrics.score_instances(ref, ref, spacing)
    assert (s.fp, s.fn, s.pq, s.recall, s.precision) == (0, 0, 1.0, 1.0, 1.0)
    assert all(m[4] == 0.0 for m in s.matched)


def test_fold_agreement_is_the_mean_pairwise_dice_of_the_folds():
    a = np.zeros((4, 4, 4), np.uint8)
    a[0, :2, :2] = 49  # 4 voxels of corpus
    a[3, 3, 3] = 100
    b, c = a.copy(), a.copy()
    b[0, 1, :2] = 0  # 2 of the 4 corpus voxels
    c[0] = 0  # no corpus at all
    c[1, 1, 1] = 61  # canal in one fold only
    got = metrics.fold_agreement([a, b, c], {"corpus": [49], "IVD": [100], "canal": [61], "cord": [60], "corpus+IVD": [49, 100]})
    assert got["corpus"] == pytest.approx((2 * 2 / 6 + 0 + 0) / 3)
    assert got["IVD"] == 1.0
    assert got["canal"] == pytest.approx((0 + 0) / 2)  # the pair without it (a, b) is left out
    assert np.isnan(got["cord"])
    assert got["corpus+IVD"] == pytest.approx((2 * 3 / 8 + 2 * 1 / 6 + 2 * 1 / 4) / 3)
    with pytest.raises(ValueError, match="two or more folds"):
        metrics.fold_agreement([a], {"corpus": [49]})
