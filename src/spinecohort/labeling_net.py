"""The labeling network of a SPINEPS labeling model folder, loaded without Lightning, MONAI or pickled code.

A SPINEPS 2.x labeling model (VERIDAH, release `t2w_labeling`) is a 3-D DenseNet (MONAI's layout: 121 or 169
layers) whose classification layer is replaced by one head per target, each Linear(features -> features/2),
ReLU, Linear(-> classes). Our own modules carry the checkpoint's parameter names (`net.features...`,
`classification_heads.<HEAD>...`), so its `state_dict` loads as it is; the architecture is read from the
weights' names and shapes (layers per block, widths, heads), not from the pickled hyper-parameters, of which
only `final_size` (the cutout size) is used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from .checkpoints import load_lightning_checkpoint

CHECKPOINT_PATTERN: Final = "**/*val_f1=*valf1-weights.ckpt"  # SPINEPS's glob; the last in sorted order is used
DEFAULT_FINAL_SIZE: Final = (152, 168, 32)  # SPINEPS's cutout size when the checkpoint names none


class LabelingModelError(ValueError):
    """A labeling model folder that cannot be used; the message names the folder and the reason."""


class _DenseLayer(nn.Module):
    def __init__(self, c_in: int, bottleneck: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential()
        self.layers.add_module("norm1", nn.BatchNorm3d(c_in))
        self.layers.add_module("relu1", nn.ReLU())
        self.layers.add_module("conv1", nn.Conv3d(c_in, bottleneck, 1, bias=False))
        self.layers.add_module("norm2", nn.BatchNorm3d(bottleneck))
        self.layers.add_module("relu2", nn.ReLU())
        self.layers.add_module("conv2", nn.Conv3d(bottleneck, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layers(x)], 1)


class DenseNet3D(nn.Module):
    """A 3-D DenseNet feature extractor with MONAI's parameter names: stem (7^3 conv, stride 2; 3^3 max-pool,
    stride 2), dense blocks joined by transitions (BN, ReLU, 1^3 conv halving the width, 2^3 average pool), a
    final BN, then ReLU and global average pooling to one feature vector per image."""

    def __init__(self, blocks: tuple[int, ...], stem: int = 64, growth: int = 32, bottleneck: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv3d(1, stem, 7, stride=2, padding=3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm3d(stem))
        self.features.add_module("relu0", nn.ReLU())
        self.features.add_module("pool0", nn.MaxPool3d(3, stride=2, padding=1))
        width = stem
        for b, layers in enumerate(blocks, start=1):
            block = nn.Sequential()
            for k in range(1, layers + 1):
                block.add_module(f"denselayer{k}", _DenseLayer(width, bottleneck, growth))
                width += growth
            self.features.add_module(f"denseblock{b}", block)
            if b < len(blocks):
                transition = nn.Sequential()
                transition.add_module("norm", nn.BatchNorm3d(width))
                transition.add_module("relu", nn.ReLU())
                transition.add_module("conv", nn.Conv3d(width, width // 2, 1, bias=False))
                transition.add_module("pool", nn.AvgPool3d(2, stride=2))
                self.features.add_module(f"transition{b}", transition)
                width //= 2
        self.features.add_module("norm5", nn.BatchNorm3d(width))
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool3d(torch.relu(self.features(x)), 1), 1)


class LabelingNet(nn.Module):
    """Backbone and heads; `forward` gives each head's softmax posteriors, (batch, classes)."""

    def __init__(
        self, blocks: tuple[int, ...], heads: dict[str, int], stem: int = 64, growth: int = 32, bottleneck: int = 128
    ) -> None:
        super().__init__()
        self.net = DenseNet3D(blocks, stem, growth, bottleneck)
        width = self.net.width
        self.classification_heads = nn.ModuleDict(
            {name: nn.Sequential(nn.Linear(width, width // 2), nn.ReLU(), nn.Linear(width // 2, n)) for name, n in heads.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.net(x)
        return {name: torch.softmax(head(features), dim=1) for name, head in self.classification_heads.items()}


def architecture(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The network's shape from its weights: dense layers per block, stem, growth and bottleneck widths, heads."""
    layers: dict[int, int] = {}
    for key in state:
        if m := re.match(r"net\.features\.denseblock(\d+)\.denselayer(\d+)\.", key):
            layers[int(m[1])] = max(layers.get(int(m[1]), 0), int(m[2]))
    heads = {m[1]: int(state[key].shape[0]) for key in state if (m := re.match(r"classification_heads\.(\w+)\.2\.weight$", key))}
    if not layers or not heads or "net.features.conv0.weight" not in state:
        raise ValueError("not a DenseNet with classification heads (SPINEPS's DENSENET121/169 labeling layout)")
    first = "net.features.denseblock1.denselayer1.layers."
    return {"blocks": tuple(layers[b] for b in sorted(layers)), "heads": heads, "stem": int(state["net.features.conv0.weight"].shape[0]),
            "growth": int(state[first + "conv2.weight"].shape[0]), "bottleneck": int(state[first + "conv1.weight"].shape[0])}  # fmt: skip


@dataclass
class LabelingModel:
    """A loaded labeling model: its network (eval mode), config and cutout size."""

    folder: Path
    config: dict[str, Any]
    net: LabelingNet
    final_size: tuple[int, int, int]
    device: torch.device

    @property
    def orientation(self) -> str:
        return "".join(self.config.get("model_expected_orientation", ["P", "I", "R"]))

    @torch.inference_mode()
    def posteriors(self, cutouts: torch.Tensor, batch: int = 4) -> dict[str, torch.Tensor]:
        """Each head's posteriors for cutouts (n, X, Y, Z), float32 on the CPU."""
        parts: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(cutouts), batch):
            x = cutouts[start : start + batch, None].to(self.device)
            parts.append({k: v.float().cpu() for k, v in self.net(x).items()})
        return {k: torch.cat([p[k] for p in parts]) for k in self.net.classification_heads}


def _checkpoint(folder: Path) -> Path:
    found = sorted(folder.glob(CHECKPOINT_PATTERN))
    if not found:
        raise LabelingModelError(f"labeling model {folder}: no checkpoint matches {CHECKPOINT_PATTERN}")
    return found[-1]


def read_labeling_config(folder: str | Path) -> dict[str, Any]:
    """The folder's `inference_config.json`, checked to be a SPINEPS classifier."""
    folder = Path(folder)
    path = folder / "inference_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LabelingModelError(f"labeling model {folder}: cannot read inference_config.json ({exc})") from None
    if config.get("modeltype") != "classifier":
        raise LabelingModelError(
            f"labeling model {folder}: modeltype is {config.get('modeltype')!r}, a labeling model is 'classifier'"
        )
    if len(config.get("resolution_range") or []) not in (2, 3):
        raise LabelingModelError(
            f"labeling model {folder}: inference_config.json has no resolution_range (a triple or a [min, max] pair)"
        )
    return config


def load_labeling_model(folder: str | Path, device: str | torch.device = "cpu") -> LabelingModel:
    """Load a SPINEPS labeling model folder as released (no code in the checkpoint runs)."""
    folder = Path(folder)
    config = read_labeling_config(folder)
    checkpoint = _checkpoint(folder)
    content = load_lightning_checkpoint(checkpoint)
    state = content.get("state_dict", {})
    try:
        shape = architecture(state)
    except ValueError as exc:
        raise LabelingModelError(f"labeling model {checkpoint}: {exc}") from None
    opt = (content.get("hyper_parameters") or {}).get("opt")
    if getattr(opt, "classification_conv", False):
        raise LabelingModelError(f"labeling model {checkpoint}: convolutional heads (classification_conv) are not supported")
    if "v4corpus" in (
        ds_name := str(getattr(opt, "ds_name", ""))
    ):  # SPINEPS rotates such a model's cutouts; the release does not
        raise LabelingModelError(f"labeling model {checkpoint}: rotated cutouts (ds_name {ds_name}) are not supported")
    final_size = tuple(int(v) for v in getattr(opt, "final_size", None) or DEFAULT_FINAL_SIZE)
    net = LabelingNet(**shape)
    state = {k: v for k, v in state.items() if not k.startswith("net.class_layers.")}  # parameter-free after the cut
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise LabelingModelError(f"labeling model {checkpoint}: weights do not fit ({str(exc).splitlines()[0]})") from None
    dev = torch.device(device)
    return LabelingModel(folder, config, net.to(dev).eval(), final_size, dev)  # type: ignore[arg-type]


# MONAI's DenseNet names by their dense layers per block: what SPINEPS's `opt.backbone` must say to rebuild one.
BACKBONES: Final = {(6, 12, 24, 16): "DENSENET121", (6, 12, 32, 32): "DENSENET169"}


def write_labeling_model(
    folder: str | Path,
    net: LabelingNet,
    *,
    final_size: tuple[int, int, int] = DEFAULT_FINAL_SIZE,
    resolution_range: list | None = None,
    name: str = "T2w_labeling_spinecohort",
    half: bool = False,
) -> Path:
    """Write `net` as a SPINEPS labelling model folder that SPINEPS 2.1.3 and `load_labeling_model` both load:
    `inference_config.json` and `checkpoints/...val_f1=...valf1-weights.ckpt`. The hyper-parameters are an
    `argparse.Namespace` (a standard-library class, so SPINEPS's Lightning loader needs none of ours); only the
    two released DenseNet layouts can be written, as only those are what SPINEPS rebuilds. `half` stores the
    floating-point tensors as float16 (half the size; both loaders cast them back into the float32 network)."""
    import argparse

    shape = architecture(net.state_dict())
    blocks, heads = shape["blocks"], shape["heads"]
    if blocks not in BACKBONES:
        raise ValueError(f"SPINEPS rebuilds DenseNet121 or 169 only; this network's blocks are {blocks}")
    opt = argparse.Namespace(backbone=BACKBONES[blocks], classification_conv=False, classification_linear=True, in_channel=1,
                             not_pretrained=True, num_classes=sum(heads.values()), mse_weighting=0.0, l2_regularization_w=1e-6,
                             dropout=0.05, final_size=tuple(final_size), ds_name="spinecohort")  # fmt: skip
    folder = Path(folder)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    config = {"log_name": name, "modality": "T2w", "acquisition": "sag", "modeltype": "classifier",
              "model_expected_orientation": ["P", "I", "R"], "available_folds": 1, "inference_augmentation": False,
              "resolution_range": resolution_range or [[0.75, 0.75, 1.65], [1.0, 1.0, 4.0]], "default_step_size": 0.5,
              "labels": {}, "expected_inputs": ["img"]}  # fmt: skip
    checkpoint = folder / "checkpoints" / "epoch=0-val_f1=0.0000_valf1-weights.ckpt"
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"opt": opt, "group_2_n_channel": heads},
                "pytorch-lightning_version": "2.6.6", "epoch": 0, "global_step": 0}, checkpoint)  # fmt: skip
    (folder / "inference_config.json").write_text(json.dumps(config, indent=1) + "\n")  # last: the folder is complete
    return checkpoint


def random_labeling_net(
    *, backbone: str = "DENSENET169", heads: dict[str, int] | None = None, scale: float = 1.0, seed: int = 0
) -> LabelingNet:
    """A labelling network of random weights in a released layout; `scale` multiplies the heads' last layers
    (posteriors of random heads are nearly flat; tests and benchmarks want them peaked)."""
    from .label_search import HEAD_SIZES

    torch.manual_seed(seed)
    blocks = next(b for b, n in BACKBONES.items() if n == backbone)
    net = LabelingNet(blocks, heads or dict(HEAD_SIZES))
    with torch.no_grad():
        for name, value in net.named_parameters():
            if name.startswith("classification_heads.") and ".2." in name:
                value.mul_(scale)
    return net.eval()
