"""The configuration reference: every key of the config schema with its type, default and description.

Generated from `workflow/schemas/config.schema.yaml` (types, descriptions) and `config/config.yaml` (the
defaults), the two files the workflow itself reads, so the reference cannot drift from what is validated. The
docs site builds its configuration page from it (`scripts/mkdocs_hooks.py`) and `config/README.md` holds the
same table (a test keeps them equal; ``python scripts/config_reference.py > config/README.md`` renews it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULTS = ROOT / "config" / "config.yaml"

INTRO = """# Configuration

`config/config.yaml` is the default configuration: the embedded demo. For a cohort, copy
`config/example_cohort.yaml`, set `manifest` and the model paths, and pass it with
`snakemake --configfile <your copy>`; keys you leave out keep the defaults below. Single keys can be
set on the command line (`--config batch_size=50`). A key the schema does not know stops the run at
start-up, naming it. The schema is `workflow/schemas/config.schema.yaml`.

| key | type | default | description |
|---|---|---|---|
"""


def _type(rule: Mapping[str, Any]) -> str:
    kind = rule.get("type", "")
    text = " or ".join(kind) if isinstance(kind, list) else str(kind)
    if "items" in rule and "type" in rule["items"]:
        text += f" of {rule['items']['type']}"
    if "enum" in rule:
        text += ": " + ", ".join(str(v) for v in rule["enum"])
    return text


def keys(schema: Mapping[str, Any], defaults: Any, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, description) of every key, depth first, in the schema's order; objects give their own row."""
    for name, rule in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        value = defaults.get(name) if isinstance(defaults, Mapping) else None
        nested = rule.get("type") == "object" and "properties" in rule
        default = "" if nested or value is None and name not in (defaults or {}) else json.dumps(value, ensure_ascii=False)
        yield key, _type(rule), default, str(rule.get("description", ""))
        if nested:
            yield from keys(rule, value, f"{key}.")


def reference(schema_path: Path = SCHEMA, defaults_path: Path = DEFAULTS) -> str:
    """The reference as a Markdown page."""
    schema = yaml.safe_load(schema_path.read_text())
    defaults = yaml.safe_load(defaults_path.read_text())
    cell = lambda text: text.replace("|", "\\|")
    rows = [f"| `{k}` | {cell(t)} | {f'`{cell(d)}`' if d else ''} | {cell(desc)} |" for k, t, d, desc in keys(schema, defaults)]
    return INTRO + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
