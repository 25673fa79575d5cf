"""Group ``training``: the model the params' model section names (a Random Forest by default)."""

import dagster as dg
import pandas as pd
from sklearn.base import ClassifierMixin
from sklearn.preprocessing import StandardScaler

from wine_assets import model_format
from wine_assets.files import sha256_bytes, write_bytes_atomic
from wine_assets.pipeline.metadata import table
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.registry import MODEL_FILE
from wine_assets.training import ClusterUnavailable, EstimatorError, feature_importances, train_model
from wine_assets.validation import FEATURE_COLUMNS


@dg.asset(
    group_name="training",
    code_version="2",  # 2: stored as skops
    kinds={"scikitlearn"},
    description=(
        "The estimator params.yaml's model section names (family, random_forest by default, and its "
        "hyperparameters), fitted on the scaled training features; also written to "
        "<artifacts_dir>/model.skops."
    ),
)
def wine_model(
    context: dg.AssetExecutionContext, train_set: pd.DataFrame, scaler: StandardScaler, params: WineParamsResource
) -> dg.Output[ClassifierMixin]:
    values = params.values
    try:
        result = train_model(train_set, scaler, values.model)
    except ClusterUnavailable as exc:
        raise dg.Failure(description=str(exc), metadata={"dask_scheduler": values.model.dask_scheduler}) from exc
    except EstimatorError as exc:
        raise dg.Failure(description=f"{values.origin}: model section: {exc}") from exc
    content = model_format.dumps(result.model)
    path = values.artifacts_dir / MODEL_FILE
    write_bytes_atomic(path, content)
    context.log.info("trained in %.3f s (%s); model written to %s", result.seconds, result.backend, path)
    top = feature_importances(result.model, FEATURE_COLUMNS)[:5]
    sha256 = sha256_bytes(content)
    # The data version is the file's hash: evaluation_metrics records which model bytes it scored,
    # and model_deployment releases exactly those bytes.
    return dg.Output(
        result.model,
        data_version=dg.DataVersion(sha256),
        metadata={
            "family": values.model.family,
            "hyperparameters": values.model.hyperparameters(),
            "training_seconds": float(result.seconds),
            "training_backend": result.backend,
            "train_rows": len(train_set),
            "top_features": table(
                [{"feature": name, "importance": value} for name, value in top],
                [("feature", "string"), ("importance", "float")],
            ),
            "path": dg.MetadataValue.path(str(path)),
            "sha256": sha256,
        },
    )
