"""Validation: the wine schema (pandera) and the data-quality rules built on it.

Bounds come from the summary statistics that ship with the data set
(``sklearn.datasets.load_wine().DESCR``, from the UCI wine recognition data):
each feature must lie between half its documented minimum and twice its
documented maximum. That is wide enough for new harvests and the synthetic
data of the benchmarks, narrow enough to catch unit mix-ups (alcohol as a
fraction instead of percent, proline in g/L instead of mg/L) and sign errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrorReason, SchemaErrors
from pandera.typing import Series

TARGET_COLUMN = "target"
CLASS_VALUES: tuple[int, ...] = (0, 1, 2)
CLASS_LABELS: tuple[str, ...] = ("class_0", "class_1", "class_2")

# feature: (documented min, documented max), in the order scikit-learn lists them.
DOCUMENTED_RANGES: dict[str, tuple[float, float]] = {
    "alcohol": (11.0, 14.8),  # percent by volume
    "malic_acid": (0.74, 5.80),
    "ash": (1.36, 3.23),
    "alcalinity_of_ash": (10.6, 30.0),
    "magnesium": (70.0, 162.0),
    "total_phenols": (0.98, 3.88),
    "flavanoids": (0.34, 5.08),
    "nonflavanoid_phenols": (0.13, 0.66),
    "proanthocyanins": (0.41, 3.58),
    "color_intensity": (1.28, 13.0),
    "hue": (0.48, 1.71),
    "od280/od315_of_diluted_wines": (1.27, 4.00),
    "proline": (278.0, 1680.0),
}
FEATURE_COLUMNS: tuple[str, ...] = tuple(DOCUMENTED_RANGES)
BOUNDS: dict[str, tuple[float, float]] = {
    name: (round(low / 2, 4), round(high * 2, 4)) for name, (low, high) in DOCUMENTED_RANGES.items()
}


def _feature(name: str) -> Any:
    low, high = BOUNDS[name]
    return pa.Field(ge=low, le=high, nullable=False, alias=name)


class WineFeatures(pa.DataFrameModel):
    """The 13 measured features: float, present, not null, within physical bounds."""

    alcohol: Series[float] = _feature("alcohol")
    malic_acid: Series[float] = _feature("malic_acid")
    ash: Series[float] = _feature("ash")
    alcalinity_of_ash: Series[float] = _feature("alcalinity_of_ash")
    magnesium: Series[float] = _feature("magnesium")
    total_phenols: Series[float] = _feature("total_phenols")
    flavanoids: Series[float] = _feature("flavanoids")
    nonflavanoid_phenols: Series[float] = _feature("nonflavanoid_phenols")
    proanthocyanins: Series[float] = _feature("proanthocyanins")
    color_intensity: Series[float] = _feature("color_intensity")
    hue: Series[float] = _feature("hue")
    od280_od315: Series[float] = _feature("od280/od315_of_diluted_wines")
    proline: Series[float] = _feature("proline")

    class Config:
        coerce = True  # a value that cannot become a float is reported with its row


class WineSchema(WineFeatures):
    """A labelled training frame: the features plus ``target`` in {0, 1, 2}, nothing else."""

    target: Series[int] = pa.Field(isin=list(CLASS_VALUES), nullable=False)

    class Config:
        coerce = True
        strict = True  # the exact column set: an extra column is an error


# Which pandera failure belongs to which data-quality concern (one asset check each).
SCHEMA_REASONS = frozenset(
    {
        SchemaErrorReason.COLUMN_NOT_IN_DATAFRAME,
        SchemaErrorReason.COLUMN_NOT_IN_SCHEMA,
        SchemaErrorReason.WRONG_DATATYPE,
        SchemaErrorReason.DATATYPE_COERCION,
        SchemaErrorReason.DUPLICATE_COLUMN_LABELS,
        SchemaErrorReason.MISMATCH_INDEX,
        SchemaErrorReason.COLUMN_NOT_ORDERED,
        SchemaErrorReason.SCHEMA_COMPONENT_CHECK,
    }
)
MISSING_VALUE_REASONS = frozenset({SchemaErrorReason.SERIES_CONTAINS_NULLS})
VALUE_REASONS = frozenset(
    {
        SchemaErrorReason.DATAFRAME_CHECK,
        SchemaErrorReason.CHECK_ERROR,
        SchemaErrorReason.SERIES_CONTAINS_DUPLICATES,
        SchemaErrorReason.INVALID_COLUMN_NAME,
    }
)
DEFAULT_CONCERNS: dict[str, frozenset[SchemaErrorReason]] = {
    "schema": SCHEMA_REASONS,
    "no_missing_values": MISSING_VALUE_REASONS,
    "value_ranges": VALUE_REASONS,
}
MAX_LISTED_FAILURES = 20


@dataclass(frozen=True)
class FailureCase:
    """One pandera failure, flattened: which column, which check, what value, which row."""

    column: str
    check: str
    failure_case: str
    row: int | None
    reason: str

    def describe(self) -> str:
        where = f"row {self.row}" if self.row is not None else "the frame"
        return f"column '{self.column}', check {self.check}, {where}: {self.failure_case}"


@dataclass(frozen=True)
class ConcernResult:
    """The outcome of one concern: passed, and the failure cases that belong to it."""

    name: str
    failures: list[FailureCase] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def counts_by_column(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for case in self.failures:
            counts[case.column] = counts.get(case.column, 0) + 1
        return counts


def _check_name(error: Any) -> str:
    check = getattr(error, "check", None)
    if check is None:
        return "unknown"
    if isinstance(check, str):
        return check
    return str(getattr(check, "error", None) or getattr(check, "name", None) or check)


def _flatten(error: Any) -> list[FailureCase]:
    """Turn one pandera SchemaError into failure cases with plain Python values."""
    reason = error.reason_code
    check = _check_name(error)
    cases = error.failure_cases
    column = getattr(error, "column_name", None)
    if column is None and isinstance(getattr(error, "schema", None), pa.Column):
        column = error.schema.name
    if isinstance(cases, pd.DataFrame):
        rows = []
        for record in cases.to_dict("records"):
            index = record.get("index")
            row = None if index is None or pd.isna(index) else int(index)
            rows.append(
                FailureCase(
                    column=str(column if column is not None else record.get("column", "")),
                    check=check,
                    failure_case=str(record.get("failure_case")),
                    row=row,
                    reason=reason.name,
                )
            )
        return rows
    # Frame-level failures (a missing or extra column) carry the column name as the case.
    if reason in (SchemaErrorReason.COLUMN_NOT_IN_DATAFRAME, SchemaErrorReason.COLUMN_NOT_IN_SCHEMA):
        text = "column missing" if reason is SchemaErrorReason.COLUMN_NOT_IN_DATAFRAME else "column not in schema"
        return [FailureCase(str(cases), check, text, None, reason.name)]
    if reason is SchemaErrorReason.CHECK_ERROR:
        # A range check on a column that is not numeric cannot run; the schema check names the values.
        return [FailureCase(str(column or ""), check, f"could not be evaluated: {cases}", None, reason.name)]
    return [FailureCase(str(column or ""), check, str(cases), None, reason.name)]


def collect_failures(schema: Any, frame: pd.DataFrame) -> tuple[pd.DataFrame | None, list[FailureCase]]:
    """Validate lazily with any pandera schema; return the validated frame (or None) and every failure."""
    try:
        return schema.validate(frame, lazy=True), []
    except SchemaErrors as errors:
        cases = [case for error in errors.schema_errors for case in _flatten(error)]
        return None, cases


def group_by_concern(
    failures: Iterable[FailureCase],
    concerns: Mapping[str, frozenset[SchemaErrorReason]] = DEFAULT_CONCERNS,
) -> dict[str, ConcernResult]:
    """Sort failure cases into concerns; a reason no concern claims goes to the first one."""
    grouped: dict[str, list[FailureCase]] = {name: [] for name in concerns}
    fallback = next(iter(concerns))
    for case in failures:
        target = next(
            (name for name, reasons in concerns.items() if SchemaErrorReason[case.reason] in reasons),
            fallback,
        )
        grouped[target].append(case)
    return {name: ConcernResult(name, cases) for name, cases in grouped.items()}


class WineValidationError(ValueError):
    """A frame failed the wine schema; the message lists columns, checks and rows."""

    def __init__(self, failures: list[FailureCase], what: str = "data"):
        self.failures = failures
        shown = "\n".join(f"  - {case.describe()}" for case in failures[:MAX_LISTED_FAILURES])
        more = len(failures) - MAX_LISTED_FAILURES
        tail = f"\n  ... and {more} more" if more > 0 else ""
        columns = sorted({case.column for case in failures})
        super().__init__(
            f"{what} failed the wine schema: {len(failures)} problem(s) in column(s) "
            f"{', '.join(columns)}:\n{shown}{tail}"
        )


def validate_frame(frame: pd.DataFrame, schema: Any = WineSchema, what: str = "data") -> pd.DataFrame:
    """The frame coerced to the schema's dtypes, or WineValidationError listing every failure."""
    validated, failures = collect_failures(schema, frame)
    if failures or validated is None:
        raise WineValidationError(failures, what)
    validated.attrs = dict(frame.attrs)
    return validated


@dataclass(frozen=True)
class SampleSizeResult:
    passed: bool
    rows: int
    rows_per_class: dict[str, int]
    test_rows_per_class: dict[str, float]
    problems: list[str]


def check_sample_size(frame: pd.DataFrame, min_rows_per_class: int, test_size: float) -> SampleSizeResult:
    """Enough rows in every class to stratify the split and still test each class."""
    problems: list[str] = []
    if TARGET_COLUMN not in frame.columns:
        return SampleSizeResult(False, len(frame), {}, {}, [f"column '{TARGET_COLUMN}' is missing"])
    counts = frame[TARGET_COLUMN].value_counts()
    per_class = {str(value): int(counts.get(value, 0)) for value in CLASS_VALUES}
    expected_test = {label: round(count * test_size, 2) for label, count in per_class.items()}
    for label, count in per_class.items():
        if count < min_rows_per_class:
            problems.append(
                f"class {label} has {count} rows, fewer than validation.min_rows_per_class = {min_rows_per_class}"
            )
        elif count * test_size < 1 or count * (1 - test_size) < 1:
            problems.append(
                f"class {label} has {count} rows: with data.test_size = {test_size} "
                "one side of the split would hold none of it"
            )
    return SampleSizeResult(not problems, int(len(frame)), per_class, expected_test, problems)


@dataclass(frozen=True)
class OutlierRow:
    column: str
    lower_fence: float
    upper_fence: float
    outliers: int
    share: float


def find_outliers(frame: pd.DataFrame, iqr_factor: float) -> list[OutlierRow]:
    """Per numeric feature, the rows beyond Tukey's fences (Q1 - k*IQR, Q3 + k*IQR)."""
    rows = []
    for column in FEATURE_COLUMNS:
        if column not in frame.columns:
            continue
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        values = values[~np.isnan(values)]
        if values.size == 0:
            continue
        q1, q3 = np.percentile(values, [25, 75])
        spread = iqr_factor * (q3 - q1)
        low, high = float(q1 - spread), float(q3 + spread)
        count = int(np.count_nonzero((values < low) | (values > high)))
        rows.append(OutlierRow(column, low, high, count, count / values.size))
    return rows


def schema_bounds(schema: Any) -> dict[str, tuple[float, float]] | None:
    """(min, max) per column from a pandera schema's ge/le checks.

    None when a column is nullable or carries any other check: then only pandera can decide.
    """
    bounds = {}
    for name, column in schema.columns.items():
        if column.nullable:
            return None
        low, high = -np.inf, np.inf
        for check in column.checks:
            if check.name == "greater_than_or_equal_to":
                low = float(check.statistics["min_value"])
            elif check.name == "less_than_or_equal_to":
                high = float(check.statistics["max_value"])
            else:
                return None
        bounds[str(name)] = (low, high)
    return bounds


_FEATURE_BOUNDS = schema_bounds(WineFeatures.to_schema())


def fast_features_valid(frame: pd.DataFrame) -> bool:
    """True only when pandera's WineFeatures would accept these feature columns unchanged.

    A vectorized pass over the same bounds as the schema, so valid input skips pandera's
    per-call overhead; False means "let pandera look", which then reports every failure.
    """
    if _FEATURE_BOUNDS is None or list(frame.columns) != list(_FEATURE_BOUNDS):
        return False
    if not all(
        pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype) for dtype in frame.dtypes
    ):
        return False
    values = frame.to_numpy(dtype=np.float64)
    lows = np.array([low for low, _ in _FEATURE_BOUNDS.values()])
    highs = np.array([high for _, high in _FEATURE_BOUNDS.values()])
    return bool(not np.isnan(values).any() and (values >= lows).all() and (values <= highs).all())
