"""The statistics of comparing variants: the corrected resampled t-test, Holm, the decision rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from wine_assets.experiments import Protocol, corrected_ttest, decide, holm
from wine_assets.features import split_frame
from wine_assets.ingestion import load_builtin_frame


def test_the_corrected_t_statistic_by_hand():
    differences = [0.02, 0.0, 0.05, -0.01, 0.03, 0.01]
    t_value, dof, p_value, (low, high) = corrected_ttest(differences, n_train=120, n_test=30, delta=0.0)
    mean, variance = np.mean(differences), np.var(differences, ddof=1)
    expected_t = mean / math.sqrt((1 / 6 + 30 / 120) * variance)
    assert t_value == pytest.approx(expected_t) and dof == 5
    assert p_value == pytest.approx(stats.t.sf(expected_t, 5))
    assert low < mean < high
    # The naive paired t-test ignores that the training sets overlap: it is far more confident.
    naive = stats.ttest_1samp(differences, 0.0, alternative="greater").pvalue
    assert naive < p_value


def test_a_minimum_improvement_shifts_the_test_and_constant_differences_are_decided_by_sign():
    differences = [0.03, 0.04, 0.05, 0.02, 0.06]
    _, _, without, _ = corrected_ttest(differences, 100, 25, delta=0.0)
    _, _, with_delta, _ = corrected_ttest(differences, 100, 25, delta=0.03)
    assert without < with_delta
    assert corrected_ttest([0.0] * 5, 100, 25)[2] == 1.0  # a tie is no win
    assert corrected_ttest([0.01] * 5, 100, 25)[2] == 0.0
    with pytest.raises(ValueError, match="at least two"):
        corrected_ttest([0.1], 100, 25)


def test_holm_adjusts_step_down_and_stays_monotone():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"only": 0.2}) == {"only": 0.2}
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


def test_the_decision_needs_significance_and_the_gate():
    champion = [0.90, 0.92, 0.91, 0.89, 0.93, 0.90, 0.91, 0.92, 0.90, 0.91]
    better = [score + 0.06 + 0.002 * (i % 3) for i, score in enumerate(champion)]
    twin = [score + (0.01 if i % 2 else -0.01) for i, score in enumerate(champion)]
    scores = {"production": champion, "better": better, "twin": twin, "gate-fails": better}
    accuracy = {"production": 0.97, "better": 0.97, "twin": 0.97, "gate-fails": 0.75}
    decision = decide(scores, "production", 142, 36, accuracy, min_accuracy=0.8, min_improvement=0.01)
    assert decision.winner == "better" and decision.challenger_wins
    assert decision.reasons["twin"].startswith("not significantly better")
    assert decision.reasons["gate-fails"].startswith("significantly better, but fails the gate")
    assert decision.adjusted_p_values["better"] >= decision.tests["better"].p_value
    assert decision.tests["better"].effect_size > 0
    same = decide({"production": champion, "copy": champion}, "production", 142, 36, accuracy, 0.8)
    assert same.winner == "production" and not same.challenger_wins
    with pytest.raises(ValueError, match="use the same folds"):
        decide({"production": champion, "short": champion[:5]}, "production", 142, 36, accuracy, 0.8)


@pytest.fixture(scope="module")
def training_rows():
    frame = load_builtin_frame()
    train, _ = split_frame(frame, 0.2, 42)
    return train.drop(columns="target").to_numpy(), train["target"].to_numpy()


def fold_accuracies(model, features, labels, protocol):
    scores = []
    for train_index, test_index in protocol.splits(labels):
        fitted = make_pipeline(StandardScaler(), model).fit(features[train_index], labels[train_index])
        scores.append(float((fitted.predict(features[test_index]) == labels[test_index]).mean()))
    return scores


def test_on_the_wine_data_a_twin_does_not_win_and_a_stump_loses_clearly(training_rows):
    features, labels = training_rows
    protocol = Protocol(folds=5, repeats=5, seed=0)
    splits = protocol.splits(labels)
    assert len(splits) == 25 and splits[0][0].tolist() == protocol.splits(labels)[0][0].tolist()
    n_train, n_test = len(splits[0][0]), len(splits[0][1])
    scores = {
        "production": fold_accuracies(RandomForestClassifier(30, random_state=1), features, labels, protocol),
        "twin": fold_accuracies(RandomForestClassifier(30, random_state=2), features, labels, protocol),
        "stump": fold_accuracies(RandomForestClassifier(1, max_depth=1, random_state=1), features, labels, protocol),
    }
    gate = {"production": 1.0, "twin": 1.0, "stump": 0.6}
    decision = decide(scores, "production", n_train, n_test, gate, min_accuracy=0.8)
    assert decision.winner == "production"
    assert decision.adjusted_p_values["twin"] > 0.05
    assert decision.tests["stump"].mean_difference < -0.2 and decision.tests["stump"].p_value > 0.99
    # The other way round: the forest against a stump champion wins, significantly.
    reverse = decide(scores, "stump", n_train, n_test, gate, min_accuracy=0.8, min_improvement=0.05)
    assert reverse.winner in ("production", "twin")
    assert reverse.adjusted_p_values[reverse.winner] < 0.01
