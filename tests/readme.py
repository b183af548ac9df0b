"""The README's and the docs pages' lines, as the tests run or compare them verbatim."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def page(name: str) -> str:
    """A docs page's Markdown (`docs/<name>`)."""
    return (DOCS / name).read_text()


def slurm_short_form() -> tuple[str, str]:
    """The README's two lines for `--profile slurm` ("Your cluster"): linking the profile, then the run. The cluster
    page shows the same two lines."""
    section = README.read_text().split("## Your cluster")[1].split("\n## ")[0]
    link, command = section.split("```bash\n")[1].split("```")[0].strip().splitlines()
    assert f"{link}\n{command}" in page("cluster.md"), "the cluster page's short form is not the README's"
    return link, command
