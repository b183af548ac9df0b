"""MkDocs hooks (mkdocs.yml `hooks:`): the pages made from the files they describe, so that none can drift.

- `config.md`: the configuration reference (`config_reference.py`: the schema's types and descriptions, the
  default config's values);
- `benchmarks.md`: `benchmarks/README.md`, the measured figures, with its links into the repository as code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).resolve().parent))
from config_reference import ROOT, reference  # noqa: E402 (a hook file is loaded by path, not as a package)


def _repository_links_as_code(text: str) -> str:
    """`[name](path)` links to files outside the site become `path` (the site cannot serve them)."""
    return re.sub(r"\[([^\]]+)\]\((?!https?://)([^)#]+)\)", r"\1 (`\2`)", text)


def on_files(files: Files, config) -> Files:  # noqa: ANN001 (MkDocs' config object)
    files.append(File.generated(config, "config.md", content=reference()))
    benchmarks = (ROOT / "benchmarks" / "README.md").read_text()
    files.append(File.generated(config, "benchmarks.md", content=_repository_links_as_code(benchmarks)))
    return files
