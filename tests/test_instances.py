"""Instance phase on phantoms, with a cutout predictor that returns the true above/centre/below masks.

The oracle isolates centres, cutouts, merging and numbering from network quality.
"""

from pathlib import Path

import numpy as np
import pytest

from spinecohort import geometry, instances, layout
from spinecohort import labels as L
from spinecohort.models import spineps_voxels
from spinecohort.phantom import PRESETS, make_subject, render_station, voxel_world

# The demo instance model's grid: the small preset's, its 4.4 mm slices halved, so the round trip is exact.
SPACING = (1.875, 1.875, 2.2)
# Its thresholds: SPINEPS's defaults (100 and 250 voxels of its own grid) as the same volumes on this one.
MODEL = instances.InstanceModel(path=Path("."), orientation=("P", "I", "R"), spacing=SPACING, cutout=(72, 88, 32),
                                corpus_size_cleaning=spineps_voxels(100, SPACING), vert_size_threshold=spineps_voxels(250, SPACING))


def to_instance_space(ph):
    grid = geometry.target_grid(ph.semantic.shape, ph.affine, MODEL.orientation, MODEL.spacing)
    seg = geometry.resample(ph.semantic, ph.affine, grid, kind="nearest")
    ref = geometry.resample(ph.instance, ph.affine, grid, kind="nearest")
    return seg, ref, grid


def oracle(reference: np.ndarray, cutout=MODEL.cutout):
    """Predictor returning 1/2/3 for the true vertebra above / at / below each cutout's centre."""
    vertebrae = [k for k in np.unique(reference) if 0 < k < L.IVD_OFFSET and k != L.SACRUM]
    centroid = {k: np.argwhere(reference == k).mean(axis=0) for k in vertebrae}
    order = sorted(vertebrae, key=lambda k: centroid[k][1])
    size = np.array(cutout)

    def predict(onehot, origins):
        out = []
        for origin in origins:
            centre = origin + size // 2
            at = reference[tuple(np.clip(centre, 0, np.array(reference.shape) - 1))]
            v = at if at in order else min(order, key=lambda k: np.linalg.norm(centroid[k] - centre))
            i = order.index(v)
            window = instances._window(reference, origin, size)
            pred = np.zeros(window.shape, np.uint8)
            for label, j in ((1, i - 1), (2, i), (3, i + 1)):
                if 0 <= j < len(order):
                    pred[window == order[j]] = label
            out.append(pred)
        return np.stack(out)

    return predict


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def check_against_reference(ph, region, *, anchored=True):
    seg, ref, grid = to_instance_space(ph)
    out, numbering = instances.assemble(seg, MODEL, oracle(ref), region)
    restored = geometry.resample(out, grid[1], (ph.instance.shape, ph.affine), kind="nearest")
    truth = ph.instance
    # Every vertebra whose body shows; one cut off above its body is out of reach of every cutout (as in SPINEPS).
    vertebrae = [k for k in np.unique(truth) if 0 < k < L.IVD_OFFSET and ((truth == k) & (ph.semantic == L.CORPUS)).any()]
    assert len(vertebrae) >= 6
    assert not L.unknown_ids(out, L.INSTANCE_MASK_IDS)
    if anchored:
        assert numbering == instances.Numbering({"cervical": "C2", "lumbar": "sacrum"}[region])
        for k in vertebrae:
            assert dice(restored == k, truth == k) >= 0.99, (region, L.VERTEBRA_NAMES.get(k, k))
        discs = truth >= L.IVD_OFFSET
        assert np.array_equal(restored[discs], truth[discs])
    else:
        assert numbering.mode == "count" and "no anchor" in numbering.reason
        # Ids are a count: the same instances, shifted by one constant.
        shift = {int(np.median(truth[restored == k])) - int(k) for k in np.unique(restored) if 0 < k < L.IVD_OFFSET}
        assert len(shift) == 1
        (s,) = shift
        for k in vertebrae:
            assert dice(restored == k - s, truth == k) >= 0.99
        ivd = truth >= L.IVD_OFFSET
        assert np.array_equal(restored[ivd].astype(int) + s, truth[ivd])  # 100+X and 200+X follow the vertebra
    return restored


@pytest.mark.parametrize("region", ["cervical", "lumbar"])
def test_oracle_cutouts_give_the_reference_instances(region):
    ph = render_station(make_subject(0, 1), region, PRESETS["small"], seed=0, index=1)
    check_against_reference(ph, region)


def test_thoracic_station_has_no_anchor_and_says_so():
    ph = render_station(make_subject(0, 1), "thoracic", PRESETS["small"], seed=0, index=1)
    check_against_reference(ph, "thoracic", anchored=False)


def test_no_vertebral_body_gives_an_empty_mask_and_a_reason():
    seg = np.zeros((40, 64, 16), np.uint8)
    seg[10:20, 10:50, 4:10] = L.CANAL
    out, numbering = instances.assemble(seg, MODEL, oracle(np.zeros_like(seg)), "lumbar")
    assert not out.any() and numbering.mode == "count" and "no vertebral body" in numbering.reason


def test_a_merged_body_is_split_into_two_centres():
    ph = render_station(make_subject(0, 1), "lumbar", PRESETS["small"], seed=0, index=1)
    seg, ref, _ = to_instance_space(ph)
    before = instances.corpus_centres(seg, min_voxels=10)
    # Merge L3 and L4: their disc becomes corpus.
    l3, l4 = L.VERTEBRA_IDS["L3"], L.VERTEBRA_IDS["L4"]
    disc = ref == L.IVD_OFFSET + l3
    merged = seg.copy()
    merged[disc | np.isin(ref, [L.ENDPLATE_OFFSET + l3])] = L.CORPUS
    after = instances.corpus_centres(merged, min_voxels=10)
    assert len(after) == len(before)
    vertebrae = [k for k in np.unique(ref[seg == L.CORPUS]) if 0 < k < L.IVD_OFFSET and k != L.SACRUM]
    body = {k: np.argwhere((ref == k) & (seg == L.CORPUS)).mean(axis=0) for k in vertebrae}
    nearest = [min(vertebrae, key=lambda k: np.linalg.norm(c - body[k])) for c in after]
    assert {l3, l4} <= set(nearest) and len(set(nearest)) == len(after)  # one centre in each of the merged bodies
    for k in (l3, l4):  # the halves carry half a disc each: within 6 voxels (11 mm) of the true body centre
        assert np.min(np.linalg.norm(after - body[k], axis=1)) < 6.0


def test_sacrum_is_26_in_a_lumbar_station():
    ph = render_station(make_subject(0, 1), "lumbar", PRESETS["small"], seed=0, index=1)
    restored = check_against_reference(ph, "lumbar")
    assert np.array_equal(restored == L.SACRUM, ph.instance == L.SACRUM) and (ph.instance == L.SACRUM).any()


def test_a_missing_body_still_gives_its_vertebra_from_the_neighbouring_cutouts():
    ph = render_station(make_subject(1, 1), "lumbar", PRESETS["small"], seed=0, index=1)
    l3 = L.VERTEBRA_IDS["L3"]
    ph.semantic[(ph.instance == l3) & (ph.semantic == L.CORPUS)] = 0  # the semantic model missed L3's body
    seg, ref, grid = to_instance_space(ph)
    out, note = instances.assemble(seg, MODEL, oracle(ref), "lumbar")
    restored = geometry.resample(out, grid[1], (ph.instance.shape, ph.affine), kind="nearest")
    vertebra = np.isin(ph.semantic, L.VERTEBRA_PARTS)
    assert not ((ref == l3) & (seg == L.CORPUS)).any()  # no centre can come from L3
    for name in ("L2", "L3", "L4"):
        k = L.VERTEBRA_IDS[name]
        assert dice((restored == k) & vertebra, (ph.instance == k) & vertebra) >= 0.99, name


def test_a_transitional_vertebra_is_found_and_counted_from_s1():
    """Six lumbar vertebrae: all found; without a labelling model, L6 takes L5's id counting up from S1."""
    ph = render_station(make_subject(0, 1, anomaly="l6"), "lumbar", PRESETS["small"], seed=0, index=1)
    assert (ph.instance == L.VERTEBRA_IDS["L6"]).any()
    seg, ref, grid = to_instance_space(ph)
    out, note = instances.assemble(seg, MODEL, oracle(ref), "lumbar")
    restored = geometry.resample(out, grid[1], (ph.instance.shape, ph.affine), kind="nearest")
    found = [k for k in np.unique(ph.instance) if 0 < k < L.IVD_OFFSET and ((ph.instance == k) & (ph.semantic == L.CORPUS)).any()]
    for k in found:
        ours = np.bincount(restored[ph.instance == k]).argmax()
        assert dice(restored == ours, ph.instance == k) >= 0.99
    assert np.bincount(restored[ph.instance == L.VERTEBRA_IDS["L6"]]).argmax() == L.VERTEBRA_IDS["L5"]


def test_network_path_runs_through_the_stage_cli(small_cohort, tmp_path):
    """assemble-instances with a (random-weight) SPINEPS-format model on true semantic masks, then restore and label-levels."""
    import subprocess

    import pandas as pd

    from spinecohort import cohort, io
    from spinecohort.models import write_random_instance_model
    from spinecohort.pipeline import derivative_path

    model = write_random_instance_model(tmp_path / "instance", spacing=(2.0, 2.0, 4.4), cutout=(64, 64, 16))
    table = cohort.resolve_paths(cohort.read_manifest(small_cohort), small_cohort.parent)
    batch = table[table.batch == "b0001"]
    semantic = tmp_path / "semantic"
    for row in batch.itertuples():
        seg, affine = io.load_mask(row.reference_semantic)
        io.save_nifti(semantic / f"{row.image_id}_seg-spine-raw_msk.nii.gz", seg, affine, dtype=np.uint8)
    io.write_tsv(semantic / "ledger.tsv", pd.DataFrame({"image_id": batch.image_id, "stage": "average_folds", "status": "ok", "message": ""}))
    common = ["--manifest", str(small_cohort), "--batch", "b0001"]
    subprocess.run(["spinecohort", "assemble-instances", *common, "--input", semantic, "--model", model, "--device", "cpu",
                    "--out", tmp_path / "instances"], check=True, capture_output=True)
    ledger = pd.read_csv(tmp_path / "instances" / "ledger.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert (ledger.status == "ok").all() and len(ledger) == len(batch)
    for row in batch.itertuples():
        vert, affine = io.load_mask(tmp_path / "instances" / f"{row.image_id}_seg-vert-raw_msk.nii.gz")
        assert nib_codes(affine) == ("P", "I", "R")
    provenance = tmp_path / "provenance.json"
    subprocess.run(["spinecohort", "describe", "--semantic-model", Path(__file__).parents[1] / "resources" / "demo_models" / "semantic",
                    "--instance-model", model, "--folds", "0", "--parameters", '{"n4": {}}', "--out", provenance,
                    "--dataset-description", tmp_path / "derivatives" / "dataset_description.json"], check=True, capture_output=True)
    subprocess.run(["spinecohort", "restore", *common, "--input", semantic, "--instances", tmp_path / "instances",
                    "--derivatives", tmp_path / "derivatives", "--provenance", provenance, "--out", tmp_path / "restore"],
                   check=True, capture_output=True)
    # The subject group b0001 also holds the subjects' thoracic stations (batch b0002), not restored here.
    subprocess.run(["spinecohort", "label-levels", *common, "--restore", tmp_path / "restore",
                    "--derivatives", tmp_path / "derivatives", "--provenance", provenance, "--out", tmp_path / "levels"],
                   check=True, capture_output=True)
    ledger = pd.read_csv(tmp_path / "levels" / "ledger.tsv", sep="\t", dtype=str, keep_default_na=False).set_index("image_id")
    assert set(ledger.index) == set(table.image_id)
    others = table[table.batch != "b0001"].image_id
    assert (ledger.status[others] == "skipped").all() and set(ledger.message[others]) == {"restored by none of the given restore folders"}
    for _, row in batch.iterrows():
        image, affine = io.load_image(row.image)
        assert ledger.status[row.image_id] == "ok"
        for seg in ("spine", "vert"):
            mask, mask_affine = io.load_mask(derivative_path(tmp_path / "derivatives", row, seg))
            assert mask.shape == image.shape and np.allclose(mask_affine, affine)
        assert derivative_path(tmp_path / "derivatives", row, *layout.SNAPSHOT).read_bytes()[:4] == b"\x89PNG"


def nib_codes(affine):
    import nibabel as nib

    return nib.aff2axcodes(affine)


def test_a_merged_body_still_gives_both_vertebrae():
    ph = render_station(make_subject(0, 1), "lumbar", PRESETS["small"], seed=0, index=1)
    l3 = L.VERTEBRA_IDS["L3"]
    disc = np.isin(ph.instance, [L.IVD_OFFSET + l3, L.ENDPLATE_OFFSET + l3])
    ph.semantic[disc] = L.CORPUS  # the semantic model fused L3 and L4 through their disc
    seg, ref, grid = to_instance_space(ph)
    out, note = instances.assemble(seg, MODEL, oracle(ref), "lumbar")
    restored = geometry.resample(out, grid[1], (ph.instance.shape, ph.affine), kind="nearest")
    for name in ("L2", "L3", "L4", "L5"):
        k = L.VERTEBRA_IDS[name]
        assert dice((restored == k) & ~disc, ph.instance == k) >= 0.99, name


def test_an_articular_process_split_between_instances_goes_to_its_majority():
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[2:5, 2:8, 2:5] = L.SUP_ARTICULAR_L
    instance = np.zeros_like(seg, dtype=np.uint16)
    instance[2:5, 2:7, 2:5] = 3
    instance[2:5, 7:8, 2:5] = 4  # a sliver claimed by the next vertebra
    instances._one_owner_per_articular_process(instance, seg)
    assert (instance[seg > 0] == 3).all()


def test_endplates_split_into_each_vertebras_superior_and_inferior_plate_as_spineps_2_does():
    ph = render_station(make_subject(0, 1), "lumbar", PRESETS["small"], seed=0, index=1)
    semantic = ph.semantic.copy()
    instances.split_endplates(semantic, ph.instance)
    changed = semantic != ph.semantic
    assert set(np.unique(ph.semantic[changed])) == {L.ENDPLATE}  # only endplate voxels change
    assert set(np.unique(semantic[changed])) == {L.ENDPLATE_SUPERIOR, L.ENDPLATE_INFERIOR}
    height = voxel_world(ph.affine, ph.semantic.shape)[..., 2]  # world z: superior is up
    pairs = 0
    for x in (L.VERTEBRA_IDS[name] for name in ("L1", "L2", "L3", "L4")):
        pair = ph.instance == L.ENDPLATE_OFFSET + x
        inferior, superior = pair & (semantic == L.ENDPLATE_INFERIOR), pair & (semantic == L.ENDPLATE_SUPERIOR)
        # X's inferior plate lies above the superior plate of the vertebra below it, each next to its own vertebra
        assert inferior.any() and superior.any() and height[inferior].mean() > height[superior].mean() + 2, x
        assert (pair & (semantic == L.ENDPLATE)).sum() <= 0.05 * pair.sum()
        pairs += 1
    assert pairs == 4


def test_the_export_writes_the_shipped_models_thresholds_as_voxels_of_its_grid():
    """The training rules' export and the shipped demo model agree; both are SPINEPS's defaults as volumes."""
    import json

    from spinecohort.models import instance_inference_config

    shipped = json.loads((Path(__file__).resolve().parents[1] / "resources" / "demo_models" / "instance" / "inference_config.json").read_text())
    written = instance_inference_config(spacing=shipped["resolution_range"], cutout=shipped["cutout_size"], name="x")
    assert (written["corpus_size_cleaning"], written["vert_size_threshold"]) == (shipped["corpus_size_cleaning"], shipped["vert_size_threshold"]) == (12, 30)
    reference = instance_inference_config(spacing=(0.75, 0.75, 1.65), cutout=(248, 304, 64), name="x")
    assert (reference["corpus_size_cleaning"], reference["vert_size_threshold"]) == (100, 250)  # SPINEPS's own grid
