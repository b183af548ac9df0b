"""Labelling model folders load or fail with one clear line; the model's ids take precedence as stated (issue 38).

Parity of the cutouts, posteriors and ids with SPINEPS itself: tests/test_spineps_labeling.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spinecohort.labeling import apply_model
from spinecohort.labeling_net import LabelingModelError, LabelingNet, load_labeling_model
from spinecohort.subject_levels import Station, SubjectLevels

CONFIG = {"modeltype": "classifier", "model_expected_orientation": ["P", "I", "R"], "resolution_range": [1.0, 1.0, 2.0]}
HEADS = {"REGION": 3, "VERT": 24, "FULLYVISIBLE": 2}


class Options:
    """Stands for SPINEPS's pickled ARGS_MODEL: loading must not run it, only read its data."""

    def __init__(self, **values):
        self.__dict__.update(values)


def write_model(folder: Path, *, config: dict | None = None, opt: Options | None = None, seed: int = 0) -> LabelingNet:
    """A small DenseNet labelling model in SPINEPS's folder layout (our classes; SPINEPS's own: the interop test)."""
    torch.manual_seed(seed)
    net = LabelingNet((2, 2), HEADS, stem=8, growth=4, bottleneck=8)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "inference_config.json").write_text(json.dumps(config or CONFIG))
    hyper = {"opt": opt or Options(backbone="DENSENET121", final_size=(32, 32, 32)), "group_2_n_channel": HEADS}
    torch.save(
        {"state_dict": net.state_dict(), "hyper_parameters": hyper},
        folder / "checkpoints" / "epoch=3-val_f1=0.9_valf1-weights.ckpt",
    )
    return net.eval()


def test_a_model_folder_loads_with_its_architecture_read_from_its_weights(tmp_path: Path):
    net = write_model(tmp_path / "m")
    model = load_labeling_model(tmp_path / "m")
    assert model.final_size == (32, 32, 32) and model.orientation == "PIR"
    assert dict(model.net.classification_heads.items()).keys() == HEADS.keys()
    x = torch.randn(3, 32, 32, 32)
    with torch.inference_mode():
        expected = net(x[:, None])
    got = model.posteriors(x, batch=3)
    assert all(torch.equal(got[h], expected[h]) for h in HEADS)  # the weights loaded, each where it belongs
    in_twos = model.posteriors(x, batch=2)
    assert all(torch.allclose(in_twos[h], expected[h], atol=1e-6) for h in HEADS)
    assert got["VERT"].shape == (3, 24) and torch.allclose(got["VERT"].sum(1), torch.ones(3))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: (f / "inference_config.json").write_text(json.dumps({**CONFIG, "modeltype": "unet"})), "modeltype is 'unet'"),
        (lambda f: (f / "inference_config.json").write_text(json.dumps({"modeltype": "classifier"})), "no resolution_range"),
        (lambda f: [p.unlink() for p in f.glob("checkpoints/*")], "no checkpoint matches"),
        (lambda f: (f / "inference_config.json").write_text("{"), "cannot read inference_config.json"),
    ],
    ids=["not a classifier", "no resolution", "no checkpoint", "broken config"],
)
def test_a_broken_folder_fails_in_one_line_naming_it(tmp_path: Path, change, message):
    write_model(tmp_path / "m")
    change(tmp_path / "m")
    with pytest.raises(LabelingModelError, match=message) as error:
        load_labeling_model(tmp_path / "m")
    assert str(tmp_path / "m") in str(error.value) and "\n" not in str(error.value)


def test_a_model_that_rotates_its_cutouts_is_refused(tmp_path: Path):
    write_model(tmp_path / "m", opt=Options(final_size=(32, 32, 32), ds_name="sagittal_v4corpus_npz"))
    with pytest.raises(LabelingModelError, match="rotated cutouts"):
        load_labeling_model(tmp_path / "m")


def station(image_id: str, region: str, mode: str, ids: tuple[int, ...]) -> Station:
    return Station(image_id, region, mode, ids, np.zeros((len(ids), 3)), np.ones(len(ids), bool), before_top=ids[0] - 1)


def test_the_models_ids_stand_and_a_disagreement_is_written_down():
    thoracic = station("t", "thoracic", "count", (2, 3, 4))
    lumbar = station("l", "lumbar", "sacrum", (20, 21, 22))
    result = SubjectLevels(modes={"t": "subject", "l": "sacrum"}, reasons={"t": "", "l": ""},
                           maps={"t": {1: 16, 2: 17, 3: 18, 4: 19}}, levels={"t": [17, 18, 19], "l": [20, 21, 22]},
                           whole_spine={"t": np.zeros(3), "l": np.zeros(3)})  # fmt: skip
    apply_model(result, [thoracic, lumbar], {"t": {2: 17, 3: 18, 4: 19}, "l": {20: 19, 21: 28, 22: 20}})
    assert result.modes == {"t": "model", "l": "model"}
    assert result.maps["t"] == {1: 16, 2: 17, 3: 18, 4: 19} and result.reasons["t"] == ""  # agrees: nothing to say
    assert result.maps["l"] == {19: 18, 20: 19, 21: 28, 22: 20}  # T12 T13 L1; the IVD above the top follows T11
    assert result.reasons["l"] == "labelling model T12-L1 and sacrum numbering L1-L3 differ: the model's ids stand"
    assert result.whole_spine == {} and "not stitched" in result.note


def test_a_station_the_model_named_only_in_part_keeps_its_own_numbering():
    cervical = station("c", "cervical", "C2", (2, 3, 4))
    result = SubjectLevels(modes={"c": "C2"}, reasons={"c": ""}, levels={"c": [2, 3, 4]})
    apply_model(result, [cervical], {"c": {2: 3, 3: 4}})
    assert result.modes == {"c": "C2"} and "c" not in result.maps
    assert result.reasons["c"] == "the labelling model named 2 of its 3 vertebrae: C2 numbering kept"
