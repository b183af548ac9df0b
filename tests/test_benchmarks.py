"""Every benchmark still runs: `--quick` (tiny inputs, seconds) ends with its JSON line of measured numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("bench_*.py"))


def test_benchmarks_are_found():
    assert SCRIPTS, "no benchmarks/bench_*.py: the test below would be skipped"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_runs_quick(script: Path):
    proc = subprocess.run([sys.executable, str(script), "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, proc.stderr[-3000:]
    last = lines[-1]
    figures = json.loads(last)
    assert isinstance(figures, dict), last
    measured = [v for v in figures.values() if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    assert measured, f"no number in the last line: {last}"
