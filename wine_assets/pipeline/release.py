"""Group ``release``: publish the gated model to the registry and move ``production``."""


from typing import Any

import dagster as dg
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.preprocessing import StandardScaler

from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.release import ReleaseError, release
from wine_assets.registry import RegistryError


@dg.asset(
    group_name="release",
    code_version="1",
    kinds={"python"},
    description=(
        "The evaluated model published to the local registry (<registry_dir>/wine-classifier/v<N>) "
        "with a checksummed manifest, loaded back and re-scored, then made production. Runs only "
        "after the blocking accuracy_threshold check on evaluation_metrics passes."
    ),
)
def model_deployment(
    context: dg.AssetExecutionContext,
    wine_model: RandomForestClassifier,
    scaler: StandardScaler,
    evaluation_metrics: dict[str, Any],
    test_set: pd.DataFrame,
    params: WineParamsResource,
) -> dg.MaterializeResult:
    try:
        result = release(wine_model, scaler, evaluation_metrics, test_set, params.values, context.run_id)
    except (ReleaseError, RegistryError) as exc:
        raise dg.Failure(description=str(exc)) from exc
    if result.created:
        context.log.info("published v%d; production is now v%d", result.version, result.production)
    else:
        context.log.info("these model bytes are already v%d: no new version; production is v%d", result.version, result.production)
    return dg.MaterializeResult(
        metadata={
            "version": result.version,
            "tag": result.manifest["tag"],
            "new_version": result.created,
            "previous_production": result.previous_production if result.previous_production is not None else "none",
            "production": result.production,
            "path": dg.MetadataValue.path(str(result.path)),
            **{f"metric_{name}": float(value) for name, value in result.manifest["metrics"].items()},
            "data_fingerprint": str(result.manifest.get("data_fingerprint")),
        }
    )
