"""Release: publish exactly the model bytes that were evaluated, and prove they still work.

A fitted forest pickled again after a load is not byte-identical to the file written at
training time, so the release never re-serializes: it reads ``model.joblib`` and
``scaler.joblib`` from the artifacts folder and refuses them unless their sha256 equals
what the evaluation scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from sklearn.metrics import accuracy_score

from wine_assets.drift import reference_sample
from wine_assets.evaluation import HEADLINE_METRICS, predict_test
from wine_assets.features import frame_digest
from wine_assets.files import json_text, sha256_bytes
from wine_assets.gates import accuracy_gate
from wine_assets.params import Params, params_to_yaml
from wine_assets.registry import (
    MODEL_FILE,
    REFERENCE_FILE,
    SCALER_FILE,
    Bundle,
    ModelRegistry,
    PublishResult,
    git_commit,
)
from wine_assets.validation import CLASS_LABELS, CLASS_VALUES, FEATURE_COLUMNS, TARGET_COLUMN


class ReleaseError(RuntimeError):
    """The artifacts cannot be released; the message says why and what to run."""


def read_evaluated_artifacts(artifacts_dir: Path, evaluated: Mapping[str, str | None]) -> dict[str, bytes]:
    """The model and scaler file bytes, refused unless each sha256 equals the evaluated one."""
    files = {}
    for name in (MODEL_FILE, SCALER_FILE):
        path = artifacts_dir / name
        expected = evaluated.get(name)
        if expected is None:
            raise ReleaseError(
                f"there is no record of which {name} evaluation_metrics scored: "
                "materialize training_job (or everything) before releasing"
            )
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            raise ReleaseError(f"{path} is missing: run training_job to write it") from None
        actual = sha256_bytes(content)
        if actual != expected:
            raise ReleaseError(
                f"{path} (sha256 {actual[:12]}) is not the file evaluation_metrics scored "
                f"(sha256 {expected[:12]}): it was rewritten after the evaluation. Re-run training_job "
                "so the evaluation and the file match, then release."
            )
        files[name] = content
    return files


def check_evaluated_frames(train: pd.DataFrame, test: pd.DataFrame, evaluated: Mapping[str, str | None]) -> None:
    """Refuse train and test rows other than the ones evaluation_metrics used."""
    for name, frame in (("train_set", train), ("test_set", test)):
        expected = evaluated.get(name)
        if expected is None:
            raise ReleaseError(
                f"there is no record of which {name} evaluation_metrics used: "
                "materialize training_job (or everything) before releasing"
            )
        if frame_digest(frame) != expected:
            raise ReleaseError(
                f"the stored {name} is not the one evaluation_metrics used (it was re-materialized "
                "after the evaluation). Re-run training_job, then release."
            )


def manifest_fields(metrics: Mapping[str, Any], params: Params, run_id: str | None) -> dict[str, Any]:
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
    """A publish check: the bundle loaded from the registry must score ``expected`` on ``test`` again."""

    def check(bundle: Bundle) -> None:
        accuracy = float(accuracy_score(test[TARGET_COLUMN], predict_test(bundle.model, bundle.scaler, test)))
        if not math.isclose(accuracy, expected, rel_tol=0, abs_tol=1e-12):
            raise ReleaseError(
                f"the released bundle scores {accuracy:.4f} on the test set, not the evaluated "
                f"{expected:.4f}: the version was discarded and production was not moved"
            )

    return check


def release(
    evaluated: Mapping[str, str | None],
    metrics: Mapping[str, Any],
    train: pd.DataFrame,
    test: pd.DataFrame,
    params: Params,
    run_id: str | None = None,
    *,
    set_production: bool = True,
    manifest_extra: Mapping[str, Any] | None = None,
) -> PublishResult:
    """Publish the evaluated artifacts to the registry in params and make them production.

    ``evaluated`` holds what evaluation_metrics used: the sha256 of model.joblib and
    scaler.joblib and the digests of train_set and test_set. Accuracy below
    ``evaluation.min_accuracy`` is refused here too, whatever ran the release.

    The bundle also keeps a sample of the training features (``reference.csv``), the
    reference the feature_drift check compares new data with.
    """
    gate = accuracy_gate(float(metrics["accuracy"]), params.evaluation.min_accuracy)
    if not gate.passed:
        # The blocking check stops a release job; this stops every other way in (a lone materialization).
        raise ReleaseError(f"{gate.message}: nothing was published")
    check_evaluated_frames(train, test, evaluated)
    files = read_evaluated_artifacts(params.artifacts_dir, evaluated)
    files["metrics.json"] = json_text(dict(metrics)).encode("utf-8")
    # The params the evaluated model was trained with (recorded in its metrics), not today's file.
    trained_with = metrics.get("params")
    params_text = yaml.safe_dump(trained_with, sort_keys=False) if trained_with else params_to_yaml(params)
    files["params.yaml"] = params_text.encode("utf-8")
    reference = reference_sample(train, params.validation.drift_reference_rows, params.data.random_state)
    files[REFERENCE_FILE] = reference.to_csv(index=False, lineterminator="\n").encode("utf-8")
    return ModelRegistry(params.registry_dir).publish(
        files,
        {**manifest_fields(metrics, params, run_id), **(manifest_extra or {})},
        check=reproduces_accuracy(test, float(metrics["accuracy"])),
        set_production=set_production,
    )
