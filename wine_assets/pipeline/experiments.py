"""Group ``experiments``: model variants on datasets, as partitions, and the champion/challenger decision.

The partitions come from the params when the code location loads (a change of
``experiments.datasets`` or ``variants`` needs a reload of the definitions). Per-dataset assets
reuse ingestion and the pandera checks, with the checks partitioned like their asset so a dataset
that fails blocks only its own partitions; per-variant assets reuse the training and evaluation
stage functions through ``wine_assets.experiments``.
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg
import pandas as pd

from wine_assets import model_format
from wine_assets.experiments import (
    LEADERBOARD_COLUMNS,
    VariantScores,
    check_variants,
    decision_for,
    decision_summary,
    experiments_dir,
    leaderboard,
    leaderboard_png,
    release_challenger,
    score_variant,
    variants_of,
)
from wine_assets.files import sha256_bytes, write_bytes_atomic, write_json_atomic
from wine_assets.ingestion import IngestionError, class_counts, load_raw
from wine_assets.params import Params, ParamsError
from wine_assets.pipeline.executor import wine_assets_executor
from wine_assets.pipeline.metadata import png_markdown, table
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.pipeline.validation import (
    CHECK_DESCRIPTIONS,
    outlier_result,
    pandera_check_results,
    sample_size_result,
)
from wine_assets.registry import MODEL_FILE, SCALER_FILE, RegistryError
from wine_assets.release import ReleaseError
from wine_assets.validation import WineSchema, WineValidationError, validate_frame

GROUP = "experiments"
RELEASE_GROUP = "experiments_release"
PREFIX = "experiments"
RAW = dg.AssetKey([PREFIX, "raw_wine"])
VALIDATED = dg.AssetKey([PREFIX, "validated_wine"])
SCORES = dg.AssetKey([PREFIX, "cv_scores"])
LEADERBOARD = dg.AssetKey([PREFIX, "leaderboard"])
DECISION = dg.AssetKey([PREFIX, "champion_decision"])
RELEASE = dg.AssetKey([PREFIX, "challenger_release"])
BLOCKING_RAW_CHECKS = ("schema", "no_missing_values", "value_ranges", "sample_size")


def _dataset_of(context: dg.AssetExecutionContext, params: Params) -> str:
    key = context.partition_key
    dataset = key.keys_by_dimension["dataset"] if isinstance(key, dg.MultiPartitionKey) else key
    if dataset not in params.experiments.datasets:
        raise dg.Failure(
            description=(
                f"dataset {dataset!r} is not in experiments.datasets of {params.origin} any more: "
                "reload the definitions so the partitions match the params"
            )
        )
    return dataset


def _scores_by_variant(cv_scores: Mapping[str, Any]) -> list[VariantScores]:
    return [VariantScores.from_dict(value) for value in cv_scores.values()]


def build_experiment_assets(dataset_names: list[str], variant_names: list[str]) -> dict[str, Any]:
    """Assets, checks and jobs for these partitions (names from the params at load)."""
    datasets = dg.StaticPartitionsDefinition(dataset_names)
    grid = dg.MultiPartitionsDefinition({"dataset": datasets, "variant": dg.StaticPartitionsDefinition(variant_names)})
    by_dataset = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="dataset")

    @dg.asset(
        key=RAW,
        group_name=GROUP,
        partitions_def=datasets,
        code_version="1",
        kinds={"pandas"},
        description="One experiment dataset (experiments.datasets): the built-in wine data or a CSV, unvalidated.",
    )
    def raw_wine(context: dg.AssetExecutionContext, params: WineParamsResource) -> dg.Output[pd.DataFrame]:
        values = params.values
        dataset = _dataset_of(context, values)
        try:
            raw = load_raw(values, dataset)
        except IngestionError as exc:
            raise dg.Failure(description=str(exc), metadata={"params_file": values.origin}) from exc
        return dg.Output(
            raw.frame,
            data_version=dg.DataVersion(raw.fingerprint),
            metadata={
                "dataset": dataset,
                "rows": len(raw.frame),
                "source": raw.source,
                "fingerprint": raw.fingerprint,
                "class_counts": class_counts(raw.frame),
            },
        )

    check_specs = [
        *(
            dg.AssetCheckSpec(
                name, asset=RAW, blocking=True, description=CHECK_DESCRIPTIONS[name], partitions_def=datasets
            )
            for name in BLOCKING_RAW_CHECKS
        ),
        dg.AssetCheckSpec(
            "outliers", asset=RAW, blocking=False, description=CHECK_DESCRIPTIONS["outliers"], partitions_def=datasets
        ),
    ]

    @dg.multi_asset_check(
        specs=check_specs,
        ins={"raw_wine": dg.AssetIn(key=RAW)},
        description="The pandera checks of raw_wine, per dataset: a failing dataset blocks only its own partitions.",
    )
    def raw_wine_checks(raw_wine: pd.DataFrame, params: WineParamsResource) -> Any:
        values = params.values
        yield from pandera_check_results(WineSchema, raw_wine, RAW)
        yield sample_size_result(raw_wine, RAW, values.validation.min_rows_per_class, values.data.test_size)
        yield outlier_result(raw_wine, RAW, values.validation.outlier_iqr_factor, values.validation.max_outlier_share)

    @dg.asset(
        key=VALIDATED,
        group_name=GROUP,
        partitions_def=datasets,
        ins={"raw_wine": dg.AssetIn(key=RAW)},
        code_version="1",
        kinds={"pandas", "pandera"},
        description="The dataset through the pandera WineSchema, as validated_wine does for data.source.",
    )
    def validated_wine(context: dg.AssetExecutionContext, raw_wine: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        try:
            frame = validate_frame(raw_wine, WineSchema, what=f"dataset {context.partition_key!r}")
        except WineValidationError as exc:
            raise dg.Failure(description=str(exc)) from exc
        return dg.Output(frame, metadata={"rows": len(frame), "dagster/row_count": len(frame)})

    @dg.asset(
        key=SCORES,
        group_name=GROUP,
        partitions_def=grid,
        ins={"validated_wine": dg.AssetIn(key=VALIDATED, partition_mapping=by_dataset)},
        code_version="2",  # 2: models stored as skops
        kinds={"scikitlearn"},
        description=(
            "One variant on one dataset: accuracy on every fold of the repeated stratified k-fold over the "
            "training rows (the same folds for every variant), the mean with its corrected interval, fit "
            "time and model size; then the variant fitted on all training rows and scored on the holdout, "
            "written to <artifacts_dir>/experiments/<dataset>/<variant>/."
        ),
    )
    def cv_scores(
        context: dg.AssetExecutionContext, validated_wine: pd.DataFrame, params: WineParamsResource
    ) -> dg.Output[dict[str, Any]]:
        values = params.values
        dataset = _dataset_of(context, values)
        variant_name = context.partition_key.keys_by_dimension["variant"]
        variants = variants_of(values)
        if variant_name not in variants:
            raise dg.Failure(
                description=(
                    f"variant {variant_name!r} is not in experiments.variants of {values.origin} any more: "
                    "reload the definitions so the partitions match the params"
                )
            )
        try:
            fitted = score_variant(validated_wine, dataset, variants[variant_name], values)
        except (ValueError, TypeError) as exc:  # what scikit-learn raises for a fit it refuses
            raise dg.Failure(
                description=f"{values.origin}: experiments.variants.{variant_name} failed on {dataset!r}: {exc}"
            ) from exc
        result = fitted.scores
        files = {MODEL_FILE: model_format.dumps(fitted.model), SCALER_FILE: model_format.dumps(fitted.scaler)}
        # tracking first: a tracking failure must not leave this partition's earlier files replaced
        from wine_assets.tracking import TrackingError, log_variant

        try:
            run_id = log_variant(values, result, fitted.model)
        except TrackingError as exc:
            raise dg.Failure(description=str(exc)) from exc
        folder = experiments_dir(values, dataset, variant_name)
        for name, content in files.items():
            write_bytes_atomic(folder / name, content)
        write_json_atomic(folder / "scores.json", result.to_dict())
        record = {
            **result.to_dict(),
            "files": {name: sha256_bytes(content) for name, content in files.items()},
            "mlflow_run_id": run_id,
        }
        context.log.info(
            "%s on %s: %.4f mean accuracy over %d folds, holdout %.4f",
            variant_name,
            dataset,
            result.mean,
            len(result.fold_scores),
            result.holdout_accuracy,
        )
        return dg.Output(
            record,
            data_version=dg.DataVersion(sha256_bytes(repr(result.fold_scores).encode() + files[MODEL_FILE])),
            metadata={
                "dataset": dataset,
                "variant": variant_name,
                "family": result.family,
                "mean_accuracy": dg.MetadataValue.float(result.mean),
                "interval_low": dg.MetadataValue.float(result.interval[0]),
                "interval_high": dg.MetadataValue.float(result.interval[1]),
                "holdout_accuracy": dg.MetadataValue.float(result.holdout_accuracy),
                "fit_seconds": dg.MetadataValue.float(result.fit_seconds),
                "model_bytes": dg.MetadataValue.int(result.model_bytes),
                "protocol": f"{result.folds}-fold x {result.repeats} repeats, seed {result.seed}",
                "fold_scores": dg.MetadataValue.json(result.fold_scores),
                "hyperparameters": dg.MetadataValue.json(result.hyperparameters),
                "mlflow_run_id": run_id or "not tracked",
            },
        )

    @dg.asset(
        key=LEADERBOARD,
        group_name=GROUP,
        partitions_def=datasets,
        ins={"cv_scores": dg.AssetIn(key=SCORES, partition_mapping=by_dataset)},
        code_version="1",
        kinds={"pandas"},
        description="Every variant on this dataset, best mean cross-validated accuracy first, with a plot.",
    )
    def leaderboard_asset(
        context: dg.AssetExecutionContext, cv_scores: dict[str, Any], params: WineParamsResource
    ) -> dg.Output[list[dict[str, Any]]]:
        values = params.values
        dataset = _dataset_of(context, values)
        rows = leaderboard(_scores_by_variant(cv_scores))
        png = leaderboard_png(rows, dataset)
        folder = experiments_dir(values, dataset)
        write_json_atomic(folder / "leaderboard.json", rows)
        write_bytes_atomic(folder / "leaderboard.png", png)
        return dg.Output(
            rows,
            metadata={
                "leaderboard": table(rows, [(name, _kind(rows[0][name])) for name in LEADERBOARD_COLUMNS]),
                "plot": png_markdown(png, f"leaderboard of {dataset}"),
                "best": rows[0]["variant"],
                "path": dg.MetadataValue.path(str(folder / "leaderboard.json")),
            },
        )

    @dg.asset(
        key=DECISION,
        group_name=GROUP,
        partitions_def=datasets,
        ins={"cv_scores": dg.AssetIn(key=SCORES, partition_mapping=by_dataset)},
        code_version="1",
        kinds={"python"},
        description=(
            "Does any variant beat production (the model section) on this dataset? The corrected resampled "
            "t-test of Nadeau and Bengio on the shared folds, one-sided, Holm-corrected across challengers; a "
            "challenger wins only if it is better by at least experiments.min_improvement and passes the "
            "accuracy gate on the holdout. A tie keeps production."
        ),
    )
    def champion_decision(
        context: dg.AssetExecutionContext, cv_scores: dict[str, Any], params: WineParamsResource
    ) -> dg.Output[dict[str, Any]]:
        values = params.values
        dataset = _dataset_of(context, values)
        results = _scores_by_variant(cv_scores)
        try:
            decision = decision_for(results, values)
        except ValueError as exc:
            raise dg.Failure(description=str(exc)) from exc
        summary = decision_summary(decision, results, values)
        summary["files"] = {item["variant"]: item["files"] for item in cv_scores.values()}
        summary["mlflow_runs"] = {item["variant"]: item.get("mlflow_run_id") for item in cv_scores.values()}
        write_json_atomic(experiments_dir(values, dataset) / "decision.json", summary)
        from wine_assets.tracking import TrackingError, set_aliases

        try:
            set_aliases(values, dataset, summary)
        except TrackingError as exc:
            raise dg.Failure(description=str(exc)) from exc
        context.log.info("%s: %s", dataset, summary["decision"])
        return dg.Output(summary, metadata=_decision_metadata(summary))

    @dg.asset_check(
        asset=DECISION,
        name="challenger_won",
        blocking=True,
        partitions_def=datasets,
        description="Passes only when a challenger won the decision: it blocks challenger_release otherwise.",
    )
    def challenger_won(champion_decision: dict[str, Any]) -> dg.AssetCheckResult:
        won = champion_decision["winner"] != champion_decision["champion"]
        return dg.AssetCheckResult(
            passed=won,
            severity=dg.AssetCheckSeverity.ERROR,
            description=champion_decision["decision"],
            metadata={"winner": champion_decision["winner"], "p_value": _float(champion_decision["p_value"])},
        )

    @dg.asset(
        key=RELEASE,
        # a group of its own: selecting the experiments group for a backfill never publishes anything
        group_name=RELEASE_GROUP,
        partitions_def=datasets,
        ins={
            "champion_decision": dg.AssetIn(key=DECISION),
            "validated_wine": dg.AssetIn(key=VALIDATED),
        },
        code_version="1",
        kinds={"python"},
        description=(
            "The winning challenger's evaluated bundle published to the registry (experiments.release_as: as "
            "production, or as a version for serving.candidate_version), its variant, params and scores in "
            "the manifest; the same accuracy gate, challenge to production and atomic publish as "
            "model_deployment. Released as production, the winner becomes the params file's model section. "
            "Blocked by the challenger_won check."
        ),
    )
    def challenger_release(
        context: dg.AssetExecutionContext,
        champion_decision: dict[str, Any],
        validated_wine: pd.DataFrame,
        params: WineParamsResource,
    ) -> dg.MaterializeResult:
        try:
            result, change = release_challenger(champion_decision, validated_wine, params.values, context.run.run_id)
        except (ReleaseError, RegistryError, ParamsError) as exc:
            raise dg.Failure(description=str(exc)) from exc
        if change is None:
            written = "no params file written (released as a candidate, or built-in defaults)"
        else:
            written = (
                f"{change.path}: model section now {champion_decision['winner']}" if change.changed else "unchanged"
            )
        return dg.MaterializeResult(
            metadata={
                "params_file": written,
                "params_diff": dg.MetadataValue.md(
                    f"```diff\n{change.diff}```" if change and change.changed else "none"
                ),
                "variant": champion_decision["winner"],
                "version": result.version,
                "new_version": result.created,
                "production": f"v{result.production}" if result.production else "empty",
                "released_as": params.values.experiments.release_as,
                "model_sha256": result.manifest["files"][MODEL_FILE]["sha256"],
            }
        )

    dataset_job = dg.define_asset_job(
        "experiment_datasets_job",
        selection=dg.AssetSelection.assets(RAW, VALIDATED),
        description="Ingest and validate one experiment dataset, with the blocking pandera checks.",
    )
    variants_job = dg.define_asset_job(
        "experiment_variants_job",
        selection=dg.AssetSelection.assets(SCORES),
        description="Cross-validate and fit one variant on one dataset.",
    )
    decision_job = dg.define_asset_job(
        "experiment_decision_job",
        # without challenger_won: "keep production" is a normal outcome, not a failed run; the check
        # runs where it matters, in challenger_release_job
        selection=dg.AssetSelection.assets(LEADERBOARD, DECISION).without_checks(),
        description="The leaderboard and the champion/challenger decision of one dataset, after its variants.",
    )
    release_job = dg.define_asset_job(
        "challenger_release_job",
        selection=dg.AssetSelection.checks_for_assets(DECISION) | dg.AssetSelection.assets(RELEASE),
        tags={"wine_assets/artifacts": "exclusive"},
        description="Re-run challenger_won on the stored decision; publish the winner only if it passes.",
    )
    return {
        "assets": [raw_wine, validated_wine, cv_scores, leaderboard_asset, champion_decision, challenger_release],
        "asset_checks": [raw_wine_checks, challenger_won],
        "jobs": [dataset_job, variants_job, decision_job, release_job],
    }


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "float" if isinstance(value, float) else "string"


def _float(value: Any) -> dg.MetadataValue:
    return dg.MetadataValue.float(float(value)) if value is not None else dg.MetadataValue.text("none")


def _decision_metadata(summary: Mapping[str, Any]) -> dict[str, Any]:
    interval = summary["interval"] or [None, None]
    return {
        "decision": summary["decision"],
        "winner": summary["winner"],
        "challenger": summary["challenger"] or "none",
        "p_value": _float(summary["p_value"]),
        "raw_p_value": _float(summary["raw_p_value"]),
        "effect_size": _float(summary["effect_size"]),
        "mean_difference": _float(summary["mean_difference"]),
        "interval_low": _float(interval[0]),
        "interval_high": _float(interval[1]),
        "alpha": summary["alpha"],
        "min_improvement": summary["min_improvement"],
        "test": summary["test"],
        "tests": table(
            summary["tests"],
            [
                ("challenger", "string"),
                ("mean_difference", "float"),
                ("interval_low", "float"),
                ("interval_high", "float"),
                ("p_value", "float"),
                ("holm_p_value", "float"),
                ("effect_size", "float"),
                ("reason", "string"),
            ],
        ),
    }


def build_definitions(params: Params, resource: WineParamsResource | None = None, check: bool = True) -> dg.Definitions:
    """The experiments location's Definitions: one partition per dataset and per variant of
    ``params``, whose variants are checked by scikit-learn (a trial fit) before anything loads,
    unless the caller has checked them already (``check=False``)."""
    if check:
        check_variants(params)
    built = build_experiment_assets(list(params.experiments.datasets), list(variants_of(params)))
    return dg.Definitions(
        assets=built["assets"],
        asset_checks=built["asset_checks"],
        jobs=built["jobs"],
        resources={"params": resource or WineParamsResource()},
        executor=wine_assets_executor,
    )
