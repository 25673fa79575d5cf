"""Evaluation: test-set metrics and the two plots (confusion matrix, feature importance)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import ClassifierMixin
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
)
from sklearn.preprocessing import StandardScaler

from wine_assets.features import features_of
from wine_assets.ingestion import FINGERPRINT_ATTR, SOURCE_ATTR
from wine_assets.validation import CLASS_LABELS, CLASS_VALUES, TARGET_COLUMN

HEADLINE_METRICS: tuple[str, ...] = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
)


def predict_test(model: ClassifierMixin, scaler: StandardScaler, test: pd.DataFrame) -> np.ndarray:
    return model.predict(scaler.transform(features_of(test)))


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    labels: Sequence[int] = CLASS_VALUES,
    label_names: Sequence[str] = CLASS_LABELS,
) -> dict[str, Any]:
    """Headline metrics, the per-class report and the confusion matrix, as plain JSON data."""
    labels = list(labels)
    metrics: dict[str, Any] = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        metrics[f"precision_{average}"] = float(precision)
        metrics[f"recall_{average}"] = float(recall)
        metrics[f"f1_{average}"] = float(f1)
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=list(label_names), output_dict=True, zero_division=0
    )
    metrics["per_class"] = {
        name: {
            "precision": float(report[name]["precision"]),
            "recall": float(report[name]["recall"]),
            "f1": float(report[name]["f1-score"]),
            "support": int(report[name]["support"]),
        }
        for name in label_names
    }
    metrics["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).astype(int).tolist()
    metrics["labels"] = list(label_names)
    return metrics


def evaluate(model: ClassifierMixin, scaler: StandardScaler, train: pd.DataFrame, test: pd.DataFrame) -> dict[str, Any]:
    """Metrics on the test set, plus where the data came from and how many rows each side had."""
    metrics = compute_metrics(test[TARGET_COLUMN].to_numpy(), predict_test(model, scaler, test))
    metrics["data"] = {
        "source": test.attrs.get(SOURCE_ATTR),
        "fingerprint": test.attrs.get(FINGERPRINT_ATTR),
        "train_rows": int(len(train)),
        "test_rows": int(len(test)),
    }
    return metrics


def _figure(width: float, height: float) -> Any:
    # A bare Figure with the Agg canvas: no pyplot, no global backend, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def confusion_matrix_png(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> bytes:
    """A heatmap of the confusion matrix, counts in the cells, as PNG bytes."""
    import seaborn as sns

    figure = _figure(5, 4)
    axes = figure.add_subplot()
    sns.heatmap(
        np.asarray(matrix),
        annot=True,
        fmt="d",
        cmap="Blues",
        cbar=False,
        xticklabels=list(labels),
        yticklabels=list(labels),
        ax=axes,
    )
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.tick_params(axis="y", rotation=0)
    axes.set_title("Confusion matrix (test set)")
    return _png(figure)


def feature_importance_png(
    importances: Sequence[tuple[str, float]], measure: str = "mean decrease in impurity", family: str = "Random Forest"
) -> bytes:
    """A horizontal bar chart of feature importances, most important on top, as PNG bytes."""
    import seaborn as sns

    names = [name for name, _ in importances]
    values = [value for _, value in importances]
    figure = _figure(6, 4.5)
    axes = figure.add_subplot()
    sns.barplot(x=values, y=names, orient="h", color="#4c72b0", ax=axes)
    axes.set_xlabel(measure)
    axes.set_ylabel("")
    axes.set_title(f"{family} feature importance")
    return _png(figure)
