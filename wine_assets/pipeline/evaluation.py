"""Group ``evaluation``: test-set metrics, the two plots, and the model-quality gates."""

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.preprocessing import StandardScaler

from wine_assets.evaluation import (
    HEADLINE_METRICS,
    compute_metrics,
    confusion_matrix_png,
    evaluate,
    feature_importance_png,
    predict_test,
)
from wine_assets.files import write_bytes_atomic, write_json_atomic
from wine_assets.gates import accuracy_gate, regression_gate
from wine_assets.pipeline.metadata import png_markdown, table, warning_result
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.registry import ModelRegistry, RegistryError
from wine_assets.training import feature_importances
from wine_assets.validation import FEATURE_COLUMNS, TARGET_COLUMN


@dg.asset(
    group_name="evaluation",
    code_version="1",
    kinds={"scikitlearn"},
    description=(
        "Accuracy, precision, recall and F1 (macro and weighted), the per-class report and the "
        "confusion matrix on test_set; also written to <artifacts_dir>/metrics.json."
    ),
)
def evaluation_metrics(
    context: dg.AssetExecutionContext,
    wine_model: RandomForestClassifier,
    scaler: StandardScaler,
    train_set: pd.DataFrame,
    test_set: pd.DataFrame,
    params: WineParamsResource,
) -> dg.Output[dict[str, Any]]:
    metrics = evaluate(wine_model, scaler, train_set, test_set)
    metrics["params"] = params.values.to_dict()  # so any metrics.json can serve as a report baseline
    path = params.values.artifacts_dir / "metrics.json"
    write_json_atomic(path, metrics)
    context.log.info("test accuracy %.4f on %d rows; metrics written to %s", metrics["accuracy"], len(test_set), path)
    per_class = [{"class": name, **values} for name, values in metrics["per_class"].items()]
    return dg.Output(
        metrics,
        metadata={
            **{name: dg.MetadataValue.float(metrics[name]) for name in HEADLINE_METRICS},
            "test_rows": len(test_set),
            "per_class": table(
                per_class,
                [("class", "string"), ("precision", "float"), ("recall", "float"), ("f1", "float"), ("support", "int")],
            ),
            "confusion_matrix": dg.MetadataValue.json(
                {"labels": metrics["labels"], "matrix": metrics["confusion_matrix"]}
            ),
            "path": dg.MetadataValue.path(str(path)),
        },
    )


def _write_plot(directory: Path, name: str, png: bytes) -> Path:
    path = directory / "plots" / name
    write_bytes_atomic(path, png)
    return path


# Drawn from the model and the test rows, not from evaluation_metrics: a failing accuracy gate
# skips everything downstream of evaluation_metrics, and that is when the matrix matters most.
@dg.asset(
    group_name="evaluation",
    code_version="1",
    kinds={"seaborn"},
    description="The test-set confusion matrix as a heatmap: <artifacts_dir>/plots/confusion_matrix.png.",
)
def confusion_matrix_plot(
    wine_model: RandomForestClassifier, scaler: StandardScaler, test_set: pd.DataFrame, params: WineParamsResource
) -> dg.Output[str]:
    metrics = compute_metrics(test_set[TARGET_COLUMN].to_numpy(), predict_test(wine_model, scaler, test_set))
    png = confusion_matrix_png(metrics["confusion_matrix"], metrics["labels"])
    path = _write_plot(params.values.artifacts_dir, "confusion_matrix.png", png)
    return dg.Output(
        str(path), metadata={"plot": png_markdown(png, "confusion matrix"), "path": dg.MetadataValue.path(str(path))}
    )


@dg.asset(
    group_name="evaluation",
    code_version="1",
    kinds={"seaborn"},
    description="The forest's feature importances as a bar chart: <artifacts_dir>/plots/feature_importance.png.",
)
def feature_importance_plot(wine_model: RandomForestClassifier, params: WineParamsResource) -> dg.Output[str]:
    png = feature_importance_png(feature_importances(wine_model, FEATURE_COLUMNS))
    path = _write_plot(params.values.artifacts_dir, "feature_importance.png", png)
    return dg.Output(
        str(path), metadata={"plot": png_markdown(png, "feature importance"), "path": dg.MetadataValue.path(str(path))}
    )


def accuracy_threshold_result(metrics: dict[str, Any], min_accuracy: float) -> dg.AssetCheckResult:
    gate = accuracy_gate(metrics["accuracy"], min_accuracy)
    return dg.AssetCheckResult(
        asset_key=evaluation_metrics.key,
        check_name="accuracy_threshold",
        passed=bool(gate.passed),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"accuracy": gate.accuracy, "threshold": gate.threshold, "margin": gate.margin},
        description=gate.message,
    )


def no_regression_result(
    metrics: dict[str, Any], registry: ModelRegistry, max_regression: float
) -> dg.AssetCheckResult:
    def warn(passed: bool, description: str, metadata: dict[str, Any]) -> dg.AssetCheckResult:
        return warning_result(evaluation_metrics.key, "no_regression", passed, description, metadata)

    try:
        production = registry.production_manifest()
    except RegistryError as exc:
        return warn(
            False,
            f"the production model cannot be read, so there is nothing to compare with: {exc}",
            {"accuracy": float(metrics["accuracy"])},
        )
    gate = regression_gate(metrics["accuracy"], production, max_regression)
    metadata: dict[str, Any] = {"accuracy": gate.accuracy, "max_regression": gate.max_regression}
    if gate.production_version is not None:
        metadata.update(
            production_version=gate.production_version,
            production_accuracy=gate.production_accuracy,
            change=gate.change,
        )
    return warn(bool(gate.passed), gate.message, metadata)


# One step for both: model_deployment waits for the blocking gate, so no_regression always
# compares with the production model from before this run, without blocking anything itself.
@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            "accuracy_threshold",
            asset=evaluation_metrics,
            blocking=True,
            description="The release gate: test accuracy >= evaluation.min_accuracy (0.80 by default).",
        ),
        dg.AssetCheckSpec(
            "no_regression",
            asset=evaluation_metrics,
            blocking=False,
            description=(
                "Warns when test accuracy is more than evaluation.max_regression (0.02 by default) below the "
                "production model's. Passes when nothing is in production yet."
            ),
        ),
    ],
    description="Model-quality checks on evaluation_metrics: the release gate and the regression warning.",
)
def evaluation_checks(evaluation_metrics: dict[str, Any], params: WineParamsResource) -> Any:
    values = params.values
    yield accuracy_threshold_result(evaluation_metrics, values.evaluation.min_accuracy)
    yield no_regression_result(evaluation_metrics, ModelRegistry(values.registry_dir), values.evaluation.max_regression)
