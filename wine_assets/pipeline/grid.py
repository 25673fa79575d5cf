"""Materialize a whole experiment grid: every dataset, every (dataset, variant), then the decisions.

Each step is a real Dagster run of the experiments location's jobs on the instance in
``DAGSTER_HOME`` (visible in the UI, like a backfill). Datasets are ingested and validated first;
a dataset whose blocking checks fail has its variants skipped, the others go on. The variant
partitions run in a pool of ``workers`` processes (at most the machine's cores is sensible); then
each dataset whose variants all succeeded gets its leaderboard and champion_decision.
"""

import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import dagster as dg

from wine_assets.params import LaunchParams, Params

# The partitioned checks and data versions are Dagster's preview and beta APIs, chosen on purpose;
# a warning about that on every run of the grid says nothing new.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)


class GridError(RuntimeError):
    """The grid cannot be run (no instance, bad params); the message says what to do."""


@dataclass
class PartitionRun:
    dataset: str
    variant: str | None
    job: str
    success: bool
    run_id: str
    seconds: float
    problem: str = ""


@dataclass
class GridOutcome:
    runs: list[PartitionRun] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)  # dataset: why its variants did not run
    decided: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.blocked and all(run.success for run in self.runs)


@cache
def _definitions(params_file: str | None, base_dir: str) -> tuple[dg.Definitions, Params]:
    from wine_assets.experiments_definitions import build_definitions
    from wine_assets.pipeline.resources import WineParamsResource

    launch = LaunchParams(Path(params_file) if params_file else None, Path(base_dir))
    params = launch.load()
    return build_definitions(params, WineParamsResource(params_file=params_file)), params


def _problem(result: dg.ExecuteInProcessResult) -> str:
    failed = [
        f"check {evaluation.check_name} failed" + (f" ({evaluation.description})" if evaluation.description else "")
        for evaluation in result.get_asset_check_evaluations()
        if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    ]
    for event in result.all_events:
        data = event.step_failure_data if event.is_step_failure else None
        if data is None:
            continue
        if data.user_failure_data and data.user_failure_data.description:  # a dg.Failure: our own words
            failed.append(f"{event.step_key}: {data.user_failure_data.description}")
        elif data.error:
            error = data.error
            while error.cause is not None:  # the user's exception, not Dagster's wrapper
                error = error.cause
            if error.cls_name == "DagsterAssetCheckFailedError":  # said above, check by check
                continue
            failed.append(f"{event.step_key}: {error.message.strip().splitlines()[0]}")
    return "; ".join(failed)


def run_partition(
    params_file: str | None, base_dir: str, job_name: str, dataset: str, variant: str | None = None
) -> PartitionRun:
    """One run of one job for one partition on the DAGSTER_HOME instance (also a pool task)."""
    definitions, _ = _definitions(params_file, base_dir)
    key: Any = dataset if variant is None else dg.MultiPartitionKey({"dataset": dataset, "variant": variant})
    launch = LaunchParams(Path(params_file) if params_file else None, Path(base_dir))
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        result = definitions.resolve_job_def(job_name).execute_in_process(
            partition_key=str(key) if variant is None else key,
            instance=instance,
            tags=launch.to_tags(),
            raise_on_error=False,
            # the run's full log is in the instance (and the UI); the terminal gets warnings and errors
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        produced = {event.asset_key for event in result.get_asset_materialization_events()}
    expected = _expected_assets(job_name)
    success = result.success and expected <= produced
    problem = "" if success else (_problem(result) or "not every asset was materialized")
    return PartitionRun(dataset, variant, job_name, success, result.run_id, time.perf_counter() - started, problem)


def _expected_assets(job_name: str) -> set[dg.AssetKey]:
    from wine_assets.pipeline import experiments as assets

    return {
        "experiment_datasets_job": {assets.RAW, assets.VALIDATED},
        "experiment_variants_job": {assets.SCORES},
        "experiment_decision_job": {assets.LEADERBOARD, assets.DECISION},
        "challenger_release_job": {assets.RELEASE},
    }[job_name]


def run_grid(
    params_file: str | os.PathLike[str] | None = None,
    workers: int = 1,
    datasets: Sequence[str] | None = None,
) -> GridOutcome:
    """Every dataset, every variant, every decision of the params (or of ``datasets`` only)."""
    if not os.environ.get("DAGSTER_HOME"):
        raise GridError(
            "DAGSTER_HOME is not set: the grid's runs must share an instance (and its stored assets). "
            "Use make experiments, or export DAGSTER_HOME=$PWD/.dagster_home"
        )
    launch = LaunchParams.resolve(params_file)
    file_text = str(launch.params_file) if launch.params_file else None
    _, params = _definitions(file_text, str(launch.base_dir))
    names = list(datasets or params.experiments.datasets)
    unknown = [name for name in names if name not in params.experiments.datasets]
    if unknown:
        raise GridError(
            f"no dataset {', '.join(map(repr, unknown))} in experiments.datasets of {params.origin}; "
            f"the datasets are: {', '.join(params.experiments.datasets)}"
        )
    from wine_assets.experiments import variants_of

    variant_names = list(variants_of(params))
    outcome = GridOutcome()
    context = (file_text, str(launch.base_dir))
    with dg.DagsterInstance.get() as instance:
        instance.get_runs(limit=1)  # a new instance's tables are made here, not by two workers at once
    with ExitStack() as stack:
        pool = None
        if workers > 1:
            # spawn: fresh interpreters, never a fork of a process holding Dagster's threads
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")))

        def each(job: str, keys: list[tuple[str, ...]]) -> list[PartitionRun]:
            if pool is None or len(keys) < 2:
                return [run_partition(*context, job, *key) for key in keys]
            return [future.result() for future in [pool.submit(run_partition, *context, job, *key) for key in keys]]

        ready = []
        for run in each("experiment_datasets_job", [(dataset,) for dataset in names]):
            outcome.runs.append(run)
            if run.success:
                ready.append(run.dataset)
            else:
                outcome.blocked[run.dataset] = run.problem
        variant_runs = each(
            "experiment_variants_job", [(dataset, variant) for dataset in ready for variant in variant_names]
        )
        outcome.runs.extend(variant_runs)
        to_decide = []
        for dataset in ready:
            failed = [run for run in variant_runs if run.dataset == dataset and not run.success]
            if failed:
                outcome.blocked[dataset] = "; ".join(f"{run.variant}: {run.problem}" for run in failed)
            else:
                to_decide.append((dataset,))
        for run in each("experiment_decision_job", to_decide):
            outcome.runs.append(run)
            if run.success:
                outcome.decided.append(run.dataset)
            else:
                outcome.blocked[run.dataset] = run.problem
    return outcome


def release_winner(params_file: str | os.PathLike[str] | None, dataset: str) -> PartitionRun:
    """Run challenger_release_job for one dataset: the challenger_won check, then the release."""
    if not os.environ.get("DAGSTER_HOME"):
        raise GridError("DAGSTER_HOME is not set: the release reads the stored decision from the instance")
    launch = LaunchParams.resolve(params_file)
    file_text = str(launch.params_file) if launch.params_file else None
    _, params = _definitions(file_text, str(launch.base_dir))
    if dataset not in params.experiments.datasets:
        raise GridError(
            f"no dataset {dataset!r} in experiments.datasets of {params.origin}; "
            f"the datasets are: {', '.join(params.experiments.datasets)}"
        )
    return run_partition(file_text, str(launch.base_dir), "challenger_release_job", dataset)
