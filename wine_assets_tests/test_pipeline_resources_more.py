"""The params resource (wine_assets.pipeline.resources.WineParamsResource): used directly outside a run,
and in an in-process run whose launch tags are broken (an executor other than the project's, which
would have refused the run before any step)."""

from __future__ import annotations

import dagster as dg
import pytest

from wine_assets.params import LAUNCH_BASE_DIR_TAG, LAUNCH_FILE_TAG
from wine_assets.pipeline.resources import WineParamsResource


@dg.asset
def forest_size(params: WineParamsResource) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"n_estimators": params.values.model.n_estimators})


@pytest.mark.unit
def test_outside_a_run_the_file_is_read_on_first_use_with_the_overrides(write_params):
    params_file = write_params(model={"n_estimators": 5})
    assert WineParamsResource(params_file=str(params_file)).values.model.n_estimators == 5
    resource = WineParamsResource(params_file=str(params_file), overrides=["model.n_estimators=9"])
    assert resource.values.model.n_estimators == 9
    assert resource.values is resource.values  # loaded once


@pytest.mark.unit
def test_outside_a_run_a_bad_file_is_a_failure_naming_it(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("model: [not, a, mapping\n", encoding="utf-8")
    with pytest.raises(dg.Failure) as caught:
        _ = WineParamsResource(params_file=str(params_file)).values
    assert caught.value.description.startswith(f"invalid parameters: {params_file}: not valid YAML")
    assert caught.value.metadata["params_file"].value == str(params_file)


@pytest.mark.component
def test_a_run_with_a_relative_launch_tag_fails_setting_up_the_resource(tmp_path, dagster_home):
    tags = {LAUNCH_FILE_TAG: "params.yaml", LAUNCH_BASE_DIR_TAG: str(tmp_path)}
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        with pytest.raises(dg.DagsterResourceFunctionError) as caught:
            dg.materialize([forest_size], resources={"params": WineParamsResource()}, instance=instance, tags=tags)
        assert instance.get_latest_materialization_event(forest_size.key) is None
    failure = caught.value.__cause__
    assert isinstance(failure, dg.Failure)
    assert failure.description == (
        "invalid parameters: run tag wine_assets/params_file = 'params.yaml' is not an absolute path"
    )
    assert failure.metadata["params_file"].value == "$WINE_ASSETS_PARAMS or ./params.yaml"
