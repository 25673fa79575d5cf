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

DASK_CONNECT_SECONDS = 10.0


class ClusterUnavailable(RuntimeError):
    """The Dask scheduler named by model.dask_scheduler could not be reached, or has no workers."""


@dataclass(frozen=True)
class TrainingResult:
    model: RandomForestClassifier
    seconds: float
    backend: str = "local"


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
    """Fit the forest on the scaled training features; report how long the fit took.

    With ``model.dask_scheduler`` set, the trees are fitted on that Dask cluster (joblib's dask
    backend). Each tree's seed is drawn from ``random_state`` before any tree is fitted, so where
    a tree is fitted does not change it: the model predicts exactly what a local fit predicts.
    """
    features = scaler.transform(features_of(train))
    target = train[TARGET_COLUMN].to_numpy()
    model = build_model(model_params)
    if model_params.dask_scheduler is None:
        started = time.perf_counter()
        model.fit(features, target)
        return TrainingResult(model=model, seconds=time.perf_counter() - started)
    return _fit_on_dask(model, features, target, model_params.dask_scheduler)


def _fit_on_dask(model: RandomForestClassifier, features, target, address: str) -> TrainingResult:  # noqa: ANN001
    import joblib
    from distributed import Client

    where = f"the Dask scheduler at {address} (model.dask_scheduler)"
    try:
        client = Client(address, timeout=DASK_CONNECT_SECONDS, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterUnavailable(f"cannot reach {where}: {exc}") from exc
    with client:
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        if workers == 0:
            raise ClusterUnavailable(f"{where} has no workers")
        # n_jobs=-1 while fitting: every worker's threads; the params' n_jobs is put back after, so
        # the stored model is the one a local fit stores.
        local_n_jobs = model.n_jobs
        model.set_params(n_jobs=-1)
        started = time.perf_counter()
        try:
            with joblib.parallel_config(backend="dask", client=client, wait_for_workers_timeout=DASK_CONNECT_SECONDS):
                model.fit(features, target)
        finally:
            model.set_params(n_jobs=local_n_jobs)
        seconds = time.perf_counter() - started
    return TrainingResult(model=model, seconds=seconds, backend=f"dask {address} ({workers} workers)")


def feature_importances(
    model: RandomForestClassifier, feature_names: tuple[str, ...] | list[str]
) -> list[tuple[str, float]]:
    """(feature, importance) pairs, most important first, as plain floats."""
    pairs = zip(feature_names, model.feature_importances_, strict=True)
    return sorted(((name, float(value)) for name, value in pairs), key=lambda pair: -pair[1])
