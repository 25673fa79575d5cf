"""Release: publish exactly the model bytes that were evaluated, prove they still work, and
never make production worse without saying so.

A fitted forest stored again after a load is not byte-identical to the file written at
training time, so the release never re-serializes: it reads ``model.skops`` and
``scaler.skops`` from the artifacts folder and refuses them unless their sha256 equals
what the evaluation scored.

Every move of the ``production`` alias is a challenge to the model in production: both are
scored on the same rows (the current test set and the registry's frozen evaluation set) and a
candidate significantly worse (McNemar's exact test) or worse by more than
``evaluation.max_regression`` on either is refused. The same rules serve ``release_job``, the
release sensor (it runs release_job), ``experiment release`` and ``registry import
--production``; ``registry rollback`` is the one explicit override, recorded in the history
with its verdict. New training labels are checked against production too (``label_check``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import accuracy_score

from wine_assets import model_format
from wine_assets.drift import reference_sample
from wine_assets.evaluation import HEADLINE_METRICS, predict_test
from wine_assets.features import frame_digest
from wine_assets.files import json_text, sha256_bytes
from wine_assets.gates import Challenge, LabelAgreement, accuracy_gate, compare_on_rows, label_agreement
from wine_assets.params import Params, params_to_yaml
from wine_assets.registry import (
    EVALUATION_DATA,
    METRICS_FILE,
    MODEL_FILE,
    PARAMS_FILE,
    REFERENCE_FILE,
    SCALER_FILE,
    Bundle,
    ModelRegistry,
    PublishResult,
    RegistryError,
    git_commit,
)
from wine_assets.validation import (
    CLASS_LABELS,
    CLASS_VALUES,
    FEATURE_COLUMNS,
    TARGET_COLUMN,
    WineValidationError,
    validate_frame,
)


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
        "test_rows": data.get("test_rows"),
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


# -- the release rules against production ---------------------------------------------------------
def frame_csv(frame: pd.DataFrame) -> bytes:
    """Labelled rows as the registry keeps them: the feature columns and the target, no index."""
    return frame[[*FEATURE_COLUMNS, TARGET_COLUMN]].to_csv(index=False, lineterminator="\n").encode("utf-8")


def evaluation_rows(registry: ModelRegistry) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """The registry's frozen evaluation set, checksum-verified and validated; None before the first release."""
    found = registry.evaluation_set()
    if found is None:
        return None
    content, record = found
    where = registry.evaluation_dir / EVALUATION_DATA
    try:
        frame = validate_frame(pd.read_csv(io.BytesIO(content)), what=f"the evaluation set {where}")
    except (WineValidationError, ValueError) as exc:
        raise ReleaseError(str(exc)) from exc
    return frame, record


def production_bundle(registry: ModelRegistry) -> Bundle | None:
    """The production bundle, or None when nothing is in production; unreadable is a ReleaseError."""
    try:
        version = registry.production_version()
        return None if version is None else registry.load(version)
    except RegistryError as exc:
        raise ReleaseError(
            f"the production model cannot be read, so no candidate can be judged against it: {exc}. "
            "Repair production first (wine-assets registry rollback N)"
        ) from exc


def challenge(
    model: Any,
    scaler: Any,
    registry: ModelRegistry,
    params: Params,
    test: pd.DataFrame | None = None,
    candidate_version: int | None = None,
) -> Challenge:
    """Score the candidate and production on the same rows: ``test`` (when given) and the frozen
    evaluation set (when the registry has one)."""
    evaluation = params.evaluation
    production = production_bundle(registry)
    if production is None:
        return Challenge(None, (), evaluation.alpha, evaluation.max_regression, candidate_version)
    row_sets = [("test set", test)] if test is not None else []
    frozen = evaluation_rows(registry)
    if frozen is not None:
        row_sets.append(("evaluation set", frozen[0]))
    comparisons = tuple(
        compare_on_rows(
            name,
            rows[TARGET_COLUMN].to_numpy(),
            predict_test(model, scaler, rows),
            predict_test(production.model, production.scaler, rows),
        )
        for name, rows in row_sets
    )
    return Challenge(production.version, comparisons, evaluation.alpha, evaluation.max_regression, candidate_version)


def challenge_version(registry: ModelRegistry, version: int, params: Params) -> Challenge:
    """A published version against production on the frozen evaluation set (a move of the alias to it)."""
    try:
        bundle = registry.load(version)
    except RegistryError as exc:
        raise ReleaseError(str(exc)) from exc
    return challenge(bundle.model, bundle.scaler, registry, params, None, candidate_version=version)


def label_check(frame: pd.DataFrame, registry: ModelRegistry, params: Params) -> LabelAgreement | None:
    """Production's predictions against the labels of new training rows; None when nothing is in
    production (or production is a bundle without recorded test rows and there is no evaluation set).

    Production's own accuracy, the reference, is measured on the frozen evaluation set (or, before
    there is one, taken from its manifest's test rows).
    """
    production = production_bundle(registry)
    if production is None:
        return None
    frozen = evaluation_rows(registry)
    if frozen is not None:
        rows = frozen[0]
        correct = int(np.sum(predict_test(production.model, production.scaler, rows) == rows[TARGET_COLUMN].to_numpy()))
        total = len(rows)
    else:
        total = int(production.manifest.get("test_rows") or 0)
        if total == 0:  # a bundle from before test rows were recorded: its test set's size is unknown
            return None
        correct = round(float(production.manifest["metrics"]["accuracy"]) * total)
    return label_agreement(
        frame[TARGET_COLUMN].to_numpy(),
        predict_test(production.model, production.scaler, frame),
        dict(zip(CLASS_VALUES, CLASS_LABELS, strict=True)),
        production.version,
        correct,
        total,
        params.validation.mislabel_p_value,
    )


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
    event: Mapping[str, Any] | None = None,
) -> PublishResult:
    """Publish the evaluated artifacts to the registry in params and make them production.

    ``evaluated`` holds what evaluation_metrics used: the sha256 of model.skops and
    scaler.skops and the digests of train_set and test_set. Accuracy below
    ``evaluation.min_accuracy`` is refused here too, whatever ran the release.

    The bundle also keeps a sample of the training features (``reference.csv``), the
    reference the feature_drift check compares new data with.

    Becoming production is a challenge to the current production model (``challenge``): a
    refused candidate publishes nothing. ``event`` is recorded in the registry's history.
    """
    gate = accuracy_gate(float(metrics["accuracy"]), params.evaluation.min_accuracy)
    if not gate.passed:
        # The blocking check stops a release job; this stops every other way in (a lone materialization).
        raise ReleaseError(f"{gate.message}: nothing was published")
    check_evaluated_frames(train, test, evaluated)
    files = read_evaluated_artifacts(params.artifacts_dir, evaluated)
    files[METRICS_FILE] = json_text(dict(metrics)).encode("utf-8")
    # The params the evaluated model was trained with (recorded in its metrics), not today's file.
    trained_with = metrics.get("params")
    params_text = yaml.safe_dump(trained_with, sort_keys=False) if trained_with else params_to_yaml(params)
    files[PARAMS_FILE] = params_text.encode("utf-8")
    reference = reference_sample(train, params.validation.drift_reference_rows, params.data.random_state)
    files[REFERENCE_FILE] = reference.to_csv(index=False, lineterminator="\n").encode("utf-8")
    registry = ModelRegistry.from_params(params)
    fields = {**manifest_fields(metrics, params, run_id), **(manifest_extra or {})}
    reproduces = reproduces_accuracy(test, float(metrics["accuracy"]))
    if not set_production:
        return registry.publish(files, fields, check=reproduces, set_production=False)
    # Judged on the exact bytes that will be published (the files were checked against the evaluation).
    try:
        model = model_format.loads(files[MODEL_FILE], "model", str(params.artifacts_dir / MODEL_FILE))
        scaler = model_format.loads(files[SCALER_FILE], "scaler", str(params.artifacts_dir / SCALER_FILE))
    except model_format.ModelFormatError as exc:
        raise ReleaseError(f"{exc}: nothing was published") from None
    verdict = challenge(model, scaler, registry, params, test)
    if not verdict.passed:
        raise ReleaseError(
            f"{verdict.message}. Nothing was published; production is still v{verdict.production_version}"
        )
    result = registry.publish(
        files,
        {**fields, "challenge": verdict.to_dict()},
        check=reproduces,
        expected_production=verdict.production_version,
        event={"run_id": run_id, "challenge": verdict.to_dict(), **(event or {})},
    )
    # The first release freezes its test rows as the evaluation set every later release is judged on.
    registry.set_evaluation_set(
        frame_csv(test),
        {"rows": len(test), "source": f"the test set of v{result.version}", "reason": "seeded by the first release"},
        only_if_absent=True,
    )
    return result
