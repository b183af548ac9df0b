"""Training a labelling model (SPINEPS's VERIDAH heads) on cutouts of reference vertebrae (issue 39).

Each reference vertebra with a body gives one cutout, made exactly as inference makes it (`labeling.station_cutouts`:
the raw image, the masks' crop, the model's orientation and resolution). Its targets come from the reference's ids
and the subject's column (every station's reference together):

- REGION: cervical / thoracic / lumbar (T13 thoracic, L6 lumbar: what the ribs say);
- VERT: 24 classes, T13 as T12 and L6 as L5 (SPINEPS's 24-class head; the search names the repeats);
- VERTREL: last cervical, first and last thoracic, first and last lumbar of the subject's column (the last thoracic
  is T11, T12 or T13, the last lumbar L5 or L6), else none;
- VERTT13: the vertebra is a 13th thoracic one;
- FULLYVISIBLE: its body is clear of the station's in-plane border (`subject_levels.station_vertebrae`).

Augmentations keep levels meaningful: a gain, Gaussian noise and a shift of a few voxels within the sagittal plane;
no flip or rotation that would change what lies above. A plain PyTorch loop: AdamW, the heads' cross entropies
summed, the learning rate falling linearly per epoch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from . import io
from . import labels as L

log = logging.getLogger("spinecohort")

HEADS: Final = {"REGION": 3, "VERT": 24, "VERTREL": 6, "VERTT13": 2, "FULLYVISIBLE": 2}  # what the search reads
ORIENTATION: Final = "PIR"  # SPINEPS's labelling orientation
MAX_SHIFT: Final = 2  # voxels, in P and I


@dataclass(frozen=True)
class Examples:
    """Cutouts (n, *size) and per head the target class of each."""

    cutouts: NDArray[np.float32]
    targets: dict[str, NDArray[np.int64]]

    def __len__(self) -> int:
        return len(self.cutouts)


def vertebra_targets(level: int, column: Sequence[int], whole: bool) -> dict[str, int]:
    """The heads' classes of a vertebra (its true id) in a subject's column (true ids, any order)."""
    from .label_search import class_names

    name = L.VERTEBRA_NAMES[level]
    names = {L.VERTEBRA_NAMES[k] for k in column}
    last_thoracic = max((n for n in names if n.startswith("T")), key=lambda n: int(n[1:]), default="")
    last_lumbar = max((n for n in names if n.startswith("L")), key=lambda n: int(n[1:]), default="")
    role = {"C7": 1, "T1": 2, last_thoracic: 3, "L1": 4, last_lumbar: 5}.get(name, 0)
    return {"REGION": "CTL".index(name[0]), "VERT": class_names(24).index({"T13": "T12", "L6": "L5"}.get(name, name)),
            "VERTREL": role, "VERTT13": int(name == "T13"), "FULLYVISIBLE": int(whole)}  # fmt: skip


def training_examples(table: pd.DataFrame, *, size: tuple[int, int, int], resolution: list) -> Examples:
    """The cutouts and targets of every reference in a (checked) training manifest."""
    from .labeling import station_cutouts, stored_type
    from .subject_levels import station_vertebrae

    cutouts: list[NDArray[np.float32]] = []
    rows: list[dict[str, int]] = []
    for _, stations in table.groupby(["subject", "session"], sort=False):
        masks = {r.image_id: (io.load_mask(r.reference_instance), io.load_mask(r.reference_semantic)[0]) for r in stations.itertuples()}
        column = sorted({int(k) for (inst, _), _ in masks.values() for k in np.unique(inst[L.vertebra_ids(inst)])})
        for r in stations.itertuples():
            (instance, affine), semantic = masks[r.image_id]
            found = station_cutouts(stored_type(r.image, io.load_image(r.image)[0]), affine, instance, semantic, orientation=ORIENTATION,
                                    resolution_range=resolution, size=size)  # fmt: skip
            seen = station_vertebrae(instance, semantic, affine, image_id=r.image_id, region=r.region, mode="count")
            whole = dict(zip(seen.ids, seen.whole))
            cutouts.extend(found.arrays)
            rows.extend(vertebra_targets(k, column, bool(whole.get(k, False))) for k in found.ids)
    if not rows:
        raise ValueError("no training cutouts: no reference vertebra has a body")
    return Examples(np.stack(cutouts), {h: np.array([r[h] for r in rows], np.int64) for h in HEADS})


def augmented(x: NDArray[np.float32], rng: np.random.Generator) -> NDArray[np.float32]:
    """A cutout with a gain, noise and a shift of up to MAX_SHIFT voxels in P and I (zeros come in)."""
    out = np.zeros_like(x)
    dp, di = (int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, 2))
    src = (slice(max(dp, 0), x.shape[0] + min(dp, 0)), slice(max(di, 0), x.shape[1] + min(di, 0)))
    dst = (slice(max(-dp, 0), x.shape[0] + min(-dp, 0)), slice(max(-di, 0), x.shape[1] + min(-di, 0)))
    out[dst] = x[src]
    inside = out != 0
    out[inside] = out[inside] * rng.uniform(0.85, 1.15) + rng.normal(0, 0.05, int(inside.sum()))
    return out


def train_labeling_network(examples: Examples, *, epochs: int, batch_size: int = 8, lr: tuple[float, float] = (1e-3, 1e-5),
                           backbone: str = "DENSENET121", seed: int = 0, device: str = "auto"):  # fmt: skip
    """Train a `labeling_net.LabelingNet` (our heads) on the examples; returns it (CPU, eval mode) and per epoch the
    mean loss and the share of VERT answers right on the un-augmented cutouts of the last batch of steps."""
    import torch

    from .instance_training import _batches, linear_lr
    from .labeling_net import BACKBONES, LabelingNet
    from .semantic import pick_device

    dev = pick_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    blocks = next(b for b, name in BACKBONES.items() if name == backbone)
    net = LabelingNet(blocks, dict(HEADS)).to(dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr[0])
    nll = torch.nn.NLLLoss()
    losses: list[float] = []
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = linear_lr(epoch, epochs, *lr)
        net.train()
        epoch_losses, start = [], time.perf_counter()
        for idx in _batches(len(examples), batch_size, rng):
            if len(idx) < 2:  # batch norm needs two
                continue
            x = torch.from_numpy(np.stack([augmented(examples.cutouts[i], rng) for i in idx])[:, None]).to(dev)
            posteriors = net(x)
            loss = sum(nll(torch.log(posteriors[h] + 1e-8), torch.from_numpy(examples.targets[h][idx]).to(dev)) for h in HEADS)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_losses.append(float(loss.detach()))
        losses.append(float(np.mean(epoch_losses)))
        log.info("epoch %d/%d: lr %.3g, loss %.4f, %.1f s", epoch + 1, epochs, optimizer.param_groups[0]["lr"], losses[-1],
                 time.perf_counter() - start)  # fmt: skip
    return net.cpu().eval(), losses


def head_accuracy(net, examples: Examples, batch: int = 16) -> dict[str, float]:
    """Per head, the share of cutouts whose most probable class is the target (no augmentation)."""
    import torch

    right = dict.fromkeys(HEADS, 0)
    with torch.inference_mode():
        for start in range(0, len(examples), batch):
            out = net(torch.from_numpy(examples.cutouts[start : start + batch, None]))
            for h in HEADS:
                right[h] += int((out[h].argmax(1).numpy() == examples.targets[h][start : start + batch]).sum())
    return {h: right[h] / len(examples) for h in HEADS}


def export_labeling_model(net, out: Path, *, size: tuple[int, int, int], resolution: list, name: str) -> Path:
    """The model folder SPINEPS 2.1.3 loads (`labeling_net.write_labeling_model`), weights stored as float16."""
    from .labeling_net import write_labeling_model

    return write_labeling_model(out, net, final_size=size, resolution_range=resolution, name=name, half=True)
