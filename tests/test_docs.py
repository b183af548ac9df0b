"""The README and the docs site (issue 41): the site builds in strict mode, every page is in its navigation, the
configuration reference is the schema's, every key and command the pages name exists, the rule graph is the
workflow's. (The figures the pages state are checked against runs where they are measured: the demo's tables
in test_levels, the parity table in test_spineps_parity, the job lines in test_foundation.)"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from readme import DOCS, README, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from config_reference import keys, reference  # noqa: E402

SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
PAGES = [README, ROOT / "config" / "README.md", *sorted(DOCS.glob("*.md"))]
GENERATED = {"config.md", "benchmarks.md"}  # made by scripts/mkdocs_hooks.py


def test_the_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150
    assert lines[2:7] == ["```bash", lines[3], lines[4], lines[5], lines[6]] and lines[4].endswith("snakemake --cores all")
    assert lines[6].endswith("python -m pytest -q") and (ROOT / ".ci" / "run").read_text().rstrip().endswith("python -m pytest -q")


def _nav_files(nav) -> list[str]:
    return [f for entry in nav for value in entry.values() for f in ([value] if isinstance(value, str) else _nav_files(value))]


def test_the_docs_site_builds_in_strict_mode_with_every_page_in_its_navigation(tmp_path: Path):
    """Strict: a broken link or anchor, a missing page, fails the build."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True
    assert set(_nav_files(config["nav"])) == {p.name for p in DOCS.glob("*.md")} | GENERATED
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    config_page = (tmp_path / "site" / "config" / "index.html").read_text()
    assert all(f"<code>{key}</code>" in config_page for key, *_ in keys(SCHEMA, {}))


def test_every_config_key_has_a_type_and_a_description():
    rows = list(keys(SCHEMA, yaml.safe_load((ROOT / "config" / "config.yaml").read_text())))
    assert len(rows) > 60
    assert [key for key, kind, _, description in rows if not kind or not description] == []
    assert dict((k, d) for k, _, d, _ in rows)["max_voxels"] == "80000000"  # a default, from config/config.yaml


def test_config_readme_is_the_generated_reference():
    """config/README.md (the Snakemake catalog's place for it) is what `scripts/config_reference.py` prints."""
    assert (ROOT / "config" / "README.md").read_text() == reference()


def _schema_has(path: str) -> bool:
    node = SCHEMA
    for part in path.split("."):
        node = node.get("properties", {}).get(part) if isinstance(node, dict) else None
        if node is None:
            return False
    return True


def test_every_config_key_the_pages_name_exists():
    """`semantic_model.path`, `--config batch_size=2`: any dotted name under a top-level key, and every key set with
    --config, must be in the schema (a renamed key leaves no page behind)."""
    named = set()
    for path in PAGES:
        text = path.read_text()
        named |= {m for m in re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", text) if m.split(".")[0] in SCHEMA["properties"]}
        named |= set(re.findall(r"--config (?:[a-z_.]+=\S+ )*([a-z_.]+)=", text)) - {"batchsize"}  # the typo the pages show
    assert len(named) >= 10, named
    assert sorted(k for k in named if not _schema_has(k)) == []


def _commands(program: str) -> list[list[str]]:
    """Every `program …` line of the pages' bash blocks, as words (comments cut)."""
    found = []
    for path in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == [program]:
                    found.append(words)
    return found


def test_every_spinecohort_command_the_pages_show_parses():
    """Their subcommands and options exist as shown (they name the reader's folders: parsed, not run here; the retry
    test and the SLURM test run the README's lines)."""
    from spinecohort.cli import build_parser

    commands = _commands("spinecohort")
    assert {words[1] for words in commands} >= {"manifest", "retry", "phantom"}
    parser = build_parser()
    for words in commands:
        parser.parse_args(words[1:])


def test_the_rule_graph_on_the_architecture_page_is_the_workflows(tmp_path: Path):
    graph = subprocess.run(["snakemake", "--rulegraph", "--config", f"results={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "SLURM_CONF": os.devnull})  # fmt: skip
    assert graph.returncode == 0, graph.stderr[-2000:]
    # the same nodes and edges (Snakemake lists the edges in no fixed order)
    assert sorted(graph.stdout.splitlines()) == sorted((DOCS / "rulegraph.dot").read_text().splitlines()), "re-render: see docs/ARCHITECTURE.md"
    assert "rulegraph.svg" in (DOCS / "ARCHITECTURE.md").read_text() and (DOCS / "rulegraph.svg").stat().st_size > 1000


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name if p.parent != ROOT else f"root-{p.name}")
def test_no_page_points_outside_the_repository(path: Path):
    """A user's clone has only the repository: no link or path to a sibling folder."""
    assert "../shared" not in path.read_text()
