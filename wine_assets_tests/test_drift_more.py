"""Feature drift (wine_assets.drift): what is left out of the tests, and the seeded reference sample."""

from __future__ import annotations

import pandas as pd
import pytest

from wine_assets.drift import feature_drift, reference_sample
from wine_assets.validation import FEATURE_COLUMNS

pytestmark = pytest.mark.unit


def named(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.rename(columns=dict(zip(frame.columns[:13], FEATURE_COLUMNS, strict=True)))


def test_a_feature_with_no_numbers_on_either_side_is_left_out(wine_frame):
    reference = named(wine_frame)
    current = reference.copy()
    current["ash"] = ["n/a"] * len(current)  # text only: nothing to compare
    current = current.drop(columns="proline")  # absent: nothing to compare
    rows = feature_drift(current, reference, p_threshold=0.05)
    assert [row.feature for row in rows] == [name for name in FEATURE_COLUMNS if name not in ("ash", "proline")]
    assert not any(row.drifted for row in rows)  # the same data has not drifted
    assert all(row.statistic == 0.0 and row.p_value == 1.0 for row in rows)


def test_the_same_data_shifted_has_drifted(wine_frame):
    reference = named(wine_frame)
    current = reference.copy()
    current["alcohol"] = current["alcohol"] + 10.0  # past every training value
    drifted = {row.feature: row for row in feature_drift(current, reference, p_threshold=0.05)}
    assert drifted["alcohol"].drifted and drifted["alcohol"].statistic == 1.0
    assert not drifted["malic_acid"].drifted


def test_the_reference_sample_is_seeded_and_bounded(wine_frame):
    train = named(wine_frame)
    sample = reference_sample(train, max_rows=50, seed=3)
    assert list(sample.columns) == list(FEATURE_COLUMNS) and len(sample) == 50
    assert sample.equals(reference_sample(train, max_rows=50, seed=3))
    assert list(sample.index) == list(range(50))
    assert reference_sample(train, max_rows=1000, seed=3).equals(train[list(FEATURE_COLUMNS)])
