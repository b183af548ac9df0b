"""spinecohort: cohort-scale SPINEPS reprocessing of sagittal T2w spine MRI as a Snakemake workflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spinecohort")  # one source: pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
