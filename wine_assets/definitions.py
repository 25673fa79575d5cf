"""Everything Dagster loads, assembled in one place: assets, checks, jobs, executor, resources."""

import dagster as dg

from wine_assets.pipeline.automation import build_new_data_sensor, build_release_sensor, build_retrain_schedule
from wine_assets.pipeline.evaluation import (
    confusion_matrix_plot,
    evaluation_checks,
    evaluation_metrics,
    feature_importance_plot,
)
from wine_assets.pipeline.executor import wine_assets_executor
from wine_assets.pipeline.features import scaler, train_test_split_assets
from wine_assets.pipeline.ingestion import raw_wine
from wine_assets.pipeline.release import model_deployment
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.pipeline.training import wine_model
from wine_assets.pipeline.validation import labels_agree_with_production, raw_wine_checks, validated_wine

ASSETS = [
    raw_wine,
    validated_wine,
    train_test_split_assets,
    scaler,
    wine_model,
    evaluation_metrics,
    confusion_matrix_plot,
    feature_importance_plot,
    model_deployment,
]
ASSET_CHECKS = [raw_wine_checks, labels_agree_with_production, evaluation_checks]

TRAINING_GROUPS = ("ingestion", "validation", "features", "training", "evaluation")

# Training and release runs share the artifacts folder; the run queue (see dagster.yaml written by
# the Makefile) runs at most one run with this tag at a time.
EXCLUSIVE_TAG = {"wine_assets/artifacts": "exclusive"}

training_job = dg.define_asset_job(
    "training_job",
    selection=dg.AssetSelection.groups(*TRAINING_GROUPS),
    tags=EXCLUSIVE_TAG,
    description="Ingest, validate, split, scale, train and evaluate, with every check on the way.",
)

# Re-running the checks on the stored evaluation_metrics in the same run is what gates the
# deployment: a blocking check only skips downstream assets of its own run.
release_job = dg.define_asset_job(
    "release_job",
    selection=dg.AssetSelection.checks_for_assets(evaluation_metrics) | dg.AssetSelection.assets(model_deployment),
    tags=EXCLUSIVE_TAG,
    description=(
        "Re-run the accuracy gates on the stored evaluation_metrics, then publish model_deployment "
        "only if accuracy_threshold passes."
    ),
)

new_data_sensor = build_new_data_sensor(training_job)
release_after_training = build_release_sensor(training_job, release_job)
retrain_schedule = build_retrain_schedule(training_job)

defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=ASSET_CHECKS,
    jobs=[training_job, release_job],
    sensors=[new_data_sensor, release_after_training],
    schedules=[retrain_schedule],
    resources={"params": WineParamsResource()},
    executor=wine_assets_executor,
)
