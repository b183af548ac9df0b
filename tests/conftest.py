"""Shared fixtures: phantom cohorts rendered once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spinecohort.phantom import write_cohort


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The SLURM tests last: with their test cluster stopped, importing Snakemake's SLURM plugin waits
    ~9 s for a controller (`scontrol show config`) in every later `snakemake` start."""
    items.sort(key=lambda item: item.get_closest_marker("slurm") is not None)


@pytest.fixture(autouse=True)
def no_wait_for_a_slurm_controller(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the SLURM tests no job goes to SLURM, yet every `snakemake` start imports the SLURM plugin, which
    runs `scontrol show config`: where SLURM is installed but no controller runs, that waits ~9 s (13.4 s per
    dry run instead of 2.4 s). An empty config makes it fail at once; the SLURM tests keep the real one."""
    if request.node.get_closest_marker("slurm") is None and "SLURM_CONF" not in os.environ:
        monkeypatch.setenv("SLURM_CONF", os.devnull)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two subjects x three stations, `small` preset, seed 0; returns the manifest path."""
    out = tmp_path_factory.mktemp("cohort")
    return write_cohort(out, subjects=2, preset="small", seed=0, batch_size=4)


@pytest.fixture(scope="session")
def demo_local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default demo run locally once (`snakemake --cores 2`); returns its results folder."""
    import subprocess

    results = tmp_path_factory.mktemp("demo_results")
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["snakemake", "--cores", "2", "--config", f"results={results}"], cwd=root, check=True,
                   capture_output=True, timeout=1500)
    return results
