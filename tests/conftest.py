"""Shared fixtures: phantom cohorts rendered once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from spinecohort.phantom import write_cohort


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two subjects x three stations, `small` preset, seed 0; returns the manifest path."""
    out = tmp_path_factory.mktemp("cohort")
    return write_cohort(out, subjects=2, preset="small", seed=0, batch_size=4)
