"""The Snakemake layer: dry-run, lint and formatting are clean."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_dry_run_plans_the_demo(tmp_path: Path):
    proc = run("snakemake", "-n", "--quiet", "rules", "--config", f"results={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "demo_cohort" in proc.stdout + proc.stderr


def test_snakefmt_is_clean():
    assert shutil.which("snakefmt")
    proc = run("snakefmt", "--check", "Snakefile", "workflow")
    assert proc.returncode == 0, proc.stderr


def test_lint_is_clean():
    proc = run("snakemake", "--lint")
    assert proc.returncode == 0 and "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
