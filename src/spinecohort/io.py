"""All file I/O: NIfTI, JSON, TSV and blosc2 arrays, each written atomically.

A file is first written under a hidden temporary name in its destination folder
and then renamed, so a killed job never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray

__all__ = [
    "ImageError",
    "atomic_path",
    "publish",
    "load_image",
    "load_mask",
    "load_affine",
    "save_nifti",
    "write_json",
    "read_json",
    "write_tsv",
    "save_logits",
    "load_logits",
]

# Widest voxel size (mm) a plausible MR image has; beyond it a header is broken.
MAX_SPACING_MM = 50.0
MIN_SPACING_MM = 1e-3
# Largest |cos| between two voxel axes still taken as orthogonal (float32 headers round).
SHEAR_TOLERANCE = 1e-3
# qform and sform may differ by float32 rounding of the quaternion, no more (mm, per affine element).
HEADER_TOLERANCE_MM = 1e-3


# The process's umask, read once (setting it is the only way to read it).
_UMASK = os.umask(0)
os.umask(_UMASK)


class ImageError(ValueError):
    """An input image that cannot be processed; the message names file and reason."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` on success.

    The temporary name keeps the suffixes of `path` (writers choose the format
    from them) and is removed if the body raises. Temporary files of `path` that a
    killed writer left behind are removed first (each path has one writer).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{path.name.split('.')[0]}.", ".tmp" + "".join(path.suffixes)
    for stale in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a lab's group must read the results
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def publish(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make `target` show the finished file `source`: a hard link (no second copy on disk),
    a copy where the two lie on different file systems. Atomic like every write here."""
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copyfile(source, tmp)


def _fail(path: Path, reason: str) -> ImageError:
    return ImageError(f"{path}: {reason}")


def load_image(path: str | os.PathLike[str], *, max_voxels: int | None = None) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Read a 3-D image as float32 plus its affine, rejecting what no stage can use.

    Nothing is allocated before the header's claims are checked (`check_declared_size`): a header that
    declares more voxels than the file holds, or more than `max_voxels`, fails here, at the cost of a
    few bytes read, instead of taking the job's memory.

    Raises
    ------
    ImageError
        Missing, unreadable or corrupt file; not 3-D (a 4-D image with a single
        volume is accepted); more voxels declared than stored or than `max_voxels`;
        NaN/Inf voxels; constant image; voxel sizes outside [1e-3, 50] mm; a
        singular affine. The message starts with the file name.
    """
    path = Path(path)
    img = _open(path)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise _fail(path, f"expected a 3-D image, got shape {img.shape}")
    if min(shape) < 2:
        raise _fail(path, f"expected a 3-D volume, got shape {img.shape} (a 2-D slice)")
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(path, affine)
    check_declared_size(path, img, max_voxels=max_voxels)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise _fail(path, f"cannot read voxel data ({exc})") from None
    finite = np.isfinite(data)
    if not finite.all():
        raise _fail(path, f"{int((~finite).sum())} voxels are NaN or Inf")
    if float(data.max()) == float(data.min()):
        raise _fail(path, f"image is constant (all voxels = {float(data.min()):g})")
    return data, affine


def load_mask(path: str | os.PathLike[str]) -> tuple[NDArray[np.int32], NDArray[np.float64]]:
    """Read a label mask as int32 plus its affine; labels must be whole numbers."""
    path = Path(path)
    img = _open(path)
    if len(img.shape) != 3:
        raise _fail(path, f"expected a 3-D mask, got shape {img.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(path, affine)
    check_declared_size(path, img)
    try:
        data = np.asarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise _fail(path, f"cannot read voxel data ({exc})") from None
    if data.dtype.kind == "f":
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise _fail(path, "mask holds non-integer values")
    return data.astype(np.int32), affine


def load_affine(path: str | os.PathLike[str]) -> NDArray[np.float64]:
    """The affine of a NIfTI file, from its header alone (no voxel data read)."""
    path = Path(path)
    affine = np.asarray(_open(path).affine, dtype=np.float64)
    _check_affine(path, affine)
    return affine


def _open(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise _fail(path, "file does not exist")
    try:
        img = nib.load(path)
        img.header.get_data_shape()  # type: ignore[attr-defined]  # nib.load is typed as returning the base class
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError) as exc:
        raise _fail(path, f"not a readable NIfTI image ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise _fail(path, f"not a NIfTI image ({type(img).__name__})")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        kind = "RGB" if dtype.names and set(dtype.names) >= {"R", "G", "B"} else "not scalar"
        raise _fail(path, f"voxel type {dtype} is {kind}: expected one scalar intensity per voxel")
    _check_header_geometry(path, img)
    return img


def _check_header_geometry(path: Path, img: nib.Nifti1Image) -> None:
    """qform and sform, where both are set, must say the same: tools differ in which they read
    (ITK prefers the qform, nibabel the sform), so which one is right is not ours to guess."""
    header = img.header
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode > 0 and scode > 0:
        qform, sform = header.get_qform(), header.get_sform()
        if not np.allclose(qform, sform, atol=HEADER_TOLERANCE_MM):
            worst = float(np.abs(qform - sform).max())
            raise _fail(path, f"qform (code {qcode}) and sform (code {scode}) disagree (by up to {worst:.3g} mm): "
                              f"ITK tools read the qform, nibabel the sform; fix the header, or clear one (code 0)")


def check_declared_size(path: Path, img: nib.Nifti1Image, *, max_voxels: int | None = None) -> None:
    """Refuse a header whose voxel count exceeds `max_voxels`, or whose data the file does not hold.

    Reading the voxels allocates what the header declares before a byte is read, so a header that
    lies (or an image far larger than the job's memory was asked for) must be caught from the header
    and the file's size alone.
    """
    shape, dtype = img.header.get_data_shape(), img.get_data_dtype()
    voxels = int(np.prod(shape, dtype=np.int64))
    if max_voxels is not None and voxels > max_voxels:
        raise _fail(path, f"header declares {voxels:,} voxels {tuple(shape)}, more than max_voxels {max_voxels:,} (config max_voxels)")
    needed = int(img.dataobj.offset) + voxels * dtype.itemsize  # type: ignore[attr-defined]
    try:
        stored = _stored_bytes(path, needed)
    except (OSError, EOFError, zlib.error) as exc:
        raise _fail(path, f"cannot read voxel data ({exc})") from None
    if stored < needed:
        raise _fail(path, f"header declares {tuple(shape)} {dtype} voxels ({needed:,} bytes with the header), "
                          f"the file holds only {stored:,}: truncated, or a wrong header")


GZIP_MAGIC: Final = b"\x1f\x8b"


def _stored_bytes(path: Path, needed: int) -> int:
    """The file's (uncompressed) size, or any figure of at least `needed` bytes once that many are found.

    A gzip file's trailer holds its last member's size modulo 2**32: enough to accept a file whose last
    member alone holds what is needed. Else (several members, over 4 GiB, or short) the data are counted
    by streaming through them, 1 MiB at a time: nothing is kept, so memory does not grow with the claim.
    """
    with open(path, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            return os.fstat(f.fileno()).st_size
        f.seek(-4, os.SEEK_END)
        if needed < 2**32 and int.from_bytes(f.read(4), "little") >= needed:
            return needed
    count = 0
    with gzip.open(path, "rb") as stream:
        while count < needed and (chunk := stream.read(1 << 20)):
            count += len(chunk)
    return count


def header_codes(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(qform code, sform code) of a NIfTI file: outputs on its grid keep them."""
    header = _open(Path(path)).header
    return int(header["qform_code"]), int(header["sform_code"])


def _check_affine(path: Path, affine: NDArray[np.float64]) -> None:
    if not np.isfinite(affine).all():
        raise _fail(path, "affine holds NaN or Inf")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if (spacing < MIN_SPACING_MM).any() or (spacing > MAX_SPACING_MM).any():
        raise _fail(path, f"absurd voxel size {tuple(round(float(s), 6) for s in spacing)} mm")
    # Oblique is fine (resampling handles it); sheared voxel axes are not an MR acquisition.
    direction = affine[:3, :3] / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() > SHEAR_TOLERANCE:
        raise _fail(path, "affine is sheared (voxel axes not orthogonal)")


def save_nifti(
    path: str | os.PathLike[str],
    data: NDArray[Any],
    affine: NDArray[np.float64],
    *,
    dtype: Any | None = None,
    codes: tuple[int, int] = (1, 1),
) -> None:
    """Write `data` with `affine` atomically; `codes` (qform, sform; default 'scanner' both, as is the input's
    with `header_codes`): a form whose code is 0 is left unset."""
    arr = np.asarray(data, dtype=dtype) if dtype is not None else np.asarray(data)
    img = nib.Nifti1Image(arr, affine)
    qcode, scode = codes
    img.set_sform(affine if scode else None, code=scode)
    img.set_qform(affine if qcode else None, code=qcode)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


_CELL_BREAKS: Final = re.compile(r"[\t\r\n]+")


def write_tsv(path: str | os.PathLike[str], table: pd.DataFrame) -> None:
    """One line per row, always: tabs and line breaks inside a cell (an error message from ITK spans three
    lines) are folded into single spaces, so `cut`, `grep`, `awk` and `wc -l` read the file right; the
    whole message stays in the job's log."""
    text = table.select_dtypes(include=["object", "string"]).columns
    fold = lambda v: _CELL_BREAKS.sub(" ", v) if isinstance(v, str) else v
    folded = table.assign(**{c: table[c].map(fold) for c in text}) if len(text) else table
    with atomic_path(path) as tmp:
        folded.to_csv(tmp, sep="\t", index=False, lineterminator="\n")


LOGIT_ENCODING: Final = "float16 bits as ordered integers, delta along axis -2, zigzag"
"""What `save_logits` stores, kept in each file's blosc2 metadata; files without it hold the plain bits."""


def save_logits(path: str | os.PathLike[str], logits: NDArray[np.float16]) -> None:
    """Store float16 logits losslessly: LOGIT_ENCODING, bit shuffle, zstd level 1 (blosc2).

    A trained network's logits change smoothly from voxel to voxel, so the difference of neighbours'
    float16 bit patterns (read as integers ordered like the floats) is small and compresses; every step is
    a bijection on 16-bit integers, so `load_logits` gives back the very bits and fold averaging stays
    exact. NAKO-size image, trained model: 108 MiB per fold, against 120 MiB for the plain bits and 187 raw
    (`benchmarks/bench_logits.py`); level 1 writes 4x faster than level 5 for 3 % more bytes.
    """
    import blosc2

    # One thread: blosc2's threads store a chunk's blocks in the order they finish, so two runs would write
    # different bytes for the same logits; and the fold job writes in a thread beside the network anyway.
    cparams = blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=1, filters=[blosc2.Filter.BITSHUFFLE], nthreads=1)
    encoded = _encode_logits(np.ascontiguousarray(logits, dtype=np.float16))
    with atomic_path(path) as tmp:
        stored = blosc2.asarray(encoded, urlpath=str(tmp), mode="w", cparams=cparams)
        stored.schunk.vlmeta["encoding"] = LOGIT_ENCODING


def load_logits(path: str | os.PathLike[str]) -> NDArray[np.float16]:
    import blosc2

    stored = blosc2.open(str(path))
    bits = np.asarray(stored[:])
    if "encoding" not in stored.schunk.vlmeta:  # written before the encoding existed
        return bits.view(np.float16)
    if (encoding := stored.schunk.vlmeta["encoding"]) != LOGIT_ENCODING:
        raise ValueError(f"{path}: logits stored as {encoding!r}; this version reads {LOGIT_ENCODING!r}")
    return _decode_logits(bits.view(np.uint16))


def _encode_logits(logits: NDArray[np.float16]) -> NDArray[np.uint16]:
    bits = logits.view(np.uint16)
    ordered = np.where(bits & 0x8000, ~bits, bits | 0x8000)  # negative floats reversed below the positive ones
    delta = np.diff(ordered, axis=-2, prepend=np.zeros_like(ordered[..., :1, :])).view(np.int16)  # wraps: exact
    return ((delta << 1) ^ (delta >> 15)).view(np.uint16)  # zigzag: small negative deltas small too


def _decode_logits(zigzag: NDArray[np.uint16]) -> NDArray[np.float16]:
    delta = (zigzag >> 1) ^ ((zigzag & 1) * np.uint16(0xFFFF))
    ordered = np.cumsum(delta, axis=-2, dtype=np.uint16)
    return np.where(ordered & 0x8000, ordered & 0x7FFF, ~ordered).astype(np.uint16).view(np.float16)
