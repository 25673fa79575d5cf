"""The package's lazy ``defs`` (wine_assets.__getattr__): a definitions module that fails while loading
with an AttributeError is reported as an ImportError naming wine_assets.definitions, not as Python's
misleading "cannot import name 'defs'"."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import pytest

import wine_assets

pytestmark = pytest.mark.unit


class _FailingDefinitions(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds wine_assets.definitions (only it) and fails loading it, as a Dagster API that moved would."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        return importlib.util.spec_from_loader(name, self) if name == "wine_assets.definitions" else None

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return None

    def exec_module(self, module):  # noqa: ANN001, ANN201
        raise AttributeError("module 'dagster' has no attribute 'asset_v2'")


def test_a_definitions_module_that_fails_to_load_is_named(monkeypatch):
    monkeypatch.delitem(sys.modules, "wine_assets.definitions", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingDefinitions(), *sys.meta_path])
    with pytest.raises(ImportError) as caught:
        _ = wine_assets.defs
    assert str(caught.value) == (
        "wine_assets.definitions failed to load: AttributeError(\"module 'dagster' has no attribute 'asset_v2'\")"
    )
    assert isinstance(caught.value.__cause__, AttributeError)


def test_other_names_are_not_attributes_and_defs_is_listed():
    with pytest.raises(AttributeError, match=r"^module 'wine_assets' has no attribute 'model'$"):
        _ = wine_assets.model
    assert "defs" in dir(wine_assets)
