"""Reading CSV sources (wine_assets.ingestion): a file pandas cannot parse is an error naming the file
and the params key; class counts of a frame without a target are empty."""

from __future__ import annotations

import pandas as pd
import pytest

from wine_assets.ingestion import IngestionError, class_counts, read_csv_source

pytestmark = pytest.mark.unit


def test_a_csv_with_ragged_rows_names_the_file_and_key(tmp_path):
    path = tmp_path / "wine.csv"
    path.write_text("alcohol,ash\n13.2,2.1\n12.0,2.2,9.9,1.0\n", encoding="utf-8")
    with pytest.raises(IngestionError) as caught:
        read_csv_source(path, "experiments.datasets.ragged")
    message = str(caught.value)
    assert message.startswith(f"experiments.datasets.ragged: data file {path} is not a readable CSV: ")
    assert "Expected 2 fields in line 3, saw 4" in message


def test_class_counts_without_a_target_are_empty():
    assert class_counts(pd.DataFrame({"alcohol": [13.2, 12.0]})) == {}
    assert class_counts(pd.DataFrame({"label": [2, 0, 2]}), target="label") == {"0": 1, "2": 2}
