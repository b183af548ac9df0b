"""The bias-correct stage's driver: N4 (`preprocess.bias_correct`) of every image of a batch, on its own grid."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import io, layout

log = logging.getLogger("spinecohort")


def bias_correct_batch(*, manifest: Path, batch: str, out: Path, threads: int, shrink: Sequence[int], iterations: Sequence[int],
                       bias_fwhm: float, max_voxels: int) -> None:
    """Images over `max_voxels`, or whose header declares more data than the file holds, fail here alone, before
    any voxel is read (`io.load_image`): the first stage to read an image guards every later one's memory."""
    from .pipeline import batch_rows, run_stage
    from .preprocess import bias_correct

    def work(row: pd.Series) -> None:
        image, affine = io.load_image(row.image, max_voxels=max_voxels)
        result = bias_correct(image, affine, shrink=shrink, iterations=iterations, bias_fwhm=bias_fwhm, threads=threads)
        log.info("%s: N4 mask covers %.1f %% of the image", row.image_id, 100 * result.mask_fraction)
        io.save_nifti(layout.n4_image(out, row.image_id), result.corrected, affine, dtype=np.float32)

    run_stage(layout.ledger_stage("bias-correct"), batch_rows(manifest, batch), out, work)
