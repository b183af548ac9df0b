"""Training the vertebra-instance U-Net on cutouts of reference masks (SPINEPS supplement A).

Each vertebra of a reference gives one cutout, centred exactly as inference
centres it (on its body, see `instances.cutout_predictions`); the targets are
1 for the vertebra above, 2 for the vertebra itself and 3 for the one below,
on vertebra voxels only. Training is a plain PyTorch loop: AdamW, cross
entropy, learning rate falling linearly per epoch (1e-4 to 1e-6 in the paper).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import ndimage

from . import geometry, io
from . import labels as L
from .augment import AugmentConfig, augment
from .instances import _window, network_input, walk_to_foreground

__all__ = ["Cutout", "linear_lr", "reference_cutouts", "table_cutouts", "train_instance_network", "export_instance_model"]

log = logging.getLogger("spinecohort")


@dataclass(frozen=True)
class Cutout:
    seg: NDArray[np.uint8]  # semantic ids, (P, I, R)
    target: NDArray[np.uint8]  # 0 / 1 above / 2 centre / 3 below


def linear_lr(epoch: int, epochs: int, start: float, end: float) -> float:
    """Learning rate of `epoch` (0-based): `start` at the first epoch, `end` at the last, linear between.

    >>> linear_lr(0, 300, 1e-4, 1e-6), round(linear_lr(299, 300, 1e-4, 1e-6), 12)
    (0.0001, 1e-06)
    """
    if epochs <= 1:
        return start
    return start + (end - start) * epoch / (epochs - 1)


def _column_order(instance: NDArray[np.integer]) -> list[int]:
    """Vertebra instance ids (not IVDs, endplates) from top to bottom, by centroid along I."""
    ids = [int(v) for v in np.unique(instance) if 0 < v < L.IVD_OFFSET]
    centroids = ndimage.center_of_mass(instance > 0, instance, ids)  # one pass for all ids
    return [v for _, v in sorted((c[1], v) for c, v in zip(centroids, ids))]


def reference_cutouts(seg: NDArray[np.integer], instance: NDArray[np.integer], size: Sequence[int], *, min_corpus: int = 100) -> Iterator[Cutout]:
    """One training cutout per vertebra whose body has at least `min_corpus` voxels (model grid, (P, I, R))."""
    vertebra = network_input(seg) > 0
    order = _column_order(np.where(vertebra, instance, 0))
    for k, v in enumerate(order):
        body = np.argwhere((seg == L.CORPUS) & (instance == v))
        if len(body) < min_corpus:
            continue
        origin = walk_to_foreground(seg, body.mean(axis=0)) - np.array(size) // 2
        target = np.zeros(seg.shape, np.uint8)
        for value, neighbour in ((1, k - 1), (2, k), (3, k + 1)):
            if 0 <= neighbour < len(order):
                target[vertebra & (instance == order[neighbour])] = value
        yield Cutout(_window(seg.astype(np.uint8), origin, size), _window(target, origin, size))


def table_cutouts(
    table: pd.DataFrame, *, orientation: Sequence[str], spacing: Sequence[float], size: Sequence[int], min_corpus: int = 100
) -> list[Cutout]:
    """Cutouts of every reference pair in a (checked) training manifest, on the instance model's grid."""
    cutouts: list[Cutout] = []
    for row in table.itertuples(index=False):
        seg, affine = io.load_mask(row.reference_semantic)
        instance, inst_affine = io.load_mask(row.reference_instance)
        if problem := geometry.geometry_mismatch(row.reference_semantic, seg.shape, affine, row.reference_instance, instance.shape, inst_affine):
            raise ValueError(problem)
        grid = geometry.target_grid(seg.shape, affine, orientation, spacing)
        seg_m = geometry.resample(seg, affine, grid, kind="nearest")
        inst_m = geometry.resample(instance, affine, grid, kind="nearest")
        cutouts += list(reference_cutouts(seg_m, inst_m, size, min_corpus=min_corpus))
    return cutouts


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[NDArray[np.int64]]:
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def train_instance_network(
    cutouts: Sequence[Cutout], *, epochs: int, batch_size: int = 2, lr: tuple[float, float] = (1e-4, 1e-6), dim: int = 16,
    augmentation: AugmentConfig | None = None, seed: int = 0, device: str = "auto", max_steps_per_epoch: int | None = None,
):  # fmt: skip
    """Train an `InstanceUNet` on the cutouts; returns the network (on the CPU) and the per-epoch mean losses."""
    augmentation = augmentation if augmentation is not None else AugmentConfig()
    import torch

    from .instance_net import InstanceUNet
    from .semantic import pick_device

    if not cutouts:
        raise ValueError("no training cutouts: no reference vertebra has a body large enough")
    dev = pick_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = InstanceUNet(dim=dim).to(dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr[0])
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = linear_lr(epoch, epochs, *lr)
        net.train()
        epoch_losses, start = [], time.perf_counter()
        for step, idx in enumerate(_batches(len(cutouts), batch_size, rng)):
            if max_steps_per_epoch is not None and step >= max_steps_per_epoch:
                break
            pairs = [augment(cutouts[i].seg, cutouts[i].target, rng, augmentation) for i in idx]
            x = np.stack([network_input(s) for s, _ in pairs])
            onehot = torch.from_numpy(x).long().to(dev)
            onehot = torch.nn.functional.one_hot(onehot, 10).permute(0, 4, 1, 2, 3).float()
            y = torch.from_numpy(np.stack([t for _, t in pairs]).astype(np.int64)).to(dev)
            loss = loss_fn(net(onehot), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_losses.append(float(loss.detach()))
        losses.append(float(np.mean(epoch_losses)))
        log.info("epoch %d/%d: lr %.3g, loss %.4f, %.1f s", epoch + 1, epochs, optimizer.param_groups[0]["lr"], losses[-1], time.perf_counter() - start)
    return net.cpu().eval(), losses


def export_instance_model(
    net, out: str | Path, *, spacing: Sequence[float], cutout: Sequence[int], name: str, epochs: int, lr: tuple[float, float],
    final_loss: float,
) -> Path:  # fmt: skip
    """A SPINEPS-format instance model folder (Lightning-layout weights + inference_config.json) that SPINEPS 2.1.3 loads."""
    from .instance_net import save_instance_checkpoint
    from .models import instance_inference_config

    out = Path(out)
    with io.atomic_path(out / "instance_weights.ckpt") as tmp:
        save_instance_checkpoint(tmp, net, epochs=epochs, lr=lr, final_loss=float(final_loss))
    io.write_json(out / "inference_config.json", instance_inference_config(spacing=spacing, cutout=cutout, name=name))
    return out
