"""Materialize a whole experiment grid: every dataset, every (dataset, variant), then the decisions.

Each step is a real Dagster run of the experiments location's jobs on the instance in
``DAGSTER_HOME`` (visible in the UI, like a backfill). Datasets are ingested and validated first;
a dataset whose blocking checks fail has its variants skipped, the others go on. Then every
(dataset, variant) partition, then each dataset whose variants all succeeded gets its leaderboard
and champion_decision. With ``workers`` > 1 each stage's runs go to a pool of that many processes
(at most the machine's cores is sensible).
"""

import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
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
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # asset key: its materialization's metadata

    @property
    def label(self) -> str:
        return self.dataset if self.variant is None else f"{self.dataset}|{self.variant}"


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
    from wine_assets.pipeline.experiments import build_definitions
    from wine_assets.pipeline.resources import WineParamsResource

    launch = LaunchParams(Path(params_file) if params_file else None, Path(base_dir))
    params = launch.load()
    # the variants were checked once by _load, in the process that starts the grid
    return build_definitions(params, WineParamsResource(params_file=params_file), check=False), params


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
            # the run's full log is in the instance (and the UI); the command says what failed and why
            run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
        )
        materializations = result.get_asset_materialization_events()
        produced = {event.asset_key for event in materializations}
        metadata = {
            event.asset_key.to_user_string(): {
                name: value.value for name, value in event.materialization.metadata.items()
            }
            for event in materializations
        }
    expected = _expected_assets(job_name)
    success = result.success and expected <= produced
    problem = "" if success else (_problem(result) or "not every asset was materialized")
    seconds = time.perf_counter() - started
    return PartitionRun(dataset, variant, job_name, success, result.run_id, seconds, problem, metadata)


def _expected_assets(job_name: str) -> set[dg.AssetKey]:
    from wine_assets.pipeline import experiments as assets

    return {
        "experiment_datasets_job": {assets.RAW, assets.VALIDATED},
        "experiment_variants_job": {assets.SCORES},
        "experiment_decision_job": {assets.LEADERBOARD, assets.DECISION},
        "challenger_release_job": {assets.RELEASE},
    }[job_name]


def _home() -> None:
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise GridError(
            "DAGSTER_HOME is not set: the grid's runs must share an instance (and its stored assets). "
            "Use make experiments, or export DAGSTER_HOME=$PWD/.dagster_home"
        )
    if not Path(home).is_dir():
        raise GridError(f"DAGSTER_HOME={home} is not a folder: create it (make creates .dagster_home)")


def _load(params_file: str | os.PathLike[str] | None) -> tuple[tuple[str | None, str], Params]:
    """The launch context (params file, base folder) and the params, checked before any run."""
    _home()
    launch = LaunchParams.resolve(params_file)
    context = (str(launch.params_file) if launch.params_file else None, str(launch.base_dir))
    _, params = _definitions(*context)
    from wine_assets.experiments import check_variants

    check_variants(params)  # every variant, with a trial fit, before any run
    return context, params


def _known(params: Params, names: Sequence[str]) -> list[str]:
    unknown = [name for name in names if name not in params.experiments.datasets]
    if unknown:
        raise GridError(
            f"no dataset {', '.join(map(repr, unknown))} in experiments.datasets of {params.origin}; "
            f"the datasets are: {', '.join(params.experiments.datasets)}"
        )
    return list(dict.fromkeys(names))  # each once, in the order given


def run_grid(
    params_file: str | os.PathLike[str] | None = None,
    workers: int = 1,
    datasets: Sequence[str] | None = None,
    on_run: Callable[[PartitionRun], None] | None = None,
) -> GridOutcome:
    """Every dataset, every variant, every decision of the params (or of ``datasets`` only).
    ``on_run`` hears of each run as it ends."""
    try:
        return _run_grid(params_file, workers, datasets, on_run or (lambda run: None))
    except dg.DagsterInvariantViolationError as exc:  # an instance that cannot be opened
        raise GridError(f"the Dagster instance in DAGSTER_HOME cannot be used: {exc}") from exc


def _run_grid(
    params_file: str | os.PathLike[str] | None,
    workers: int,
    datasets: Sequence[str] | None,
    on_run: Callable[[PartitionRun], None],
) -> GridOutcome:
    context, params = _load(params_file)
    names = _known(params, datasets or list(params.experiments.datasets))
    from wine_assets.experiments import variants_of
    from wine_assets.tracking import prepare

    prepare(params)  # MLflow asked for but missing: say so now, not after the scoring
    variant_names = list(variants_of(params))
    with dg.DagsterInstance.get() as instance:
        instance.get_runs(limit=1)  # a new instance's tables are made here, not by two workers at once
    outcome = GridOutcome()
    with ExitStack() as stack:
        pool = None
        if workers > 1:
            # spawn: fresh interpreters, never a fork of a process holding Dagster's threads
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")))

        def each(job: str, keys: list[tuple[str, ...]]) -> list[PartitionRun]:
            if pool is None or len(keys) < 2:
                runs = []
                for key in keys:
                    runs.append(run_partition(*context, job, *key))
                    on_run(runs[-1])
                return runs
            futures = [pool.submit(run_partition, *context, job, *key) for key in keys]
            for future in as_completed(futures):
                on_run(future.result())
            return [future.result() for future in futures]

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
    try:
        context, params = _load(params_file)
        _known(params, [dataset])
        from wine_assets.pipeline.experiments import DECISION

        with dg.DagsterInstance.get() as instance:
            found = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=DECISION, asset_partitions=[dataset]), limit=1
            ).records
        if not found:
            raise GridError(
                f"no champion_decision for dataset {dataset!r} in this DAGSTER_HOME yet: "
                "run wine-assets experiment run (make experiments) first"
            )
        return run_partition(*context, "challenger_release_job", dataset)
    except dg.DagsterInvariantViolationError as exc:
        raise GridError(f"the Dagster instance in DAGSTER_HOME cannot be used: {exc}") from exc
