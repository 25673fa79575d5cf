import numpy as np
import pandas as pd
import pytest

from wine_assets.validation import (
    BOUNDS,
    DOCUMENTED_RANGES,
    FEATURE_COLUMNS,
    WineFeatures,
    WineSchema,
    WineValidationError,
    check_sample_size,
    collect_failures,
    find_outliers,
    group_by_concern,
    validate_frame,
)


def concerns_of(frame):
    _, failures = collect_failures(WineSchema, frame)
    return group_by_concern(failures)


@pytest.mark.unit
def test_the_builtin_data_passes_every_concern(wine_frame):
    results = concerns_of(wine_frame)
    assert list(results) == ["schema", "no_missing_values", "value_ranges"]
    assert all(result.passed for result in results.values())


@pytest.mark.unit
def test_bounds_are_half_the_documented_minimum_to_twice_the_maximum():
    assert set(BOUNDS) == set(FEATURE_COLUMNS) and len(FEATURE_COLUMNS) == 13
    for name, (low, high) in DOCUMENTED_RANGES.items():
        assert BOUNDS[name] == (pytest.approx(low / 2), pytest.approx(high * 2))
    assert BOUNDS["alcohol"] == (5.5, 29.6)


@pytest.mark.unit
def test_a_missing_value_fails_only_no_missing_values_and_names_the_row(wine_frame):
    frame = wine_frame.copy()
    frame.loc[17, "ash"] = np.nan
    results = concerns_of(frame)
    assert results["schema"].passed and results["value_ranges"].passed
    [case] = results["no_missing_values"].failures
    assert (case.column, case.row, case.check) == ("ash", 17, "not_nullable")


@pytest.mark.unit
def test_an_out_of_range_value_fails_value_ranges_with_column_row_and_value(wine_frame):
    frame = wine_frame.copy()
    frame.loc[5, "hue"] = -0.5
    frame.loc[9, "target"] = 7
    results = concerns_of(frame)
    assert results["schema"].passed and results["no_missing_values"].passed
    cases = {(case.column, case.row, case.failure_case) for case in results["value_ranges"].failures}
    assert cases == {("hue", 5, "-0.5"), ("target", 9, "7")}


@pytest.mark.unit
def test_missing_and_extra_columns_fail_the_schema_concern(wine_frame):
    frame = wine_frame.drop(columns=["proline"]).assign(vintage=2020)
    schema = concerns_of(frame)["schema"]
    found = {(case.column, case.failure_case) for case in schema.failures}
    assert ("proline", "column missing") in found
    assert ("vintage", "column not in schema") in found


@pytest.mark.unit
def test_a_non_numeric_value_fails_the_schema_concern_naming_its_row(wine_frame):
    frame = wine_frame.copy()
    frame["magnesium"] = frame["magnesium"].astype(object)
    frame.loc[42, "magnesium"] = "high"
    results = concerns_of(frame)
    rows = {(case.column, case.row, case.failure_case) for case in results["schema"].failures}
    assert ("magnesium", 42, "high") in rows
    # The range checks cannot run on text: that is a failure too, never a silent pass.
    assert not results["value_ranges"].passed


@pytest.mark.unit
def test_validate_frame_coerces_and_keeps_attrs(wine_frame):
    frame = wine_frame.copy()
    frame["proline"] = frame["proline"].astype(int)
    frame.attrs = {"source": "x", "fingerprint": "y"}
    validated = validate_frame(frame)
    assert validated["proline"].dtype == np.float64
    assert validated.attrs == {"source": "x", "fingerprint": "y"}


@pytest.mark.unit
def test_validate_frame_error_lists_columns_checks_and_rows(wine_frame):
    frame = wine_frame.copy()
    frame.loc[3, "alcohol"] = 95.0
    with pytest.raises(WineValidationError) as error:
        validate_frame(frame, what="data from wine.csv")
    message = str(error.value)
    assert "data from wine.csv failed the wine schema: 1 problem(s) in column(s) alcohol" in message
    assert "column 'alcohol', check less_than_or_equal_to(29.6), row 3: 95.0" in message


@pytest.mark.unit
def test_feature_schema_ignores_the_target_and_extra_columns(wine_frame):
    validated = WineFeatures.validate(wine_frame.assign(note="x"))
    assert "note" in validated.columns


@pytest.mark.unit
def test_sample_size_passes_on_the_builtin_data(wine_frame):
    result = check_sample_size(wine_frame, min_rows_per_class=10, test_size=0.2)
    assert result.passed
    assert result.rows_per_class == {"0": 59, "1": 71, "2": 48}


@pytest.mark.unit
def test_sample_size_fails_for_a_small_or_absent_class(wine_frame):
    few = pd.concat([wine_frame[wine_frame.target != 2], wine_frame[wine_frame.target == 2].head(4)])
    result = check_sample_size(few, min_rows_per_class=10, test_size=0.2)
    assert not result.passed
    assert result.problems == ["class 2 has 4 rows, fewer than validation.min_rows_per_class = 10"]
    absent = check_sample_size(wine_frame[wine_frame.target != 0], 10, 0.2)
    assert absent.rows_per_class["0"] == 0 and not absent.passed
    assert not check_sample_size(wine_frame.drop(columns="target"), 10, 0.2).passed


@pytest.mark.unit
def test_sample_size_fails_when_the_split_would_leave_a_class_out(wine_frame):
    small = wine_frame.groupby("target").head(12)
    result = check_sample_size(small, min_rows_per_class=10, test_size=0.05)
    assert not result.passed
    assert "one side of the split would hold none of it" in result.problems[0]


@pytest.mark.unit
def test_outliers_are_counted_per_feature(wine_frame):
    clean = {row.column: row for row in find_outliers(wine_frame, 1.5)}
    assert clean["alcohol"].outliers == 0
    assert max(row.share for row in clean.values()) < 0.05
    frame = wine_frame.copy()
    frame.loc[:19, "alcohol"] = 14.8 + np.arange(20)  # 20 of 178 rows far above Q3
    flagged = {row.column: row for row in find_outliers(frame, 1.5)}
    assert flagged["alcohol"].outliers >= 15
    assert flagged["alcohol"].share > 0.05
