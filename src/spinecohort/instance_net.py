"""The vertebra-instance 3-D U-Net, state-dict compatible with SPINEPS instance checkpoints.

Architecture (from the SPINEPS model description; our own code): a 7^3 stem
convolution to `dim` channels; an encoder of levels with widths
dim x (1, 2, 4, 8), each two residual blocks and, except the deepest, a strided
4^3 convolution; two residual blocks in the middle; a mirrored decoder whose
skip connections are *averaged* in, upsampling with transposed 4^3
convolutions; the stem features concatenated back in, one residual block and a
1^3 convolution to the 4 classes (background, vertebra above, centre, below).
A residual block is two (3^3 conv, GroupNorm(8), LeakyReLU) with a 1^3
convolution on the skip path when the width changes.

Parameter names follow the checkpoint layout, so a Lightning checkpoint's
``state_dict`` (keys prefixed ``network.``) loads directly; Lightning is not needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .checkpoints import load_lightning_checkpoint

__all__ = ["InstanceUNet", "NetworkPredictor", "infer_dim", "load_instance_checkpoint", "save_instance_checkpoint", "spineps_hyper_parameters"]


class _ConvNormAct(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, c_out)
        self.act = nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class _Residual(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int = 8) -> None:
        super().__init__()
        self.block1 = _ConvNormAct(c_in, c_out, groups)
        self.block2 = _ConvNormAct(c_out, c_out, groups)
        self.res_conv = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x)) + self.res_conv(x)


class InstanceUNet(nn.Module):
    """SPINEPS-layout U-Net: `in_channels` one-hot labels in, `out_channels` class logits out.

    Spatial sizes must be divisible by 2 ** (len(multipliers) - 1).
    """

    def __init__(self, dim: int = 16, multipliers: Sequence[int] = (1, 2, 4, 8), in_channels: int = 10,
                 out_channels: int = 4, groups: int = 8) -> None:
        super().__init__()
        widths = [dim, *(dim * m for m in multipliers)]
        pairs = list(zip(widths[:-1], widths[1:]))
        self.init_conv = nn.Conv3d(in_channels, dim, 7, padding=3)
        self.downs = nn.ModuleList(
            nn.ModuleList([_Residual(a, b, groups), _Residual(b, b, groups),
                           nn.Conv3d(b, b, 4, 2, 1) if k < len(pairs) - 1 else nn.Identity()])
            for k, (a, b) in enumerate(pairs)
        )
        self.mid_block1 = _Residual(widths[-1], widths[-1], groups)
        self.mid_block2 = _Residual(widths[-1], widths[-1], groups)
        self.ups = nn.ModuleList(
            nn.ModuleList([_Residual(b, a, groups), _Residual(a, a, groups),
                           nn.ConvTranspose3d(a, a, 4, 2, 1) if k < len(pairs) - 1 else nn.Identity()])
            for k, (a, b) in enumerate(reversed(pairs))
        )
        self.final_res_block = _Residual(2 * dim, dim, groups)
        self.final_conv = nn.Conv3d(dim, out_channels, 1)
        self.factor = 2 ** (len(pairs) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.factor for s in x.shape[-3:]):
            raise ValueError(f"cutout size {tuple(x.shape[-3:])} must be divisible by {self.factor}")
        x = self.init_conv(x)
        stem = x
        skips = []
        for block1, block2, down in cast(Iterable[tuple[nn.Module, nn.Module, nn.Module]], self.downs):
            x = block2(block1(x))
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_block1(x))
        for block1, block2, up in cast(Iterable[tuple[nn.Module, nn.Module, nn.Module]], self.ups):
            x = up(block2(block1(0.5 * (x + skips.pop()))))
        return self.final_conv(self.final_res_block(torch.cat((x, stem), dim=1)))


def load_instance_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The network's state dict from a SPINEPS/Lightning checkpoint (``network.`` prefix removed), without Lightning.

    Read without running code from the file (`checkpoints.load_lightning_checkpoint`).
    """
    ckpt = load_lightning_checkpoint(path, map_location=map_location)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    prefix = "network."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or dict(state)


def spineps_hyper_parameters(net: InstanceUNet, *, epochs: int, lr: tuple[float, float]) -> dict[str, Any]:
    """What SPINEPS 2.1.3's Lightning loader rebuilds the network from (`PLNet(**hyper_parameters)`): its
    width `dim`, `num_channels` (the 10-channel one-hot input), `do2D`, and the training options its
    constructor reads. Plain values only, so `torch.load(weights_only=True)` reads them too. Our loop
    has no explicit L2 term and no Dice loss (cross-entropy, AdamW), hence the zero weights."""
    return {
        "dim": int(net.init_conv.out_channels), "num_channels": 10, "do2D": False, "channelwise": True,
        "n_epoch": int(epochs), "lr": float(lr[0]), "lr_end_factor": float(lr[1] / lr[0]), "l2_reg_w": 0.0, "dsc_loss_w": 0.0,
    }  # fmt: skip


def save_instance_checkpoint(
    path: str | Path, net: InstanceUNet, *, epochs: int = 0, lr: tuple[float, float] = (1e-4, 1e-6), **extra: Any
) -> None:
    """Write `net` in the Lightning layout SPINEPS loads: {"state_dict": {"network.<name>": tensor},
    "hyper_parameters": `spineps_hyper_parameters` and `extra` (e.g. the final loss), ...}."""
    state = {f"network.{k}": v.detach().cpu() for k, v in net.state_dict().items()}
    hyper = {**spineps_hyper_parameters(net, epochs=epochs, lr=lr), **extra}
    torch.save({"state_dict": state, "hyper_parameters": hyper, "pytorch-lightning_version": "2.0.0"}, path)


def infer_dim(state: dict[str, torch.Tensor]) -> int:
    """Base width of a checkpoint's network: the stem convolution's output channels."""
    return int(state["init_conv.weight"].shape[0])


class NetworkPredictor:
    """The instance U-Net as an `instances.Predictor`: batched forward pass, argmax over the 4 classes."""

    def __init__(self, checkpoint: str | Path, *, device: torch.device) -> None:
        state = load_instance_checkpoint(checkpoint, map_location="cpu")
        self.net = InstanceUNet(dim=infer_dim(state))
        self.net.load_state_dict(state, strict=True)
        self.net.to(device).eval()
        self.device = device

    def __call__(self, onehot, origins):  # noqa: ARG002 - the network needs no positions
        with torch.inference_mode():
            logits = self.net(torch.from_numpy(onehot).to(self.device))
        return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
