"""The project's executor: in-process (default), a process per step, or Celery workers.

Chosen by run config only, e.g. ``execution: {config: {celery: {broker: ..., backend: ...}}}``
(deploy/run-celery.yaml). Every option executes the plan with Dagster's own engine, which starts a
step only when its upstream steps and blocking checks succeeded. ``dagster-dask``'s executor is
not offered: it submits every step up front, past a failed blocking check.

Whichever is chosen, the run is first tagged with the params it was launched with
(:class:`wine_assets.params.LaunchParams`): an absolute file path and base folder that every
step reads, wherever it executes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster._core.execution.retries import RetryMode
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor

from wine_assets.params import LaunchParams, ParamsError

_DAGSTER_OPTIONS = dg.multi_or_in_process_executor.config_schema.config_type.fields
EXECUTOR_CONFIG = dg.Selector(
    {
        **_DAGSTER_OPTIONS,
        "celery": dg.Field(
            CELERY_CONFIG,
            description=(
                "Steps run on Celery workers (`make worker`). broker and backend are URLs; "
                "{env: WINE_ASSETS_CELERY_BROKER} reads one from the environment."
            ),
        ),
    }
)
_SEPARATE_PROCESSES = ("multiprocess", "celery")


def launch_params_of(plan_context) -> LaunchParams:  # noqa: ANN001 - a PlanOrchestrationContext
    """Resolve the run's params file in the launching process: the params resource's effective
    ``params_file`` (from the run config, or the resource's own setting in the Definitions), else
    $WINE_ASSETS_PARAMS, else ./params.yaml."""
    # The orchestration context holds no resolved config: resolve the run config against the job,
    # which fills in the resource's own defaults.
    job = plan_context.reconstructable_job.get_definition()
    resources = ResolvedRunConfig.build(job, plan_context.dagster_run.run_config).resources
    resource = resources.get("params")
    explicit = (resource.config or {}).get("params_file") if resource is not None else None
    return LaunchParams.resolve(explicit)


class LaunchParamsExecutor(dg.Executor):
    """Tags the run with its launch params, then hands the plan to the chosen executor."""

    def __init__(self, inner: dg.Executor):
        self.inner = inner

    @property
    def retries(self):  # noqa: ANN201 - RetryMode, as the base class
        return self.inner.retries

    @property
    def step_dependency_config(self):  # noqa: ANN201
        return self.inner.step_dependency_config

    def __getattr__(self, name: str) -> Any:
        # The Celery loop asks its executor for app_args(); everything else goes to the inner one too.
        if name == "inner":  # not set yet (a copy in the making): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def execute(self, plan_context, execution_plan) -> Iterator[dg.DagsterEvent]:  # noqa: ANN001
        run = plan_context.dagster_run
        try:
            # A run that already carries launch params keeps them: a re-execution of a failed run
            # started with its parent's tags (the UI's default) reads the same file as its parent.
            if LaunchParams.from_tags(run.tags) is None:
                plan_context.instance.add_run_tags(run.run_id, launch_params_of(plan_context).to_tags())
        except ParamsError as exc:
            raise dg.DagsterInvariantViolationError(f"invalid parameters: {exc}") from exc
        return self.inner.execute(plan_context, execution_plan)


@dg.executor(
    name="wine_assets_executor",
    config_schema=dg.Field(
        EXECUTOR_CONFIG,
        default_value={"in_process": {}},
        description=(
            "in_process (default): every step in the run's process. multiprocess: a process per "
            "step. celery: every step on a Celery worker (needs PostgreSQL or another shared instance)."
        ),
    ),
    requirements=lambda config: (
        dg.multiple_process_executor_requirements() if any(key in config for key in _SEPARATE_PROCESSES) else []
    ),
)
def wine_assets_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
    """Dagster's in-process or multiprocess executor, or dagster-celery's, with in-process as the default.

    A process per step re-imports dagster and scikit-learn each time (seconds per step), which
    dwarfs this graph's work on one machine; Celery pays that on its workers plus a polling tick.
    """
    config = init_context.executor_config
    if "celery" in config:
        celery = config["celery"]
        inner: dg.Executor = CeleryExecutor(
            broker=celery.get("broker"),
            backend=celery.get("backend"),
            include=celery.get("include"),
            config_source=celery.get("config_source"),
            retries=RetryMode.from_config(celery["retries"]),
        )
    else:
        inner = dg.multi_or_in_process_executor.executor_creation_fn(init_context)  # type: ignore[misc]
    return LaunchParamsExecutor(inner)
