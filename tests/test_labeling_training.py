"""Training a labelling model (issue 39): the heads' targets from a subject's column, cutouts as inference makes them,
and the exported folder (float16) naming what the trained network names."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinecohort import cohort
from spinecohort import labels as L
from spinecohort.label_search import class_names
from spinecohort.labeling_training import (
    HEADS,
    augmented,
    export_labeling_model,
    train_labeling_network,
    training_examples,
    vertebra_targets,
)

VERT = class_names(24)


def column(thoracic: int = 12, lumbar: int = 5) -> list[int]:
    return L.level_sequence(first="C2", thoracic=thoracic, lumbar=lumbar)[:-1]


def targets(name: str, col: list[int], whole: bool = True) -> dict[str, int]:
    return vertebra_targets(L.VERTEBRA_IDS[name], col, whole)


@pytest.mark.parametrize(("name", "col", "expected"), [
    ("C7", column(), {"REGION": 0, "VERT": VERT.index("C7"), "VERTREL": 1, "VERTT13": 0}),
    ("T1", column(), {"REGION": 1, "VERT": VERT.index("T1"), "VERTREL": 2, "VERTT13": 0}),
    ("T12", column(), {"REGION": 1, "VERT": VERT.index("T12"), "VERTREL": 3, "VERTT13": 0}),
    ("T12", column(thoracic=13), {"REGION": 1, "VERT": VERT.index("T12"), "VERTREL": 0, "VERTT13": 0}),
    ("T13", column(thoracic=13), {"REGION": 1, "VERT": VERT.index("T12"), "VERTREL": 3, "VERTT13": 1}),
    ("T11", column(thoracic=11), {"REGION": 1, "VERT": VERT.index("T11"), "VERTREL": 3, "VERTT13": 0}),
    ("L1", column(), {"REGION": 2, "VERT": VERT.index("L1"), "VERTREL": 4, "VERTT13": 0}),
    ("L5", column(), {"REGION": 2, "VERT": VERT.index("L5"), "VERTREL": 5, "VERTT13": 0}),
    ("L5", column(lumbar=6), {"REGION": 2, "VERT": VERT.index("L5"), "VERTREL": 0, "VERTT13": 0}),
    ("L6", column(lumbar=6), {"REGION": 2, "VERT": VERT.index("L5"), "VERTREL": 5, "VERTT13": 0}),
])  # fmt: skip
def test_each_vertebra_gets_the_heads_classes_its_column_gives_it(name, col, expected):
    assert targets(name, col) == {**expected, "FULLYVISIBLE": 1}
    assert targets(name, col, whole=False)["FULLYVISIBLE"] == 0


def test_an_augmented_cutout_is_shifted_a_little_and_keeps_its_zeros_outside():
    x = np.zeros((16, 16, 8), np.float32)
    x[6:10, 6:10] = 1.0
    out = augmented(x, np.random.default_rng(3))
    assert (out != 0).sum() == (x != 0).sum()  # the block moved at most 2 voxels: never out of the window
    moved = np.argwhere(out != 0).mean(axis=0) - np.argwhere(x != 0).mean(axis=0)
    assert np.abs(moved[:2]).max() <= 2 and moved[2] == 0
    assert 0.7 < out[out != 0].mean() < 1.3


@pytest.fixture(scope="module")
def ribbed_t13(tmp_path_factory):
    from spinecohort.phantom import write_cohort

    manifest = write_cohort(tmp_path_factory.mktemp("ribbed"), subjects=1, anomaly="t13", ribs=True)
    return cohort.resolve_paths(cohort.read_manifest(manifest), manifest.parent)


def test_the_training_examples_are_every_vertebra_with_its_columns_targets(ribbed_t13: pd.DataFrame):
    examples = training_examples(ribbed_t13, size=(32, 32, 32), resolution=[3.0, 3.0, 4.4])
    assert examples.cutouts.shape[1:] == (32, 32, 32) and len(examples) >= 24  # 24 vertebrae, the shared ones twice
    t13 = examples.targets["VERTT13"] == 1
    assert t13.sum() >= 1 and (examples.targets["VERTREL"][t13] == 3).all()  # the T13 is the last thoracic one
    assert (examples.targets["VERT"][t13] == VERT.index("T12")).all()
    assert (examples.targets["REGION"] == 2).sum() >= 5 and set(examples.targets["FULLYVISIBLE"]) == {0, 1}


def test_the_exported_folder_names_what_the_trained_network_names(ribbed_t13: pd.DataFrame, tmp_path):
    """Two epochs on one subject (that it runs, not that it learns: the demo model's evaluation is that); the folder,
    stored as float16, is half the size and gives the network's posteriors within float16's rounding."""
    import torch

    from spinecohort.labeling_net import load_labeling_model, write_labeling_model

    examples = training_examples(ribbed_t13, size=(32, 32, 32), resolution=[3.0, 3.0, 4.4])
    net, losses = train_labeling_network(examples, epochs=2, batch_size=8, device="cpu")
    assert len(losses) == 2 and all(np.isfinite(losses))
    checkpoint = export_labeling_model(net, tmp_path / "half", size=(32, 32, 32), resolution=[3.0, 3.0, 4.4], name="test")
    full = write_labeling_model(tmp_path / "full", net, final_size=(32, 32, 32), resolution_range=[3.0, 3.0, 4.4])
    assert 0.45 < checkpoint.stat().st_size / full.stat().st_size < 0.55
    loaded = load_labeling_model(tmp_path / "half")
    assert loaded.final_size == (32, 32, 32) and loaded.config["resolution_range"] == [3.0, 3.0, 4.4]
    x = torch.from_numpy(examples.cutouts[:8])
    ours = loaded.posteriors(x)
    with torch.inference_mode():
        theirs = net(x[:, None])
    assert set(ours) == set(HEADS)
    assert max(float((ours[h] - theirs[h]).abs().max()) for h in HEADS) < 0.02
