"""The project's executor (wine_assets.pipeline.executor) on a one-asset job of this file's own, run by
Dagster in-process (execute_job on instance_for_test, the job's own executor): a run keeps the launch
tags it already has, and fails naming a bad one. (Tagging a new run: test_cli.py, test_pipeline.py.)"""

from __future__ import annotations

import copy

import dagster as dg
import pytest
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.in_process import InProcessExecutor

from wine_assets.params import LAUNCH_BASE_DIR_TAG, LAUNCH_FILE_TAG, LaunchParams
from wine_assets.pipeline.executor import LaunchParamsExecutor, wine_assets_executor
from wine_assets.pipeline.resources import WineParamsResource


@dg.asset
def forest_size(params: WineParamsResource) -> dg.MaterializeResult:
    """Records the n_estimators of the params file the run reads."""
    return dg.MaterializeResult(metadata={"n_estimators": params.values.model.n_estimators})


def forest_size_job() -> dg.JobDefinition:
    """Module-level, so that dg.reconstructable can load it as Dagster loads a code location's jobs."""
    defs = dg.Definitions(
        assets=[forest_size],
        jobs=[dg.define_asset_job("forest_size_job", executor_def=wine_assets_executor)],
        resources={"params": WineParamsResource()},
    )
    return defs.resolve_job_def("forest_size_job")


def run(instance: dg.DagsterInstance, tags: dict[str, str] | None = None) -> tuple[dg.DagsterRun, int | None, str]:
    """(the stored run, the asset's value or None, the failure messages of the run)."""
    # Not entered as a context manager: that would set the run's resources up again to read outputs.
    result = dg.execute_job(dg.reconstructable(forest_size_job), instance=instance, tags=tags, raise_on_error=False)
    materialization = instance.get_latest_materialization_event(forest_size.key)
    value = materialization.asset_materialization.metadata["n_estimators"].value if materialization else None
    failures = "\n".join(
        event.event_specific_data.error.message
        for event in result.all_events
        if event.is_run_failure and event.event_specific_data.error
    )
    return instance.get_run_by_id(result.run_id), value, failures


@pytest.mark.component
def test_a_run_that_carries_launch_params_keeps_them(tmp_path, dagster_home, monkeypatch, write_params):
    """A re-execution started with its parent's tags reads the parent's file, not today's $WINE_ASSETS_PARAMS."""
    parent = write_params("parent.yaml", model={"n_estimators": 3})
    monkeypatch.setenv("WINE_ASSETS_PARAMS", str(write_params("today.yaml", model={"n_estimators": 11})))
    tags = LaunchParams(parent.resolve(), tmp_path.resolve()).to_tags()
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        stored, value, _ = run(instance, tags)
    assert value == 3
    assert stored.tags[LAUNCH_FILE_TAG] == str(parent.resolve())


@pytest.mark.component
def test_a_bad_launch_tag_fails_the_run_naming_the_tag(tmp_path, dagster_home):
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        stored, value, failures = run(instance, {LAUNCH_FILE_TAG: "params.yaml", LAUNCH_BASE_DIR_TAG: str(tmp_path)})
    assert stored.status == dg.DagsterRunStatus.FAILURE
    assert value is None
    assert "invalid parameters: run tag wine_assets/params_file = 'params.yaml' is not an absolute path" in failures


@pytest.mark.unit
def test_the_wrapper_delegates_to_its_executor_and_can_be_copied():
    inner = InProcessExecutor(RetryMode.ENABLED)
    executor = LaunchParamsExecutor(inner)
    assert executor.retries is RetryMode.ENABLED
    assert executor.step_dependency_config is inner.step_dependency_config
    assert executor.marker_to_close is None  # any other attribute is the inner executor's
    copied = copy.copy(executor)  # copy builds an empty instance first: no recursion through __getattr__
    assert copied.inner is inner and copied.retries is RetryMode.ENABLED
    with pytest.raises(AttributeError, match="inner"):
        _ = LaunchParamsExecutor.__new__(LaunchParamsExecutor).retries
