"""The instance U-Net loads SPINEPS checkpoints: compared with the reference class from the `spineps` wheel."""

import importlib.util
import pickle
from pathlib import Path

import pytest
import torch

from spinecohort.instance_net import InstanceUNet, load_instance_checkpoint, save_instance_checkpoint


def spineps_unet3d():
    """spineps/architectures/unet3D.py, loaded on its own: the package's __init__ pulls TPTBox, ANTs, Lightning …"""
    spec = importlib.util.find_spec("spineps")
    if spec is None:
        pytest.fail("the spineps wheel is a test dependency: pip install --no-deps spineps==2.1.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "architectures" / "unet3D.py"
    module_spec = importlib.util.spec_from_file_location("spineps_unet3d_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.Unet3D


class TrainingOptions:
    """Something a Lightning checkpoint pickles in its hyper-parameters (must not be needed to load)."""

    def __init__(self):
        self.n_epoch = 300

    def __reduce__(self):  # would run code on a plain unpickle
        return (print, ("unpickling ran code",))


def lightning_checkpoint(path: Path, network: torch.nn.Module) -> None:
    state = {f"network.{k}": v for k, v in network.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"opt": TrainingOptions(), "do2D": False},
                "pytorch-lightning_version": "2.1.0", "epoch": 299}, path)


def test_our_network_reproduces_the_spineps_reference_from_its_checkpoint(tmp_path: Path, capfd):
    torch.manual_seed(0)
    reference = spineps_unet3d()(dim=16, dim_mults=(1, 2, 4, 8), out_dim=4, channels=10).eval()
    lightning_checkpoint(tmp_path / "instance_weights.ckpt", reference)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "instance_weights.ckpt", weights_only=True)  # the case the safe loader exists for

    ours = InstanceUNet().eval()
    state = load_instance_checkpoint(tmp_path / "instance_weights.ckpt")
    ours.load_state_dict(state, strict=True)  # every name and shape matches
    assert "unpickling ran code" not in capfd.readouterr().out

    x = torch.rand(2, 10, 16, 24, 8)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert got.shape == (2, 4, 16, 24, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_our_checkpoints_load_into_the_reference(tmp_path: Path):
    ours = InstanceUNet(dim=8).eval()
    save_instance_checkpoint(tmp_path / "w_weights.ckpt", ours)
    reference = spineps_unet3d()(dim=8, dim_mults=(1, 2, 4, 8), out_dim=4, channels=10).eval()
    state = torch.load(tmp_path / "w_weights.ckpt", weights_only=True)["state_dict"]
    reference.load_state_dict({k.removeprefix("network."): v for k, v in state.items()}, strict=True)
    x = torch.rand(1, 10, 8, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-6)


def test_sizes_not_divisible_by_eight_are_refused():
    with pytest.raises(ValueError, match="divisible by 8"):
        InstanceUNet(dim=8)(torch.zeros(1, 10, 8, 12, 8))
