"""The Celery app a worker runs (wine_assets.pipeline.celery_app): broker and backend come from the
environment, and a variable that is unset or blank stops the worker naming it."""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.unit


@pytest.fixture
def celery_app(monkeypatch):
    """The module, imported with both variables set (it builds its app at import)."""
    monkeypatch.setenv("WINE_ASSETS_CELERY_BROKER", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("WINE_ASSETS_CELERY_BACKEND", "redis://127.0.0.1:1/1")
    return importlib.import_module("wine_assets.pipeline.celery_app")


@pytest.mark.parametrize("value", [None, "", "   "])
def test_an_unset_or_blank_variable_stops_the_worker_naming_it(celery_app, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(celery_app.BROKER_ENV)
    else:
        monkeypatch.setenv(celery_app.BROKER_ENV, value)
    with pytest.raises(SystemExit) as caught:
        celery_app._required(celery_app.BROKER_ENV)
    assert str(caught.value) == (
        "WINE_ASSETS_CELERY_BROKER is not set: run `make services` (it writes .services.env) or set it by hand"
    )


def test_a_set_variable_is_read_without_surrounding_blanks(celery_app, monkeypatch):
    monkeypatch.setenv(celery_app.BACKEND_ENV, "  redis://127.0.0.1:6390/1\n")
    assert celery_app._required(celery_app.BACKEND_ENV) == "redis://127.0.0.1:6390/1"
    assert celery_app.execute_plan.name == "execute_plan"  # dagster-celery's step task, registered on the app
