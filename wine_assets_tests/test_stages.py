"""Unit tests of the pure stage functions: split, scaler, training, metrics, plots, gates."""

import io

import matplotlib.image
import numpy as np
import pytest

from wine_assets.evaluation import (
    HEADLINE_METRICS,
    compute_metrics,
    confusion_matrix_png,
    evaluate,
    feature_importance_png,
)
from wine_assets.features import features_of, fit_scaler, split_frame
from wine_assets.files import joblib_bytes
from wine_assets.gates import accuracy_gate, regression_gate
from wine_assets.params import ModelParams
from wine_assets.training import build_model, feature_importances, train_model
from wine_assets.validation import FEATURE_COLUMNS


@pytest.fixture(scope="module")
def split(wine_frame):
    frame = wine_frame.copy()
    frame.attrs = {"source": "builtin", "fingerprint": "abc"}
    return split_frame(frame, test_size=0.2, random_state=42)


@pytest.mark.unit
def test_split_is_stratified_disjoint_and_keeps_the_source(split, wine_frame):
    train, test = split
    assert (len(train), len(test)) == (142, 36)
    assert set(train.index).isdisjoint(test.index)
    assert set(train.index) | set(test.index) == set(wine_frame.index)
    overall = wine_frame["target"].value_counts(normalize=True)
    for part in (train, test):
        share = part["target"].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.02
        assert part.attrs == {"source": "builtin", "fingerprint": "abc"}


@pytest.mark.unit
def test_split_depends_on_the_seed(wine_frame):
    _, first = split_frame(wine_frame, 0.2, 1)
    _, second = split_frame(wine_frame, 0.2, 2)
    assert set(first.index) != set(second.index)


@pytest.mark.unit
def test_scaler_is_fitted_on_training_rows_only(split):
    train, test = split
    scaler = fit_scaler(train)
    assert scaler.mean_ == pytest.approx(train[list(FEATURE_COLUMNS)].mean().to_numpy())
    assert not np.allclose(scaler.mean_, test[list(FEATURE_COLUMNS)].mean().to_numpy())


@pytest.mark.unit
def test_features_of_orders_columns_by_the_schema(split):
    train, _ = split
    shuffled = train[list(reversed(train.columns))]
    assert list(features_of(shuffled).columns) == list(FEATURE_COLUMNS)


@pytest.mark.unit
def test_model_takes_every_hyperparameter_from_params():
    params = ModelParams(
        n_estimators=7,
        max_depth=3,
        min_samples_split=4,
        min_samples_leaf=2,
        class_weight="balanced",
        random_state=5,
        n_jobs=1,
    )
    model = build_model(params)
    got = model.get_params()
    for key in (
        "n_estimators",
        "max_depth",
        "min_samples_split",
        "min_samples_leaf",
        "class_weight",
        "random_state",
        "n_jobs",
    ):
        assert got[key] == getattr(params, key)


@pytest.mark.unit
def test_training_fits_a_forest_that_beats_the_gate(split):
    train, test = split
    scaler = fit_scaler(train)
    result = train_model(train, scaler, ModelParams(n_estimators=25))
    assert len(result.model.estimators_) == 25
    assert result.seconds > 0
    metrics = evaluate(result.model, scaler, train, test)
    assert metrics["accuracy"] >= 0.80
    assert metrics["data"] == {"source": "builtin", "fingerprint": "abc", "train_rows": 142, "test_rows": 36}
    importances = feature_importances(result.model, FEATURE_COLUMNS)
    assert len(importances) == 13
    assert sum(value for _, value in importances) == pytest.approx(1.0)
    assert [value for _, value in importances] == sorted((value for _, value in importances), reverse=True)


@pytest.mark.unit
def test_training_is_reproducible_to_the_byte(split):
    train, _ = split
    scaler = fit_scaler(train)
    first = train_model(train, scaler, ModelParams(n_estimators=10)).model
    second = train_model(train, scaler, ModelParams(n_estimators=10)).model
    assert joblib_bytes(first) == joblib_bytes(second)


@pytest.mark.unit
def test_metrics_on_known_predictions():
    y_true = [0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 2, 0, 2]
    metrics = compute_metrics(y_true, y_pred)
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 3]]
    assert metrics["per_class"]["class_1"] == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
    }
    assert metrics["recall_macro"] == pytest.approx((0.5 + 1.0 + 0.75) / 3)
    assert metrics["recall_weighted"] == pytest.approx(6 / 8)
    assert all(type(metrics[name]) is float for name in HEADLINE_METRICS)


def _decode_png(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(io.BytesIO(png), format="png")


@pytest.mark.unit
def test_plots_are_real_images():
    matrix = _decode_png(confusion_matrix_png([[12, 0, 0], [0, 14, 0], [0, 1, 9]], ["class_0", "class_1", "class_2"]))
    bars = _decode_png(feature_importance_png([("alcohol", 0.6), ("hue", 0.4)]))
    assert matrix.shape[0] > 200 and matrix.shape[1] > 200
    assert bars.shape[0] > 200 and bars.shape[1] > 200
    assert matrix.std() > 0.05  # not a blank canvas


@pytest.mark.unit
def test_accuracy_gate_boundary():
    assert accuracy_gate(0.80, 0.80).passed
    assert not accuracy_gate(0.7999, 0.80).passed
    gate = accuracy_gate(0.75, 0.80)
    assert gate.margin == pytest.approx(-0.05)
    assert "fails the gate evaluation.min_accuracy" in gate.message


@pytest.mark.unit
def test_regression_gate_against_production():
    assert regression_gate(0.9, None, 0.02).passed
    production = {"version": 3, "metrics": {"accuracy": 0.95}}
    assert regression_gate(0.94, production, 0.02).passed
    dropped = regression_gate(0.90, production, 0.02)
    assert not dropped.passed
    assert dropped.change == pytest.approx(-0.05)
    assert "production v3" in dropped.message


@pytest.mark.unit
def test_drift_is_found_only_where_the_distribution_moved(wine_frame):
    from wine_assets.drift import feature_drift, reference_sample

    reference = reference_sample(wine_frame, max_rows=100, seed=0)
    assert len(reference) == 100 and "target" not in reference.columns
    calm = feature_drift(wine_frame, reference, 0.01)
    assert len(calm) == 13 and not any(row.drifted for row in calm)
    moved = wine_frame.assign(hue=wine_frame["hue"] * 1.5)
    assert [row.feature for row in feature_drift(moved, reference, 0.01) if row.drifted] == ["hue"]
