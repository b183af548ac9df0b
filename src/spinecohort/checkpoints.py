"""Reading model checkpoints without running code from them.

A PyTorch checkpoint is a pickle, and unpickling calls whatever function the file
names. `load_checkpoint` reads only tensors, plain Python data and numpy arrays and
scalars (nnU-Net stores numpy values in its training logs), with
``torch.load(weights_only=True)``; anything else is refused. Lightning checkpoints
(the SPINEPS instance model) also pickle their hyper-parameters as arbitrary
objects: `load_lightning_checkpoint` replaces every such object with an inert stub
instead of refusing the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "load_checkpoint", "load_lightning_checkpoint"]

# numpy types nnU-Net checkpoints hold; rebuilding them runs no user code.
NUMPY_TYPES = [np._core.multiarray.scalar, np._core.multiarray._reconstruct, np.ndarray, np.dtype,  # type: ignore[attr-defined]
               *(type(np.dtype(t)) for t in ("f2", "f4", "f8", "i4", "i8", "u1", "bool"))]  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that names code to run while it is read; the message names the file."""


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
    """The checkpoint's content if it holds only tensors, plain data and numpy values."""
    try:
        with torch.serialization.safe_globals(NUMPY_TYPES):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise CheckpointError(f"{path}: refused, it holds more than weights and plain data ({reason})") from None


class _Stub:
    """Stands in for any object a checkpoint pickles besides tensors and plain data.

    It keeps the data the object was rebuilt from (constructor arguments, a state dict's items as attributes),
    so a reader can look up plain settings such as a labelling model's `final_size`; it runs nothing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.stub_args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


def _rebuilds_data(module: str, name: str) -> bool:
    """The globals a tensor/plain-data pickle needs (an allow-list: anything else could run code)."""
    if module == "torch":
        return name.endswith("Storage") or name in {"Size", "device"} or isinstance(getattr(torch, name, None), torch.dtype)
    if module == "torch._utils":
        return name in {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"}
    if module == "collections":
        return name == "OrderedDict"
    if module in {"numpy.core.multiarray", "numpy._core.multiarray"}:
        return name in {"scalar", "_reconstruct"}
    if module == "numpy":
        return name in {"ndarray", "dtype"}
    return module == "_codecs" and name == "encode"  # numpy scalars pickle their bytes through it


class _StubbingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(module, name) if _rebuilds_data(module, name) else _Stub


class _StubbingPickle:
    """A `pickle_module` for `torch.load` whose unpickler stubs every global off the allow-list."""

    Unpickler = _StubbingUnpickler
    load = pickle.load
    __name__ = "spinecohort_stubbing_pickle"


def load_lightning_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
    """A checkpoint's tensors and plain data; other objects (Lightning hyper-parameters) become stubs."""
    try:
        return load_checkpoint(path, map_location=map_location)
    except CheckpointError:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_StubbingPickle)
