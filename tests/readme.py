"""The README's lines, as the tests run them verbatim."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def slurm_short_form() -> tuple[str, str]:
    """The cluster section's two lines for `--profile slurm`: linking the profile, then the run."""
    section = README.read_text().split("## On a SLURM cluster")[1].split("\n## ")[0]
    link, command = section.split("```bash\n")[2].split("```")[0].strip().splitlines()
    return link, command
