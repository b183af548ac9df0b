"""One pinned software stack (issue 40): the suite runs on what envs/requirements.lock pins, the lock covers every
dependency, and Snakemake's linter finds nothing but the missing conda/container directives (docs/cluster.md)."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "envs" / "requirements.lock"
SOFTWARE_LINT = "Specify a conda environment or container for each rule."


def pins() -> dict[str, str]:
    lines = [line for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^=\s]+", line) for line in lines), "a lock line is not name==version"
    return {canonicalize_name(name): v for name, v in (line.split("==") for line in lines)}


def test_the_suite_runs_on_the_locked_versions_and_the_lock_covers_every_dependency():
    locked = pins()
    installed = {}
    for name in locked:
        try:
            installed[name] = version(name)
        except PackageNotFoundError:  # a platform's package (e.g. CUDA libraries elsewhere): pip skips it too
            continue
    assert {n: v for n, v in installed.items() if v != locked[n]} == {}
    assert {"torch", "nnunetv2", "snakemake", "simpleitk", "numpy"} <= set(installed)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    assert [str(r) for r in wanted if canonicalize_name(r.name) not in locked] == []
    assert [str(r) for r in wanted if not r.specifier.contains(locked[canonicalize_name(r.name)])] == []


def test_snakemake_lint_asks_for_nothing_but_a_software_definition(tmp_path: Path):
    proc = subprocess.run(["snakemake", "--lint", "--config", f"results={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr
    titles = set(re.findall(r"^ {4}\* (.+?):?$", out, flags=re.MULTILINE))
    rules = re.findall(r"^Lints for rule (\w+)", out, flags=re.MULTILINE)
    assert titles == {SOFTWARE_LINT + ":"} or titles == {SOFTWARE_LINT}, titles
    assert "Lints for snakefile" not in out and len(rules) > 10 and "summarize" in rules
