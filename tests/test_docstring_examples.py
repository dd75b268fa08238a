"""The examples in the docstrings run and print what they say (doctest)."""
import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ["marginboost", "models", "callbacks", "datamodules", "lightning_app"]


def _modules():
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        yield name
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{name}."):
            if not info.name.endswith("__main__"):
                yield info.name


@pytest.mark.parametrize("module", sorted(set(_modules())))
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
