"""SPINEPS 2.1.3 with all its dependencies, in its own virtual environment, for the interop tests.

The environment is layered over ours: a `.pth` line puts our venv's packages (torch, nnU-Net, ...) after
its own, so pip installs only what SPINEPS adds (TPTBox, ANTs, Lightning, MONAI, ...; ~500 MB, ~30 s)
and our venv is never changed. It is cached under ~/.cache/spinecohort, keyed by our installed
packages, so a second run (a fresh clone of the same commit included) installs nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SPINEPS = "spineps==2.1.3"


def _our_packages() -> str:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in frozen.splitlines() if "spinecohort" not in line)  # our own checkout changes by commit


def spineps_python() -> Path:
    """The interpreter of the SPINEPS environment, built on first use."""
    key = hashlib.sha256(f"{SPINEPS}\n{sys.version}\n{_our_packages()}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spinecohort"
    env = cache / f"{SPINEPS.replace('==', '-')}-{key}"
    python = env / "bin" / "python"
    if not (env / ".complete").exists():
        shutil.rmtree(env, ignore_errors=True)
        subprocess.run([sys._base_executable, "-m", "venv", env], check=True)  # type: ignore[attr-defined]
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "zz_spinecohort_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # this checkout's venv
    if not (env / ".complete").exists():
        subprocess.run([python, "-m", "pip", "install", "-q", SPINEPS], check=True, timeout=1800)
        (env / ".complete").touch()
    return python
