"""Training: a Random Forest on the scaled training features."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.preprocessing import StandardScaler

from wine_assets.features import features_of
from wine_assets.params import ModelParams
from wine_assets.validation import TARGET_COLUMN


@dataclass(frozen=True)
class TrainingResult:
    model: RandomForestClassifier
    seconds: float


def build_model(model_params: ModelParams) -> RandomForestClassifier:
    """An unfitted forest with every hyperparameter taken from params."""
    return RandomForestClassifier(
        n_estimators=model_params.n_estimators,
        max_depth=model_params.max_depth,
        min_samples_split=model_params.min_samples_split,
        min_samples_leaf=model_params.min_samples_leaf,
        class_weight=model_params.class_weight,
        random_state=model_params.random_state,
        n_jobs=model_params.n_jobs,
    )


def train_model(train: pd.DataFrame, scaler: StandardScaler, model_params: ModelParams) -> TrainingResult:
    """Fit the forest on the scaled training features; report how long the fit took."""
    features = scaler.transform(features_of(train))
    model = build_model(model_params)
    started = time.perf_counter()
    model.fit(features, train[TARGET_COLUMN].to_numpy())
    return TrainingResult(model=model, seconds=time.perf_counter() - started)


def feature_importances(
    model: RandomForestClassifier, feature_names: tuple[str, ...] | list[str]
) -> list[tuple[str, float]]:
    """(feature, importance) pairs, most important first, as plain floats."""
    pairs = zip(feature_names, model.feature_importances_, strict=True)
    return sorted(((name, float(value)) for name, value in pairs), key=lambda pair: -pair[1])
