"""Every `>>>` example in the library's docstrings runs and gives what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import diffusers_stages

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(diffusers_stages.__path__, prefix="diffusers_stages.")
    if not info.name.split(".")[-1].startswith("__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
