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

from wine_assets.params import Params


class TrackingError(RuntimeError):
    """MLflow tracking is asked for but cannot be done; the message says what to install or fix."""


def _client(params: Params) -> tuple[Any, str]:
    uri = params.experiments.mlflow_tracking_uri
    # MLflow sends usage telemetry over the network unless told not to; nothing leaves this machine.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
    except ImportError:
        raise TrackingError(
            f"experiments.mlflow_tracking_uri = {uri!r} in {params.origin}, but MLflow is not installed: "
            "install the extra (pip install 'wine_assets[mlflow]', or uv sync --extra mlflow) or set it to null"
        ) from None
    if "://" not in uri:  # a plain folder: MLflow's file store, relative to the params file
        uri = params.resolve(uri).as_uri()
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(params.resolve(uri.removeprefix("sqlite:///")))
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def model_name(dataset: str) -> str:
    return f"wine-{dataset}"


def log_variant(params: Params, result: Any, model: Any) -> str | None:
    """Log one partition (a ``VariantScores`` and its fitted model); the MLflow run id, or None."""
    if params.experiments.mlflow_tracking_uri is None:
        return None
    client, uri = _client(params)
    import mlflow
    import mlflow.sklearn

    name = f"wine_assets/{result.dataset}"
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # next to the other artifacts, not ./mlruns of whatever folder the run happens in
        location = (params.artifacts_dir / "mlflow").as_uri()
        experiment_id = client.create_experiment(name, artifact_location=location)
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
        # cloudpickle: MLflow's default (skops) is another dependency; the registry pickles the same way
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_CLOUDPICKLE,
            registered_model_name=model_name(result.dataset),
        )
        client.set_tag(run.info.run_id, "model_version", str(info.registered_model_version))
        return run.info.run_id


def set_aliases(params: Params, dataset: str, summary: Mapping[str, Any]) -> None:
    """Point ``champion`` at the winner's model version and ``challenger`` at the best challenger's."""
    if params.experiments.mlflow_tracking_uri is None:
        return
    client, _ = _client(params)
    name = model_name(dataset)
    latest: dict[str, str] = {}
    for version in client.search_model_versions(f"name = '{name}'"):
        run = client.get_run(version.run_id)
        variant = run.data.tags.get("variant")
        if variant and int(version.version) > int(latest.get(variant, "0")):
            latest[variant] = version.version
    for alias, variant in (("champion", summary["winner"]), ("challenger", summary["challenger"])):
        if variant and variant in latest:
            client.set_registered_model_alias(name, alias, latest[variant])
