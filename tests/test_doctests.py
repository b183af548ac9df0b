"""The examples in the package's docstrings hold."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import spinecohort

MODULES = sorted(m.name for m in pkgutil.iter_modules(spinecohort.__path__, "spinecohort."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
