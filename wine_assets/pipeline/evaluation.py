"""Group ``evaluation``: test-set metrics, the two plots, and the model-quality gates."""

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from sklearn.base import ClassifierMixin
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
from wine_assets.gates import Challenge, accuracy_gate
from wine_assets.params import Params
from wine_assets.pipeline.metadata import png_markdown, table
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.registry import ModelRegistry
from wine_assets.release import ReleaseError, challenge
from wine_assets.training import feature_importances, importance_label
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
    wine_model: ClassifierMixin,
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
    wine_model: ClassifierMixin, scaler: StandardScaler, test_set: pd.DataFrame, params: WineParamsResource
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
    description=(
        "The model's feature importances as a bar chart (a forest's impurity decrease, a linear model's "
        "mean |coefficient|): <artifacts_dir>/plots/feature_importance.png."
    ),
)
def feature_importance_plot(wine_model: ClassifierMixin, params: WineParamsResource) -> dg.Output[str]:
    family = params.values.model.family.replace("_", " ").capitalize()
    png = feature_importance_png(feature_importances(wine_model, FEATURE_COLUMNS), importance_label(wine_model), family)
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


CHALLENGE_COLUMNS = [
    ("rows", "string"),
    ("n", "int"),
    ("candidate_accuracy", "float"),
    ("production_accuracy", "float"),
    ("change", "float"),
    ("candidate_only_wrong", "int"),
    ("production_only_wrong", "int"),
    ("mcnemar_p", "float"),
    ("verdict", "string"),
]


def challenge_metadata(verdict: Challenge) -> dict[str, Any]:
    """A challenge's figures for the UI: the table of both models on both sets, and the verdict."""
    metadata: dict[str, Any] = {
        "verdict": "passes" if verdict.passed else "refused",
        "production_version": f"v{verdict.production_version}" if verdict.production_version else "none",
        "test": "McNemar exact, one-sided (candidate worse)",
        "alpha": verdict.alpha,
        "max_regression": verdict.max_regression,
    }
    if verdict.comparisons:
        metadata["comparison"] = table(verdict.rows(), CHALLENGE_COLUMNS)
        for item in verdict.comparisons:
            key = item.rows_name.replace(" ", "_")
            metadata[f"{key}/candidate_accuracy"] = item.candidate_accuracy
            metadata[f"{key}/production_accuracy"] = item.production_accuracy
            metadata[f"{key}/p_value"] = item.p_value
    return metadata


def not_worse_than_production_result(
    model: ClassifierMixin, scaler: StandardScaler, test_set: pd.DataFrame, params: Params
) -> dg.AssetCheckResult:
    def result(passed: bool, description: str, metadata: dict[str, Any]) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(
            asset_key=evaluation_metrics.key,
            check_name="not_worse_than_production",
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata=metadata,
            description=description,
        )

    try:
        verdict = challenge(model, scaler, ModelRegistry.from_params(params), params, test_set)
    except ReleaseError as exc:
        return result(False, str(exc), {"verdict": "cannot judge"})
    return result(verdict.passed, verdict.message, challenge_metadata(verdict))


# One step for both: each is blocking, so model_deployment runs only when the model passes the
# accuracy gate and is not worse than the production model from before this run.
@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            "accuracy_threshold",
            asset=evaluation_metrics,
            blocking=True,
            description="The release gate: test accuracy >= evaluation.min_accuracy (0.80 by default).",
        ),
        dg.AssetCheckSpec(
            "not_worse_than_production",
            asset=evaluation_metrics,
            blocking=True,
            additional_deps=["wine_model", "scaler", "test_set"],  # the candidate and the rows it is judged on
            description=(
                "The release is a challenger to production: both models score the same rows, the current "
                "test set and the registry's frozen evaluation set. Refuses a model significantly worse on "
                "either (McNemar's exact test, one-sided, evaluation.alpha) or less accurate by more than "
                "evaluation.max_regression. Passes when nothing is in production yet."
            ),
        ),
    ],
    ins={
        "evaluation_metrics": dg.AssetIn("evaluation_metrics"),
        "wine_model": dg.AssetIn("wine_model"),
        "scaler": dg.AssetIn("scaler"),
        "test_set": dg.AssetIn("test_set"),
    },
    description="Model-quality checks on evaluation_metrics: the release gate and the challenge to production.",
)
def evaluation_checks(
    evaluation_metrics: dict[str, Any],
    wine_model: ClassifierMixin,
    scaler: StandardScaler,
    test_set: pd.DataFrame,
    params: WineParamsResource,
) -> Any:
    values = params.values
    yield accuracy_threshold_result(evaluation_metrics, values.evaluation.min_accuracy)
    yield not_worse_than_production_result(wine_model, scaler, test_set, values)
