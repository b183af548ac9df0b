"""Batch drivers for the workflow stages (filled in by the foundation work)."""


def add_stage_parsers(sub) -> None:  # noqa: ANN001
    return None
