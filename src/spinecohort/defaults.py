"""Defaults the workflow, the CLI and the library share (config/config.yaml repeats them; a test keeps both equal).

Light on purpose: every CLI start reads it, before any heavy import.
"""

from __future__ import annotations

from typing import Any, Final

# N4 (SimpleITK): shrink (in-plane, in-plane, through-plane), iterations per fitting level and
# the bias-field FWHM. Two fitting levels, not four: finer meshes take anatomy for bias on spine
# stations (benchmarks/README.md, N4 settings).
N4: Final[dict[str, Any]] = {"shrink": (8, 8, 1), "iterations": (50, 50), "bias_fwhm": 0.3}

# Largest image (voxels) a job starts on: bias_correct takes about 30 bytes per voxel (N4's copies; measured
# 22-26 bytes above the image itself), so 80 million voxels (e.g. 512 x 512 x 300) stay within its 3000 MB.
MAX_VOXELS: Final = 80_000_000

# ASSD definitions (`metrics`): the mean of both directions' mean distances, or the mean over both surfaces' points.
ASSD_DEFINITIONS: Final = ("mean_of_means", "pooled")

# Where torch runs, for every command that loads a network.
DEVICE_HELP: Final = "auto (CUDA when present), cuda or cpu"
