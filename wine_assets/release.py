"""Release: package the evaluated model as a registry bundle and prove it works once loaded."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd
from sklearn.metrics import accuracy_score

from wine_assets.evaluation import HEADLINE_METRICS, predict_test
from wine_assets.files import joblib_bytes, json_text
from wine_assets.params import Params, params_to_yaml
from wine_assets.registry import Bundle, ModelRegistry, PublishResult, git_commit
from wine_assets.validation import CLASS_LABELS, CLASS_VALUES, FEATURE_COLUMNS, TARGET_COLUMN


class ReleaseError(RuntimeError):
    """The bundle loaded back from the registry does not behave like the evaluated model."""


def bundle_files(model: Any, scaler: Any, metrics: dict[str, Any], params: Params) -> dict[str, bytes]:
    return {
        "model.joblib": joblib_bytes(model),
        "scaler.joblib": joblib_bytes(scaler),
        "metrics.json": json_text(metrics).encode("utf-8"),
        "params.yaml": params_to_yaml(params).encode("utf-8"),
    }


def manifest_fields(metrics: dict[str, Any], params: Params, run_id: str | None) -> dict[str, Any]:
    data = metrics.get("data", {})
    return {
        "data_fingerprint": data.get("fingerprint"),
        "data_source": data.get("source"),
        "git_commit": git_commit(params.base_dir),
        "dagster_run_id": run_id,
        "metrics": {name: metrics[name] for name in HEADLINE_METRICS},
        "feature_names": list(FEATURE_COLUMNS),
        "class_values": list(CLASS_VALUES),
        "class_labels": list(CLASS_LABELS),
    }


def reproduces_accuracy(test: pd.DataFrame, expected: float) -> Callable[[Bundle], None]:
    """A publish check: the loaded bundle must score ``expected`` accuracy on ``test`` again."""

    def check(bundle: Bundle) -> None:
        accuracy = float(accuracy_score(test[TARGET_COLUMN], predict_test(bundle.model, bundle.scaler, test)))
        if not math.isclose(accuracy, expected, rel_tol=0, abs_tol=1e-12):
            raise ReleaseError(
                f"the released bundle scores {accuracy:.4f} on the test set, not the evaluated "
                f"{expected:.4f}: production was not moved"
            )

    return check


def release(
    model: Any,
    scaler: Any,
    metrics: dict[str, Any],
    test: pd.DataFrame,
    params: Params,
    run_id: str | None = None,
) -> PublishResult:
    """Publish to the registry in params and move production, after the simulated production check."""
    registry = ModelRegistry(params.registry_dir)
    return registry.publish(
        bundle_files(model, scaler, metrics, params),
        manifest_fields(metrics, params, run_id),
        check=reproduces_accuracy(test, float(metrics["accuracy"])),
    )
