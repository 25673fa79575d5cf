"""Helpers that turn plain results into Dagster metadata the UI can show."""

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import pandas as pd

_TYPES = {bool: "bool", int: "int", float: "float", str: "string"}


def _plain(value: Any) -> Any:
    """A value the metadata system accepts: numpy scalars to Python, NaN and others to text."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item") and not isinstance(value, (list, dict)):
        value = value.item()
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, int):
        return value
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> dg.MetadataValue:
    """A table for the UI; ``columns`` are (name, type) with type one of string/int/float/bool."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in columns])
    records = [dg.TableRecord({name: _plain(row.get(name)) for name, _ in columns}) for row in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def frame_preview(frame: pd.DataFrame, rows: int = 5) -> dg.MetadataValue:
    head = frame.head(rows)
    columns = [
        (
            str(name),
            "float"
            if pd.api.types.is_float_dtype(dtype)
            else "int"
            if pd.api.types.is_integer_dtype(dtype)
            else "string",
        )
        for name, dtype in head.dtypes.items()
    ]
    return table(head.to_dict("records"), columns)


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG embedded as a base64 markdown image, so the asset page shows the picture."""
    encoded = base64.b64encode(png).decode("ascii")
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def column_schema(schema: Any) -> dg.TableSchema:
    """The ``dagster/column_schema`` of a pandera schema: names, dtypes, bounds, nullability."""
    columns = []
    for name, column in schema.columns.items():
        checks = [str(getattr(check, "error", None) or check) for check in column.checks]
        columns.append(
            dg.TableColumn(
                name=str(name),
                type=str(column.dtype),
                description=column.description,
                constraints=dg.TableColumnConstraints(nullable=bool(column.nullable), other=checks),
            )
        )
    return dg.TableSchema(columns=columns)


def warning_result(
    asset_key: dg.AssetKey, check_name: str, passed: bool, description: str, metadata: Mapping[str, Any]
) -> dg.AssetCheckResult:
    """A check result of WARN severity: shown as a warning when it fails, never blocking."""
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=check_name,
        passed=bool(passed),
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata=dict(metadata),
    )
