"""wine_assets: a wine classifier as Dagster software-defined assets.

``dagster ... -m wine_assets`` finds ``defs`` here. It is imported on first use, so
``wine_assets.predict`` and the CLI do not pay for importing Dagster.
"""

from __future__ import annotations

from typing import Any

__all__ = ["defs"]


def __getattr__(name: str) -> Any:
    if name == "defs":
        try:
            from wine_assets.definitions import defs
        except AttributeError as exc:  # would otherwise surface as "cannot import name 'defs'"
            raise ImportError(f"wine_assets.definitions failed to load: {exc!r}") from exc
        return defs
    raise AttributeError(f"module 'wine_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"defs"})
