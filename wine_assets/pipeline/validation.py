"""Group ``validation``: pandera checks on ``raw_wine`` and the ``validated_wine`` asset."""

import io
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import pandas as pd
from pandera.errors import SchemaErrorReason

from wine_assets.drift import feature_drift as feature_drift_rows
from wine_assets.pipeline.metadata import column_schema, table, warning_result
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.registry import REFERENCE_FILE, ModelRegistry, RegistryError
from wine_assets.release import ReleaseError, label_check
from wine_assets.validation import (
    DEFAULT_CONCERNS,
    MAX_LISTED_FAILURES,
    WineSchema,
    WineValidationError,
    check_sample_size,
    collect_failures,
    find_outliers,
    group_by_concern,
    validate_frame,
)

FAILURE_COLUMNS = [("column", "string"), ("check", "string"), ("failure_case", "string"), ("row", "int")]

CHECK_DESCRIPTIONS = {
    "schema": "The exact column set (13 features and target, nothing else) with numeric dtypes.",
    "no_missing_values": "No empty cells in any column.",
    "value_ranges": "Each feature within its physical bounds; target in {0, 1, 2}.",
    "sample_size": "Every class has enough rows to stratify the split and still be tested.",
    "outliers": "Share of rows beyond Tukey's fences per feature; a warning, never blocking.",
    "feature_drift": (
        "Each feature's distribution against the training data of the production model (two-sample "
        "Kolmogorov-Smirnov test); warns when a p-value is below validation.drift_p_value."
    ),
}


def pandera_check_results(
    schema: Any,
    frame: pd.DataFrame,
    asset_key: dg.AssetKey,
    concerns: Mapping[str, frozenset[SchemaErrorReason]] = DEFAULT_CONCERNS,
) -> list[dg.AssetCheckResult]:
    """Validate ``frame`` with any pandera schema; one AssetCheckResult per concern.

    A failing result lists its first failure cases as a table (column, check, value, row)
    and counts them per column.
    """
    _, failures = collect_failures(schema, frame)
    results = []
    for name, outcome in group_by_concern(failures, concerns).items():
        metadata: dict[str, Any] = {"failures": len(outcome.failures)}
        if not outcome.passed:
            metadata["failure_cases"] = table(
                [vars(case) for case in outcome.failures[:MAX_LISTED_FAILURES]], FAILURE_COLUMNS
            )
            metadata["failures_by_column"] = outcome.counts_by_column()
            metadata["first_failure"] = outcome.failures[0].describe()
        results.append(
            dg.AssetCheckResult(
                asset_key=asset_key,
                check_name=name,
                passed=bool(outcome.passed),
                severity=dg.AssetCheckSeverity.ERROR,
                metadata=metadata,
                description=CHECK_DESCRIPTIONS.get(name),
            )
        )
    return results


def sample_size_result(
    frame: pd.DataFrame, asset_key: dg.AssetKey, min_rows: int, test_size: float
) -> dg.AssetCheckResult:
    outcome = check_sample_size(frame, min_rows, test_size)
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name="sample_size",
        passed=bool(outcome.passed),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "rows": outcome.rows,
            "rows_per_class": outcome.rows_per_class,
            "expected_test_rows_per_class": outcome.test_rows_per_class,
            "min_rows_per_class": min_rows,
            "problems": "; ".join(outcome.problems) or "none",
        },
    )


def outlier_result(
    frame: pd.DataFrame, asset_key: dg.AssetKey, iqr_factor: float, max_share: float
) -> dg.AssetCheckResult:
    rows = find_outliers(frame, iqr_factor)
    flagged = [row.column for row in rows if row.share > max_share]
    return warning_result(
        asset_key,
        "outliers",
        not flagged,
        f"more than {max_share:.0%} outliers in {', '.join(flagged)}"
        if flagged
        else f"no feature has more than {max_share:.0%} outliers",
        {
            "outliers_per_feature": table(
                [vars(row) for row in rows],
                [
                    ("column", "string"),
                    ("lower_fence", "float"),
                    ("upper_fence", "float"),
                    ("outliers", "int"),
                    ("share", "float"),
                ],
            ),
            "features_over_threshold": ", ".join(flagged) or "none",
            "max_outlier_share": max_share,
            "iqr_factor": iqr_factor,
        },
    )


RAW_CHECK_SPECS: Sequence[dg.AssetCheckSpec] = [
    *(
        dg.AssetCheckSpec(name, asset="raw_wine", blocking=True, description=CHECK_DESCRIPTIONS[name])
        for name in ("schema", "no_missing_values", "value_ranges", "sample_size")
    ),
    *(
        dg.AssetCheckSpec(name, asset="raw_wine", blocking=False, description=CHECK_DESCRIPTIONS[name])
        for name in ("outliers", "feature_drift")
    ),
]


@dg.multi_asset_check(
    specs=RAW_CHECK_SPECS,
    description="Data-quality checks on raw_wine: pandera schema concerns, sample size, outliers, drift.",
)
def raw_wine_checks(raw_wine: pd.DataFrame, params: WineParamsResource) -> Any:
    values = params.values
    key = dg.AssetKey("raw_wine")
    yield from pandera_check_results(WineSchema, raw_wine, key)
    yield sample_size_result(raw_wine, key, values.validation.min_rows_per_class, values.data.test_size)
    yield outlier_result(raw_wine, key, values.validation.outlier_iqr_factor, values.validation.max_outlier_share)
    yield feature_drift_result(raw_wine, ModelRegistry.from_params(values), values.validation.drift_p_value)


@dg.asset(
    group_name="validation",
    code_version="1",
    kinds={"pandas", "pandera"},
    description=(
        "raw_wine passed through the pandera WineSchema: dtypes coerced, bounds enforced. "
        "Refuses a frame that fails the schema, naming the columns, checks and rows."
    ),
    metadata={"dagster/column_schema": column_schema(WineSchema.to_schema())},
)
def validated_wine(context: dg.AssetExecutionContext, raw_wine: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    try:
        frame = validate_frame(raw_wine, WineSchema, what=f"data from {raw_wine.attrs.get('source', 'raw_wine')}")
    except WineValidationError as exc:
        raise dg.Failure(description=str(exc)) from exc
    return dg.Output(
        frame,
        metadata={
            "rows": len(frame),
            "dagster/row_count": len(frame),
            "fingerprint": frame.attrs.get("fingerprint", ""),
        },
    )


def feature_drift_result(raw_wine: pd.DataFrame, registry: ModelRegistry, p_threshold: float) -> dg.AssetCheckResult:
    def warn(passed: bool, description: str, metadata: dict[str, Any]) -> dg.AssetCheckResult:
        return warning_result(dg.AssetKey("raw_wine"), "feature_drift", passed, description, metadata)

    try:
        production = registry.production_version()
        if production is None:
            return warn(True, "no model in production yet: no reference data to compare with", {"reference": "none"})
        reference = pd.read_csv(io.BytesIO(registry.read_file(production, REFERENCE_FILE)))
    except RegistryError as exc:
        return warn(False, f"the production model's reference data cannot be used: {exc}", {"reference": "unusable"})
    rows = feature_drift_rows(raw_wine, reference, p_threshold)
    drifted = [row.feature for row in rows if row.drifted]
    return warn(
        not drifted,
        f"drift in {', '.join(drifted)} against production v{production}"
        if drifted
        else f"no feature drifted against production v{production}",
        {
            "reference": f"v{production} ({len(reference)} training rows)",
            "drifted_features": ", ".join(drifted) or "none",
            "p_value_threshold": p_threshold,
            "ks_tests": table(
                [vars(row) for row in rows],
                [("feature", "string"), ("statistic", "float"), ("p_value", "float"), ("drifted", "bool")],
            ),
        },
    )


DISAGREEMENT_COLUMNS = [("label", "string"), ("production_predicts", "string"), ("rows", "int")]


@dg.asset_check(
    asset=validated_wine,
    name="labels_agree_with_production",
    blocking=True,
    description=(
        "New labels against the trusted model: production predicts every row of the new data, and the "
        "share it agrees with is tested (one-sided exact binomial) against the 95% lower bound of "
        "production's own accuracy on the registry's evaluation set. Far lower agreement "
        "(p < validation.mislabel_p_value) blocks the data as mislabelled before anything trains on "
        "it, naming how many rows and which class pairs disagree. Passes when nothing is in production."
    ),
)
def labels_agree_with_production(validated_wine: pd.DataFrame, params: WineParamsResource) -> dg.AssetCheckResult:
    values = params.values
    try:
        outcome = label_check(validated_wine, ModelRegistry.from_params(values), values)
    except ReleaseError as exc:
        return dg.AssetCheckResult(passed=False, description=str(exc), metadata={"production_version": "unreadable"})
    if outcome is None:
        return dg.AssetCheckResult(
            passed=True,
            description="no model in production yet (or none with recorded test rows): nothing to check labels against",
            metadata={"production_version": "none"},
        )
    return dg.AssetCheckResult(
        passed=outcome.passed,
        description=outcome.message,
        metadata={
            "production_version": f"v{outcome.production_version}",
            "rows": outcome.rows,
            "disagreeing_rows": outcome.rows - outcome.agreeing,
            "agreement": outcome.agreement,
            "expected_at_least": outcome.reference,
            "p_value": outcome.p_value,
            "p_value_threshold": outcome.p_threshold,
            "disagreements": table(
                [
                    {"label": given, "production_predicts": predicted, "rows": count}
                    for given, predicted, count in outcome.disagreements
                ],
                DISAGREEMENT_COLUMNS,
            ),
        },
    )
