"""Hostile inputs made on the fly from a phantom image (shared by the unit and the workflow tests)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np


def bad_images(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Unusable variants of the image `good`, written to `folder`: name -> (path, words of the expected reason)."""
    img = nib.load(good)
    data, aff = img.get_fdata().astype(np.float32), img.affine
    cases = {}

    def save(name, arr, affine=aff):
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, affine), path)
        return path

    raw = good.read_bytes()
    corrupt = folder / "corrupt.nii.gz"
    corrupt.write_bytes(raw[:20] + bytes(200) + raw[220:])
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    text = folder / "text.nii.gz"
    text.write_bytes(gzip.compress(b"not an image"))
    nan = data.copy()
    nan[5, 5, 5] = np.nan
    cases["corrupt"] = (corrupt, "corrupt")
    cases["truncated"] = (truncated, "truncated")
    cases["not_nifti"] = (text, "not a readable NIfTI")
    cases["missing"] = (folder / "missing.nii.gz", "does not exist")
    cases["flat"] = (save("flat", data[:, :, :1]), "2-D")
    cases["fourd"] = (save("fourd", np.stack([data, data], -1)), "3-D image")
    cases["nan"] = (save("nan", nan), "NaN or Inf")
    cases["zero"] = (save("zero", np.zeros_like(data)), "constant")
    huge = aff.copy()
    huge[:3, :3] *= 1e5
    cases["spacing"] = (save("spacing", data, huge), "absurd voxel size")
    flat_axis = aff.copy()
    flat_axis[:3, 0] = 0
    degenerate = nib.Nifti1Image(data, None)
    degenerate.set_sform(flat_axis, code=1)  # a qform cannot hold a singular affine
    nib.save(degenerate, folder / "zero_spacing.nii.gz")
    cases["zero_spacing"] = (folder / "zero_spacing.nii.gz", "absurd voxel size")
    sheared = aff.copy()
    sheared[:3, 1] += 0.3 * aff[:3, 0]
    cases["sheared"] = (save("sheared", data, sheared), "sheared")
    inf = data.copy()
    inf[1, 2, 3] = np.inf
    cases["inf"] = (save("inf", inf), "NaN or Inf")
    scaled = nib.Nifti1Image(np.full(data.shape, 30000, np.int16), aff)
    scaled.header.set_slope_inter(1e36, 0)  # int16 x slope overflows float32
    nib.save(scaled, folder / "overflow.nii.gz")
    cases["overflow"] = (folder / "overflow.nii.gz", "NaN or Inf")
    # qform and sform disagree (here by 12 mm along x): ITK tools read one, nibabel the other.
    moved = aff.copy()
    moved[0, 3] += 12
    two_headers = nib.Nifti1Image(data, None)
    two_headers.set_qform(aff, code=1)
    two_headers.set_sform(moved, code=2)
    nib.save(two_headers, folder / "qform_sform.nii.gz")
    cases["qform_sform"] = (folder / "qform_sform.nii.gz", "qform (code 1) and sform (code 2) disagree")
    # Headers that claim more than the file holds: 1500 x 1500 x 400 float32 (3.6 GB, the file 1.4 MB) took 3.6 GiB
    # before failing, a larger claim failed as a bare MemoryError. Over max_voxels (the default's 80 million) the claim
    # fails as too large, under it as more than the file holds; both from the header, allocating nothing.
    for name, shape, reason in (("huge_header", (1500, 1500, 400), "max_voxels"), ("lying_header", (400, 400, 400), "holds only")):
        liar = nib.Nifti1Image(data, aff)
        liar.header.set_data_shape(shape)
        path = folder / f"{name}.nii.gz"
        path.write_bytes(gzip.compress(liar.header.binaryblock + bytes(4) + data.tobytes()))  # 348 + 4: the data offset
        cases[name] = (path, reason)
    rgb = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.clip(data, 0, 255).astype(np.uint8)
    nib.save(nib.Nifti1Image(rgb, aff), folder / "rgb.nii.gz")
    cases["rgb"] = (folder / "rgb.nii.gz", "RGB")
    return cases
