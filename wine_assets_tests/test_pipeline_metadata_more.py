"""The Dagster metadata helpers (wine_assets.pipeline.metadata): values the metadata system cannot hold
(NumPy scalars, NaN, lists, timestamps) become plain Python values or text."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wine_assets.pipeline.metadata import frame_preview, table

pytestmark = pytest.mark.unit


def test_table_cells_become_plain_values():
    row = {
        "count": np.int64(3),
        "share": np.float64(0.25),
        "missing": np.float64("nan"),
        "flag": np.bool_(True),
        "classes": [0, 1],
        "day": pd.Timestamp("2024-01-02"),
    }
    columns = [("count", "int"), ("share", "float"), ("missing", "float"), ("flag", "bool")]
    columns += [("classes", "string"), ("day", "string"), ("absent", "string")]
    (record,) = table([row], columns).value.records
    assert record.data == {
        "count": 3,
        "share": 0.25,
        "missing": None,  # NaN is no value
        "flag": True,
        "classes": "[0, 1]",
        "day": "2024-01-02 00:00:00",
        "absent": None,
    }
    assert type(record.data["count"]) is int and type(record.data["flag"]) is bool


def test_frame_preview_types_the_columns_and_keeps_the_first_rows():
    frame = pd.DataFrame({"alcohol": [13.2, 12.1, 14.0], "target": [0, 1, 2], "source": ["a", "b", "c"]})
    preview = frame_preview(frame, rows=2).value
    assert [(column.name, column.type) for column in preview.schema.columns] == [
        ("alcohol", "float"),
        ("target", "int"),
        ("source", "string"),
    ]
    assert [record.data for record in preview.records] == [
        {"alcohol": 13.2, "target": 0, "source": "a"},
        {"alcohol": 12.1, "target": 1, "source": "b"},
    ]
