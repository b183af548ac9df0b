"""What a job process sets up for itself before its work, and reports after it.

`keep_freed_memory`: glibc's malloc gives large freed blocks back to the kernel at once
(they are mmap'ed, and the heap top is trimmed), so a loop that allocates the same large
tensors per tile, as nnU-Net's sliding window and the cutout U-Net do, pays a page fault
per 4 KiB page every time. With mmap off and trimming above any job's size the blocks
are reused instead: a demo fold job made 5.3 M minor faults and spent 25 % of its CPU in
the kernel before, 0.2 M and 3 % after (benchmarks/README.md). Allocation never changes
values: results are the same bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import resource
import time

__all__ = ["keep_freed_memory", "JobClock", "COST_LINE", "network_busy_line", "NETWORK_BUSY_LINE", "tune_for", "DEVICES_USED"]

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free heap above this many bytes goes back to the kernel (mallopt's largest value, 2 GiB).
_TRIM_ABOVE = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module doc); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep their defaults
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE)
    return bool(mallopt(_M_MMAP_MAX, 0) and trim)


class JobClock:
    """A job's cost for its log's last line: CPU seconds of the process (imports included, children too), wall
    seconds since the clock was made, peak memory. Measured from inside, it sees what Snakemake's benchmark
    files, sampling from outside, miss (their cpu_time held 50-68 % of it)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def line(self) -> str:
        """`12.30 CPU-s in 12.41 s wall, peak memory 1.10 GiB`."""
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
        peak = max(own.ru_maxrss, children.ru_maxrss) / 2**20  # KiB on Linux
        return f"{cpu:.2f} CPU-s in {time.monotonic() - self.started:.2f} s wall, peak memory {peak:.2f} GiB"


# `JobClock.line` as the CLI logs it (`predict-fold: 31.04 CPU-s in ...`): command, CPU-s, wall s, peak GiB.
COST_LINE = re.compile(r"INFO ([\w-]+): ([\d.]+) CPU-s in ([\d.]+) s wall, peak memory ([\d.]+) GiB$", re.MULTILINE)


def network_busy_line(fold: int | str, network_seconds: float, wall: float) -> str:
    """How well a fold job keeps its device busy (model load excluded), in a line `NETWORK_BUSY_LINE` reads back.

    >>> network_busy_line(0, 30.0, 40.0)
    "fold 0: network busy 75 % of the batch's 40.0 s"
    >>> NETWORK_BUSY_LINE.findall("INFO " + network_busy_line("all", 1.0, 4.0))
    [('all', '25', '4.0')]
    """
    return f"fold {fold}: network busy {100 * network_seconds / max(wall, 1e-9):.0f} % of the batch's {wall:.1f} s"


# `network_busy_line` as a fold job logs it: fold, per cent, the batch's wall s.
NETWORK_BUSY_LINE = re.compile(r"fold (\w+): network busy (\d+) % of the batch's ([\d.]+) s$", re.MULTILINE)


# The device types this job's networks ran on (every network load calls `tune_for`): its stack record says which.
DEVICES_USED: set[str] = set()


def tune_for(device) -> None:
    """What makes the networks fast on a GPU and leaves CPU results alone: cuDNN picks its fastest convolution
    per tile shape (the tiles of a batch share one shape, so the search pays once per job) and TF32 tensor
    cores for float32 matrix work. nnU-Net itself predicts on CUDA under autocast (float16), with the whole
    sliding window on the device (`semantic.FoldPredictor`). No-op on CPU, where these flags mean nothing."""
    import torch

    DEVICES_USED.add(device.type)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
