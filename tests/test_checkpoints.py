"""Checkpoints are read without running code from them (issue 8, safety)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from spinecohort.checkpoints import CheckpointError, load_checkpoint, load_lightning_checkpoint
from spinecohort.semantic import FoldPredictor, ModelError, read_model_config

DEMO_SEMANTIC = Path(__file__).resolve().parents[1] / "resources" / "demo_models" / "semantic"


class Payload:
    """Unpickling this calls torch.save, which writes `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (torch.save, ("code ran", str(self.marker)))


def test_lightning_checkpoints_keep_tensors_and_stub_everything_else(tmp_path: Path):
    marker = tmp_path / "marker"
    weights = {"network.w": torch.arange(6.0).reshape(2, 3)}
    torch.save({"state_dict": weights, "hyper_parameters": {"opt": Payload(marker)}, "epoch": 3}, tmp_path / "x.ckpt")

    with pytest.raises(CheckpointError, match="x.ckpt: refused"):
        load_checkpoint(tmp_path / "x.ckpt")
    loaded = load_lightning_checkpoint(tmp_path / "x.ckpt")
    assert torch.equal(loaded["state_dict"]["network.w"], weights["network.w"]) and loaded["epoch"] == 3
    assert not marker.exists()


def test_a_semantic_fold_with_code_in_its_checkpoint_is_refused(tmp_path: Path):
    model = tmp_path / "model"
    shutil.copytree(DEMO_SEMANTIC, model)
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    content = load_checkpoint(checkpoint)
    marker = tmp_path / "marker"
    torch.save({**content, "extra": Payload(marker)}, checkpoint)

    with pytest.raises(ModelError, match="checkpoint_final.pth: refused"):
        FoldPredictor(read_model_config(model), 0, device="cpu")
    assert not marker.exists()
    FoldPredictor(read_model_config(model), 1, device="cpu")  # the untouched folds still load
