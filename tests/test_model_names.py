"""Models by SPINEPS's names (issue 40): `t2w`, `instance`, `t2w_labeling` in $SPINEPS_SEGMENTOR_MODELS.

SPINEPS's own resolver is asked for the same folders in tests/test_spineps_labeling.py (interop), where the
workflow also runs with the names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spinecohort.model_names import MODELS_VARIABLE, RELEASES, ModelNameError, local_models, resolve

DEMO = Path(__file__).resolve().parents[1] / "resources" / "demo_models"


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """A models folder as SPINEPS 2.1.3's downloader leaves it: the demo models under the release folder names."""
    root = tmp_path / "models"
    root.mkdir()
    (root / RELEASES["semantic"]["t2w"]).symlink_to(DEMO / "semantic")
    shutil.copytree(DEMO / "instance", root / RELEASES["instance"]["instance"])
    return root


def test_release_names_resolve_to_the_folders_spinepss_downloader_unpacks_into(models: Path):
    env = {MODELS_VARIABLE: str(models)}
    assert resolve("t2w", "semantic", env) == str(DEMO / "semantic")  # the link followed
    assert resolve("T2w_semantic", "semantic", env) == str(DEMO / "semantic")  # SPINEPS's alias, any case
    assert resolve("instance", "instance", env) == str(models / "instance_sagittal_v1.2.0")


def test_a_folder_is_a_folder_and_a_local_model_is_found_by_its_folder_name(models: Path, tmp_path: Path):
    assert resolve("./somewhere", "semantic", {}) == "./somewhere"
    assert resolve(str(tmp_path / "x"), "instance", {}) == str(tmp_path / "x")
    own = models / "lab" / "My_Semantic"
    shutil.copytree(DEMO / "semantic", own)
    assert resolve("my_semantic", "semantic", {MODELS_VARIABLE: str(models)}) == str(own)
    assert local_models(models)["instance"] == {"instance_sagittal_v1.2.0": models / "instance_sagittal_v1.2.0"}


def test_a_missing_name_says_what_the_models_folder_holds(models: Path):
    with pytest.raises(ModelNameError) as error:
        resolve("t2w_labeling", "labeling", {MODELS_VARIABLE: str(models)})
    assert str(error.value) == (
        f"labeling model 't2w_labeling': no folder of that name in ${MODELS_VARIABLE}={models} (SPINEPS 2.1.3 unpacks "
        "that release into T2w_labeling_v1.4.0). It holds semantic: t2w_semantic_v1.0.9; instance: instance_sagittal_v1.2.0; "
        "labeling: none"
    )  # fmt: skip


def test_a_model_of_another_kind_is_refused(models: Path):
    env = {MODELS_VARIABLE: str(models)}
    (models / RELEASES["labeling"]["t2w_labeling"]).symlink_to(DEMO / "semantic")
    with pytest.raises(ModelNameError, match="T2w_labeling_v1.4.0 is a semantic model"):
        resolve("t2w_labeling", "labeling", env)
    with pytest.raises(ModelNameError, match="instance_sagittal_v1.2.0 is a instance model"):
        resolve("instance_sagittal_v1.2.0", "semantic", env)


def test_names_without_the_variable_or_with_a_wrong_one_fail_in_one_line(tmp_path: Path):
    with pytest.raises(ModelNameError, match=r"is a SPINEPS model name, but \$SPINEPS_SEGMENTOR_MODELS is not set"):
        resolve("t2w", "semantic", {})
    with pytest.raises(ModelNameError, match="is not a folder"):
        resolve("t2w", "semantic", {MODELS_VARIABLE: str(tmp_path / "absent")})


def test_a_broken_config_is_skipped_as_spineps_skips_it(models: Path):
    (models / "broken").mkdir()
    (models / "broken" / "inference_config.json").write_text("{not json")
    assert "broken" not in {name for names in local_models(models).values() for name in names}
    assert json.loads((DEMO / "instance" / "inference_config.json").read_text())["modality"] == "SEG"
