"""Every `>>>` example in the library's docstrings runs and gives what it shows."""

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

# `pipelines/` and `conversion/` are mapped into the library by setup.py; pkgutil does not see them from the parent
# package in an editable install, so they are walked as roots of their own
ROOTS = ["diffusers_stages", "diffusers_stages.pipelines", "diffusers_stages.conversion"]


def _all_modules() -> list[str]:
    names, todo = set(), [root for root in ROOTS if importlib.util.find_spec(root) is not None]
    while todo:
        package = importlib.import_module(todo.pop())
        names.add(package.__name__)
        for info in pkgutil.iter_modules(package.__path__, prefix=package.__name__ + "."):
            if info.ispkg:
                todo.append(info.name)
            else:
                names.add(info.name)
    return sorted(n for n in names if n.split(".")[-1] != "__main__")


@pytest.mark.parametrize("name", _all_modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
