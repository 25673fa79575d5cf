"""Unit tests of the pure stage functions: split, scaler, training, metrics, plots, gates."""

import io

import matplotlib.image
import numpy as np
import pytest
from scipy import stats

from wine_assets import model_format
from wine_assets.evaluation import (
    HEADLINE_METRICS,
    compute_metrics,
    confusion_matrix_png,
    evaluate,
    feature_importance_png,
)
from wine_assets.features import features_of, fit_scaler, split_frame
from wine_assets.gates import Challenge, accuracy_gate, compare_on_rows, label_agreement, mcnemar_worse_p
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
    assert model_format.dumps(first) == model_format.dumps(second)


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
def test_mcnemar_exact_test_counts_only_the_rows_where_the_models_differ():
    # 10 rows only the candidate gets wrong, 0 only production: P(X >= 10 | n = 10, 1/2) = 2^-10
    assert mcnemar_worse_p(10, 0) == pytest.approx(2**-10)
    assert mcnemar_worse_p(0, 0) == 1.0
    assert mcnemar_worse_p(0, 10) == 1.0
    assert mcnemar_worse_p(6, 4) == pytest.approx(stats.binomtest(6, 10, 0.5, alternative="greater").pvalue)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    candidate = np.array([0, 1, 2, 0, 1, 2, 1, 2])  # two rows wrong
    production = np.array([0, 1, 2, 0, 1, 0, 0, 1])  # one row wrong, which the candidate gets right
    item = compare_on_rows("test set", labels, candidate, production)
    assert (item.candidate_only_wrong, item.production_only_wrong) == (2, 1)
    assert item.candidate_accuracy == 0.75 and item.production_accuracy == 0.875
    with pytest.raises(ValueError, match="the evaluation set needs the same, non-zero number"):
        compare_on_rows("evaluation set", labels, candidate[:3], production)


@pytest.mark.unit
def test_a_challenge_refuses_significantly_worse_or_a_drop_beyond_max_regression():
    labels = np.zeros(400, dtype=int)
    production = np.zeros(400, dtype=int)
    slightly = production.copy()
    slightly[:4] = 1  # 1 point worse on 400 rows: McNemar p = 1/16, within max_regression 0.02
    much = production.copy()
    much[:12] = 1  # 3 points worse: p = 2^-12 and beyond 0.02
    for candidate, passed in ((production, True), (slightly, True), (much, False)):
        verdict = Challenge(1, (compare_on_rows("test set", labels, candidate, production),), 0.05, 0.02)
        assert verdict.passed is passed
    refused = Challenge(2, (compare_on_rows("evaluation set", labels, much, production),), 0.05, 0.02)
    assert "significantly worse on the evaluation set" in refused.message
    assert "more than evaluation.max_regression = 0.02" in refused.message
    assert refused.to_dict()["comparisons"][0]["verdict"] == "worse"
    # not significant (p = 1/16) yet 1 point worse: a tighter max_regression refuses it
    assert not Challenge(1, (compare_on_rows("test set", labels, slightly, production),), 0.05, 0.005).passed
    assert Challenge(None, (), 0.05, 0.02).passed


@pytest.mark.unit
def test_labels_far_from_production_are_called_mislabelled_naming_the_pairs():
    names = {0: "class_0", 1: "class_1", 2: "class_2"}
    labels = np.tile([0, 1, 2], 60)
    rotated = (labels + 1) % 3
    blocked = label_agreement(rotated, labels, names, 1, 36, 36, 0.001)
    assert not blocked.passed and blocked.agreeing == 0
    assert ("class_1", "class_0", 60) in blocked.disagreements
    assert "180 of 180 rows disagree with production v1" in blocked.message
    # production 36/36 on its evaluation set: the reference is the one-sided 95% lower bound, 0.05^(1/36)
    assert blocked.reference == pytest.approx(0.05 ** (1 / 36))
    noisy = labels.copy()
    noisy[:5] = (noisy[:5] + 1) % 3  # 5 of 180 disagree: within what a 36/36 model may get wrong
    assert label_agreement(noisy, labels, names, 1, 36, 36, 0.001).passed


@pytest.mark.unit
def test_drift_is_found_only_where_the_distribution_moved(wine_frame):
    from wine_assets.drift import feature_drift, reference_sample

    reference = reference_sample(wine_frame, max_rows=100, seed=0)
    assert len(reference) == 100 and "target" not in reference.columns
    calm = feature_drift(wine_frame, reference, 0.01)
    assert len(calm) == 13 and not any(row.drifted for row in calm)
    moved = wine_frame.assign(hue=wine_frame["hue"] * 1.5)
    assert [row.feature for row in feature_drift(moved, reference, 0.01) if row.drifted] == ["hue"]


@pytest.mark.unit
def test_the_model_section_builds_any_family_and_reports_its_importances(wine_frame):
    from sklearn.linear_model import LogisticRegression

    from wine_assets.params import params_from_mapping
    from wine_assets.training import EstimatorError, importance_label

    linear = params_from_mapping({"model": {"family": "logistic_regression", "C": 0.5, "max_iter": 500}}).model
    model = build_model(linear)
    assert isinstance(model, LogisticRegression) and (model.C, model.max_iter) == (0.5, 500)
    train, _ = split_frame(wine_frame, 0.2, 42)
    scaler = fit_scaler(train)
    fitted = train_model(train, scaler, linear).model
    importances = feature_importances(fitted, FEATURE_COLUMNS)
    assert len(importances) == 13 and sum(value for _, value in importances) == pytest.approx(1.0)
    assert importance_label(fitted) == "mean |coefficient| (share)"
    wrong = params_from_mapping({"model": {"family": "logistic_regression", "n_trees": 3}}).model
    with pytest.raises(EstimatorError, match=r"LogisticRegression has no hyperparameter 'n_trees'"):
        build_model(wrong)
