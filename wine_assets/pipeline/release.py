"""Group ``release``: publish the gated model to the registry and move ``production``."""

from typing import Any

import dagster as dg
import pandas as pd

from wine_assets.pipeline.evaluation import evaluation_metrics
from wine_assets.pipeline.features import scaler
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.pipeline.training import wine_model
from wine_assets.registry import MODEL_FILE, SCALER_FILE, RegistryError
from wine_assets.release import ReleaseError, release


def evaluated_inputs(context: dg.AssetExecutionContext) -> dict[str, str | None]:
    """What the stored evaluation_metrics used: the model and scaler files' sha256 and the
    train and test rows' digests.

    Those assets set their data version to exactly these values, and Dagster records the input
    data versions of every materialization: this reads them back.
    """
    provenance = context.get_asset_provenance(evaluation_metrics.key)
    versions = provenance.input_data_versions if provenance else {}
    keys = {
        MODEL_FILE: wine_model.key,
        SCALER_FILE: scaler.key,
        "train_set": dg.AssetKey("train_set"),
        "test_set": dg.AssetKey("test_set"),
    }
    return {name: versions[key].value if key in versions else None for name, key in keys.items()}


@dg.asset(
    group_name="release",
    code_version="1",
    kinds={"python"},
    deps=[wine_model, scaler],
    description=(
        "The evaluated model and scaler files published to the local registry "
        "(<registry_dir>/wine-classifier/v<N>) with a checksummed manifest, loaded back and "
        "re-scored on test_set, then made production. Gated by the blocking accuracy_threshold "
        "check on evaluation_metrics."
    ),
)
def model_deployment(
    context: dg.AssetExecutionContext,
    evaluation_metrics: dict[str, Any],
    train_set: pd.DataFrame,
    test_set: pd.DataFrame,
    params: WineParamsResource,
) -> dg.MaterializeResult:
    try:
        result = release(
            evaluated_inputs(context), evaluation_metrics, train_set, test_set, params.values, context.run.run_id
        )
    except (ReleaseError, RegistryError) as exc:
        raise dg.Failure(description=str(exc)) from exc
    if result.created:
        context.log.info("published v%d; production is now v%d", result.version, result.production)
    else:
        context.log.info(
            "these model bytes are already v%d: no new version; production is v%d", result.version, result.production
        )
    return dg.MaterializeResult(
        metadata={
            "version": result.version,
            "tag": result.manifest["tag"],
            "new_version": result.created,
            "previous_production": f"v{result.previous_production}" if result.previous_production else "none",
            "production": f"v{result.production}",
            "path": dg.MetadataValue.path(str(result.path)),
            **{name: dg.MetadataValue.float(float(value)) for name, value in result.manifest["metrics"].items()},
            "data_fingerprint": str(result.manifest.get("data_fingerprint")),
            "model_sha256": result.manifest["files"][MODEL_FILE]["sha256"],
        }
    )
