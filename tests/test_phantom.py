"""The phantom is the test bed: check its anatomy, geometry and determinism."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from spinecohort import labels as L
from spinecohort.phantom import PRESETS, STATION_LEVELS, make_subject, render_station, write_cohort


def world(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """World (RAS, mm) coordinates of the voxels in `mask`, shape (n, 3)."""
    idx = np.argwhere(mask)
    return idx @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture(scope="module", params=L.REGIONS)
def station(request):
    subject = make_subject(3, 1)
    return request.param, render_station(subject, request.param, PRESETS["small"], seed=3, index=1)


def test_affine_states_sagittal_orientation_and_preset_grid(station):
    _, ph = station
    assert nib.aff2axcodes(ph.affine) == ("A", "S", "L")
    assert ph.image.shape == PRESETS["small"].shape
    np.testing.assert_allclose(np.linalg.norm(ph.affine[:3, :3], axis=0), PRESETS["small"].spacing)


def test_levels_match_the_station(station):
    region, ph = station
    present = {L.VERTEBRA_NAMES[v] for v in np.unique(ph.instance) if v in L.VERTEBRA_NAMES}
    assert set(STATION_LEVELS[region]["required"]) <= present
    assert not set(STATION_LEVELS[region]["absent"]) & present
    assert (L.SACRUM in ph.semantic) == (region == "lumbar")


def test_every_ivd_lies_between_its_two_bodies(station):
    _, ph = station
    ids = L.level_sequence(first="C2")
    z = {}  # mean superior coordinate of each visible corpus
    for v in ids:
        body = (ph.instance == v) & np.isin(ph.semantic, (L.CORPUS, L.SACRUM))
        if body.sum() > 20:
            z[v] = world(ph.affine, body)[:, 2].mean()
    checked = 0
    for upper, lower in zip(ids[:-1], ids[1:]):
        disc = ph.instance == L.IVD_OFFSET + upper
        if upper in z and lower in z and disc.any():
            disc_z = world(ph.affine, disc)[:, 2].mean()
            assert z[lower] < disc_z < z[upper], f"IVD {100 + upper} not between its bodies"
            assert set(np.unique(ph.semantic[disc])) == {L.IVD}
            checked += 1
    assert checked >= 5


def test_endplates_touch_the_disc_they_are_named_after(station):
    _, ph = station
    for eid in [v for v in np.unique(ph.instance) if v > L.ENDPLATE_OFFSET]:
        plate = ph.instance == eid
        disc = ph.instance == eid - L.ENDPLATE_OFFSET + L.IVD_OFFSET
        if disc.sum() > 50 and plate.sum() > 50:
            touching = ndimage.binary_dilation(plate, iterations=2) & disc
            assert touching.any(), f"endplate {eid} does not touch IVD {eid - 100}"


def test_left_processes_are_on_the_patients_left(station):
    _, ph = station
    midline = world(ph.affine, ph.semantic == L.CORPUS)[:, 0].mean()
    for left, right in L.LEFT_RIGHT_PAIRS:
        # RAS: the patient's left has the smaller R coordinate.
        assert world(ph.affine, ph.semantic == left)[:, 0].mean() < midline - 5
        assert world(ph.affine, ph.semantic == right)[:, 0].mean() > midline + 5


def test_t2w_contrast():
    ph = render_station(make_subject(0, 2), "lumbar", PRESETS["small"], seed=0, index=2)
    med = {lab: np.median(ph.bias_free[ph.semantic == lab]) for lab in (L.CANAL, L.CORD, L.CORPUS, L.ARCUS)}
    nucleus = np.percentile(ph.bias_free[ph.semantic == L.IVD], 90)
    air = np.median(ph.bias_free[:5, :5, :])
    assert med[L.CANAL] > med[L.CORD] > med[L.ARCUS]
    assert nucleus > med[L.CORPUS] > med[L.ARCUS] > air


def test_cord_is_inside_the_canal_and_ends_at_l1_l2():
    subject = make_subject(5, 1)
    ph = render_station(subject, "lumbar", PRESETS["nako"], seed=5, index=1)
    cord = ph.semantic == L.CORD
    rim = ndimage.binary_dilation(cord, structure=ndimage.generate_binary_structure(3, 1)) & ~cord
    assert cord.sum() > 1000
    assert set(np.unique(ph.semantic[rim])) == {L.CANAL}
    lowest = world(ph.affine, cord)[:, 2].min()
    l1 = world(ph.affine, (ph.instance == 20) & (ph.semantic == L.CORPUS))[:, 2]
    l2 = world(ph.affine, (ph.instance == 21) & (ph.semantic == L.CORPUS))[:, 2]
    assert l2.min() - 5 < lowest < l1.max()
    canal_below = world(ph.affine, ph.semantic == L.CANAL)[:, 2]
    assert canal_below.min() < lowest - 50  # the dural sac goes on without a cord


def test_bodies_grow_and_lumbar_discs_are_thicker():
    s = make_subject(0, 1)
    assert s.level("C3").width < s.level("T6").width < s.level("L4").width
    assert s.level("C3").height < s.level("L3").height
    assert s.level("C4").disc < s.level("L4").disc


@pytest.mark.parametrize(("anomaly", "level"), [("l6", "L6"), ("t13", "T13")])
def test_transitional_vertebra(anomaly, level):
    subject = make_subject(0, 1, anomaly=anomaly)
    ph = render_station(subject, "lumbar", PRESETS["small"], seed=0, index=1)
    vid = L.VERTEBRA_IDS[level]
    assert vid in ph.instance and L.IVD_OFFSET + vid in ph.instance


def test_saved_bias_is_image_over_bias_free_rendering(small_cohort: Path):
    row = pd.read_csv(small_cohort, sep="\t", dtype=str, keep_default_na=False).iloc[0]
    base = small_cohort.parent
    img = nib.load(base / row.image)
    bias = nib.load(str(base / row.reference_semantic).replace("_mod-T2w_seg-spine_msk", "_desc-bias_T2w"))
    index = int(row.subject.removeprefix("phantom"))
    ph = render_station(make_subject(0, index), row.region, PRESETS["small"], seed=0, index=index)
    np.testing.assert_allclose(img.get_fdata() / ph.bias_free, bias.get_fdata(), rtol=1e-5)
    assert np.std(np.log(bias.get_fdata())) > 0.05  # a real, non-trivial field
    assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1


def test_cohort_layout_and_manifest(small_cohort: Path):
    table = pd.read_csv(small_cohort, sep="\t", dtype=str, keep_default_na=False)
    assert len(table) == 6 and set(table.region) == set(L.REGIONS)
    assert list(table.batch.value_counts().sort_index()) == [4, 2]
    for row in table.itertuples():
        assert "_chunk-" in row.image and row.image.startswith("rawdata/sub-phantom")
        assert (small_cohort.parent / row.reference_instance).is_file()
        assert row.reference_semantic.endswith("_mod-T2w_seg-spine_msk.nii.gz")


def test_same_seed_gives_byte_identical_files_and_other_seeds_differ(tmp_path: Path):
    a = write_cohort(tmp_path / "a", subjects=1, seed=7).parent
    b = write_cohort(tmp_path / "b", subjects=1, seed=7).parent
    c = write_cohort(tmp_path / "c", subjects=1, seed=8).parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 14  # 3 images, 9 references (semantic, instance, bias), cohort.tsv, truth.tsv
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    img = files[[str(f).endswith("HWS_T2w.nii.gz") for f in files].index(True)]
    assert not np.array_equal(nib.load(a / img).get_fdata(), nib.load(c / img).get_fdata())


def test_injected_failures_change_the_images_only_and_are_listed(tmp_path: Path):
    from spinecohort.phantom import FAILURES, FAILURES_FILE

    clean = write_cohort(tmp_path / "clean", subjects=1, seed=7).parent
    failed = write_cohort(tmp_path / "failed", subjects=1, seed=7, failures=1.0).parent
    listed = pd.read_csv(failed / FAILURES_FILE, sep="\t")
    assert len(listed) == 3 and listed.failure.isin(list(FAILURES)).all() and listed.severity.between(0.05, 1.0).all()
    assert not (clean / FAILURES_FILE).exists()
    for image in (clean / "rawdata").rglob("*_T2w.nii.gz"):
        assert not np.array_equal(nib.load(image).get_fdata(), nib.load(failed / image.relative_to(clean)).get_fdata())
    references = sorted(p.relative_to(clean) for p in (clean / "derivatives").rglob("*_msk.nii.gz"))
    assert len(references) == 6 and filecmp.cmpfiles(clean, failed, [str(r) for r in references], shallow=False)[0] == [str(r) for r in references]


@pytest.mark.parametrize("kind", ["noise", "blur", "contrast", "dropout"])
def test_each_failure_degrades_the_image_as_it_says(kind: str):
    """On a step image (dark above, CSF-bright below): more severity, more damage of the named kind."""
    from spinecohort.phantom import inject_failure

    image = np.zeros((20, 120, 2), np.float32)
    image[:, 60:] = 1000.0
    spacing = (2.0, 2.0, 4.0)
    damage = []
    for severity in (0.3, 1.0):
        out = inject_failure(image, spacing, kind, severity, np.random.default_rng(0))
        assert out.shape == image.shape and out.dtype == np.float32
        damage.append({
            "noise": out[:, :60].std(),                          # noise in the dark half
            "blur": out[:, 55:65].std(axis=1).mean() * -1,       # the edge softens: fewer distinct values near it
            "contrast": out[:, :60].mean() - out[:, 60:].mean(),  # the dark half brightens against the bright one
            "dropout": -out.sum(),                               # signal lost
        }[kind])
    clean_damage = {"noise": 0.0, "blur": -image[:, 55:65].std(axis=1).mean(), "contrast": -1000.0, "dropout": -image.sum()}[kind]
    assert clean_damage < damage[0] < damage[1], damage
    with pytest.raises(ValueError, match="severity"):
        inject_failure(image, spacing, kind, 0.0, np.random.default_rng(0))


def test_snapshot(tmp_path: Path):
    write_cohort(tmp_path, subjects=1, snapshot=True)
    pngs = sorted((tmp_path / "snapshots").glob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subjects", "-2"], "must be a positive integer"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--anomaly", "l7"], "unknown anomaly"),
        (["--failures", "1.5"], "failure fraction must lie in [0, 1]"),
    ],
)
def test_bad_arguments_give_one_line_errors(tmp_path: Path, args, message):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "spinecohort.cli", "phantom", str(out), *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not any(out.rglob("*.nii.gz")) if out.exists() else True


def test_unwritable_output_folder_fails_cleanly(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = subprocess.run([sys.executable, "-m", "spinecohort.cli", "phantom", str(blocker / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_planned_manifest_is_the_written_manifest(small_cohort: Path):
    """The workflow plans the demo's batches and subject groups before the cohort exists; they must be the written ones."""
    from spinecohort.phantom import planned_manifest

    table = pd.read_csv(small_cohort, sep="\t", dtype=str, keep_default_na=False)
    columns = ["subject", "session", "region", "image_id", "batch"]
    planned = planned_manifest(subjects=2, batch_size=4)
    pd.testing.assert_frame_equal(planned[columns].reset_index(drop=True), table[columns])
    written = {batch: sorted(ids) for batch, ids in table.groupby("batch")["image_id"]}
    assert len(written) == 2 and sum(map(len, written.values())) == 6
