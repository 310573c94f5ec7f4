"""Every `>>>` example in the library's docstrings runs and gives what it shows; every exported class shows one, and
every exported function is typed (the project's standard for its public API)."""

import doctest
import importlib
import importlib.util
import inspect
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


# the public API: what these packages export in `__all__` (a package without `__all__` exports nothing checked here)
PUBLIC_PACKAGES = [*ROOTS, "diffusers_stages.models", "diffusers_stages.planning", "diffusers_stages.training"]


def _exports() -> list[tuple[str, object]]:
    exports = []
    for name in PUBLIC_PACKAGES:
        if importlib.util.find_spec(name) is not None:
            package = importlib.import_module(name)
            exports += [(f"{name}.{export}", getattr(package, export)) for export in getattr(package, "__all__", ())]
    return exports


def _unannotated(function) -> list[str]:
    """The parameters (besides self, cls, *args and **kwargs) and the return of ``function`` that have no type."""
    signature = inspect.signature(function)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    missing = [
        name
        for name, parameter in signature.parameters.items()
        if parameter.annotation is inspect.Parameter.empty
        and name not in ("self", "cls")
        and parameter.kind not in variadic
    ]
    return missing + (["return"] if signature.return_annotation is inspect.Signature.empty else [])


def test_public_classes_show_an_example():
    """The project's standard: every exported class's own docstring has a `>>>` example (run by the test above)."""
    missing = [name for name, obj in _exports() if inspect.isclass(obj) and ">>>" not in (obj.__doc__ or "")]
    assert not missing, f"exported classes without a `>>>` example in their docstring: {sorted(set(missing))}"


def test_public_functions_are_typed():
    """The project's standard: every parameter and the return of an exported function are annotated."""
    untyped = {name: _unannotated(obj) for name, obj in _exports() if callable(obj) and not inspect.isclass(obj)}
    untyped = {name: missing for name, missing in untyped.items() if missing}
    assert not untyped, f"exported functions with unannotated parameters or return: {untyped}"
