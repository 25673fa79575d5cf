"""Training: a Random Forest on the scaled training features."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import ClassifierMixin
from sklearn.ensemble import ExtraTreesClassifier, GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils._param_validation import InvalidParameterError

from wine_assets.features import features_of
from wine_assets.params import ESTIMATOR_FAMILIES, ModelParams
from wine_assets.validation import TARGET_COLUMN

DASK_CONNECT_SECONDS = 10.0


class ClusterUnavailable(RuntimeError):
    """The Dask scheduler named by model.dask_scheduler could not be reached, or has no workers."""


class EstimatorError(ValueError):
    """An estimator family or hyperparameter scikit-learn does not accept."""


@dataclass(frozen=True)
class TrainingResult:
    model: ClassifierMixin
    seconds: float
    backend: str = "local"


# The families an experiment variant may use (their names are declared with the params, which
# must not import scikit-learn): each fits 13 numeric features well at this size.
_CLASSES: dict[str, type[ClassifierMixin]] = {
    "random_forest": RandomForestClassifier,
    "extra_trees": ExtraTreesClassifier,
    "gradient_boosting": GradientBoostingClassifier,
    "logistic_regression": LogisticRegression,
    "decision_tree": DecisionTreeClassifier,
}
FAMILIES = {name: _CLASSES[name] for name in ESTIMATOR_FAMILIES}  # a name without a class fails on import


def build_estimator(family: str, hyperparameters: dict) -> ClassifierMixin:
    """An unfitted estimator of ``family``; hyperparameters checked by scikit-learn's own
    constraints now, not at the first fit."""
    try:
        estimator_class = FAMILIES[family]
    except KeyError:
        raise EstimatorError(f"unknown family {family!r}; the families are: {', '.join(FAMILIES)}") from None
    known = estimator_class().get_params(deep=False)
    unknown = sorted(set(hyperparameters) - set(known))
    if unknown:
        raise EstimatorError(
            f"{estimator_class.__name__} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"it has: {', '.join(sorted(known))}"
        )
    for key, value in hyperparameters.items():
        # YAML's true is an int to Python: n_estimators: true would mean one tree
        if isinstance(value, bool) and not isinstance(known[key], bool):
            raise EstimatorError(f"{key} = {value!r}: a flag where {estimator_class.__name__} expects a value")
    estimator = estimator_class(**hyperparameters)
    try:
        # The check fit() runs first; scikit-learn keeps it private, so it is called by its name.
        estimator._validate_params()
    except InvalidParameterError as exc:
        raise EstimatorError(str(exc)) from None
    return estimator


def fit_estimator(train: pd.DataFrame, scaler: StandardScaler, estimator: ClassifierMixin) -> TrainingResult:
    """Fit any estimator on the scaled training features; report how long the fit took."""
    features = scaler.transform(features_of(train))
    started = time.perf_counter()
    estimator.fit(features, train[TARGET_COLUMN].to_numpy())
    return TrainingResult(model=estimator, seconds=time.perf_counter() - started)


def build_model(model_params: ModelParams) -> ClassifierMixin:
    """The unfitted estimator the model section names, every hyperparameter taken from params.

    random_forest's keys are typed and checked by the params; another family's are checked by
    scikit-learn here (EstimatorError names the key).
    """
    if model_params.family != "random_forest":
        return build_estimator(model_params.family, model_params.hyperparameters())
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
    """Fit the model section's estimator on the scaled training features; report how long it took.

    With ``model.dask_scheduler`` set (forests only), the trees are fitted on that Dask cluster
    (joblib's dask backend). Each tree's seed is drawn from ``random_state`` before any tree is
    fitted, so where a tree is fitted does not change it: the model predicts exactly what a local
    fit predicts.
    """
    model = build_model(model_params)
    if model_params.dask_scheduler is None:
        return fit_estimator(train, scaler, model)
    features = scaler.transform(features_of(train))
    return _fit_on_dask(model, features, train[TARGET_COLUMN].to_numpy(), model_params.dask_scheduler)


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


def feature_importances(model: ClassifierMixin, feature_names: tuple[str, ...] | list[str]) -> list[tuple[str, float]]:
    """(feature, importance) pairs, most important first, as plain floats.

    Trees report their mean decrease in impurity; a linear model, the mean absolute coefficient
    over the classes (on scaled features, so comparable), normalized to sum to 1.
    """
    if hasattr(model, "feature_importances_"):
        values = np.asarray(model.feature_importances_, dtype=float)
    else:
        weights = np.abs(np.asarray(model.coef_, dtype=float)).mean(axis=0)
        values = weights / weights.sum() if weights.sum() > 0 else weights
    pairs = zip(feature_names, values, strict=True)
    return sorted(((name, float(value)) for name, value in pairs), key=lambda pair: -pair[1])


def importance_label(model: ClassifierMixin) -> str:
    """What ``feature_importances`` measured for this model, for a chart's axis."""
    return "mean decrease in impurity" if hasattr(model, "feature_importances_") else "mean |coefficient| (share)"
