"""Optional experiment tracking in MLflow (``pip install 'wine_assets[mlflow]'``).

When ``experiments.mlflow_tracking_uri`` is set, every experiment partition logs its variant's
params, per-fold scores and fitted model as an MLflow run (experiment ``wine_assets/<dataset>``,
registered model ``wine-<dataset>``), and the decision points the MLflow aliases ``champion``
and ``challenger`` at the matching model versions. Unset, nothing here imports MLflow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from wine_assets import model_format
from wine_assets.params import Params


class TrackingError(RuntimeError):
    """MLflow tracking is asked for but cannot be done; the message says what to install or fix."""


def prepare(params: Params) -> None:
    """Before any partition runs: raise TrackingError when tracking is asked for and MLflow is not
    installed, and create a new store's tables here, once. Two grid workers opening a new SQLite
    store at the same moment both run its migrations and one fails ("duplicate column name")."""
    if params.experiments.mlflow_tracking_uri is None:
        return
    client, _ = _client(params)
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)


def _mlflow(params: Params) -> Any:
    # MLflow sends usage telemetry over the network unless told not to; nothing leaves this machine.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
    except ImportError:
        raise TrackingError(
            f"experiments.mlflow_tracking_uri = {params.experiments.mlflow_tracking_uri!r} in {params.origin}, "
            "but MLflow is not installed: install the extra (pip install 'wine_assets[mlflow]', or "
            "uv sync --extra mlflow) or set it to null"
        ) from None
    return mlflow


def local_uri(params: Params) -> str:
    """The store as an absolute URI: a folder or file:// (MLflow's file store) or sqlite:///file,
    relative paths against the params file's folder. The params allow nothing else (no servers)."""
    uri = params.experiments.mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return "sqlite:///" + str(params.resolve(path))  # sqlite:////abs keeps its absolute path
    if uri.startswith("file://"):
        return uri
    return params.resolve(uri).as_uri()


def _client(params: Params) -> tuple[Any, str]:
    mlflow = _mlflow(params)
    uri = local_uri(params)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def model_name(dataset: str) -> str:
    return f"wine-{dataset}"


def log_variant(params: Params, result: Any, model: Any) -> str | None:
    """Log one partition (a ``VariantScores`` and its fitted model); the MLflow run id, or None."""
    if params.experiments.mlflow_tracking_uri is None:
        return None
    client, uri = _client(params)
    import mlflow
    import mlflow.exceptions
    import mlflow.sklearn

    name = f"wine_assets/{result.dataset}"
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # next to the other artifacts, not ./mlruns of whatever folder the run happens in
        location = (params.artifacts_dir / "mlflow").as_uri()
        try:
            experiment_id = client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # another worker made it a moment ago
            experiment_id = client.get_experiment_by_name(name).experiment_id
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{result.dataset}/{result.variant}") as run:
        mlflow.set_tags({"dataset": result.dataset, "variant": result.variant, "family": result.family})
        mlflow.log_params(
            {
                **{f"hp.{key}": value for key, value in result.hyperparameters.items()},
                "family": result.family,
                "folds": result.folds,
                "repeats": result.repeats,
                "seed": result.seed,
            }
        )
        for step, score in enumerate(result.fold_scores):
            mlflow.log_metric("fold_accuracy", score, step=step)
        mlflow.log_metrics(
            {
                "cv_mean_accuracy": result.mean,
                "cv_interval_low": result.interval[0],
                "cv_interval_high": result.interval[1],
                "holdout_accuracy": result.holdout_accuracy,
                "fit_seconds": result.fit_seconds,
            }
        )
        # skops, as the registry stores models: loading the logged model runs no code
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
            skops_trusted_types=list(model_format.TRUSTED_TYPES),
            registered_model_name=model_name(result.dataset),
        )
        client.set_tag(run.info.run_id, "model_version", str(info.registered_model_version))
        return run.info.run_id


def set_aliases(params: Params, dataset: str, summary: Mapping[str, Any]) -> None:
    """Point ``champion`` at the winner's model version and ``challenger`` at the best challenger's:
    the versions logged by exactly the runs the decision judged."""
    if params.experiments.mlflow_tracking_uri is None:
        return
    client, _ = _client(params)
    name = model_name(dataset)
    runs = summary.get("mlflow_runs", {})
    version_of_run = {version.run_id: version.version for version in client.search_model_versions(f"name = '{name}'")}
    for alias, variant in (("champion", summary["winner"]), ("challenger", summary["challenger"])):
        version = version_of_run.get(runs.get(variant)) if variant else None
        if version is None:
            raise TrackingError(
                f"no MLflow model version of {name} was logged by the run that scored {variant!r} "
                f"(run {runs.get(variant)}): re-run that partition with tracking on"
            )
        client.set_registered_model_alias(name, alias, version)
