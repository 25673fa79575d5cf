"""The asset graph run in-process with dagster.materialize and the jobs, on real files."""

import io
import json
import re
import shutil

import dagster as dg
import matplotlib.image
import pytest

from wine_assets.definitions import ASSET_CHECKS, ASSETS, defs
from wine_assets.files import sha256_file
from wine_assets.params import LaunchParams
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.registry import ModelRegistry

from .support import ALL_ASSETS, shuffled_labels, tree_snapshot

RAW_CHECKS = {"schema", "no_missing_values", "value_ranges", "sample_size", "outliers", "feature_drift"}


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "instance").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "instance")) as instance:
        yield instance


def run(instance, params_file, selection=None, run_config=None):
    return dg.materialize(
        [*ASSETS, *ASSET_CHECKS],
        instance=instance,
        resources={"params": WineParamsResource(params_file=str(params_file))},
        selection=selection,
        run_config=run_config,
        raise_on_error=False,
    )


def run_job(name, instance, params_file, monkeypatch):
    monkeypatch.setenv("WINE_ASSETS_PARAMS", str(params_file))
    return defs.resolve_job_def(name).execute_in_process(instance=instance, raise_on_error=False)


def materialized(result):
    return {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}


def checks(result):
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def errors(result):
    """Every error message of the run, causes included, as one text."""
    texts = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        while error is not None:
            texts.append(error.message)
            error = error.cause
    return "\n".join(texts)


def decode_png(path):
    return matplotlib.image.imread(io.BytesIO(path.read_bytes()), format="png")


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """One whole run on the built-in data with the default params, in a folder of its own; the
    tests that only read its result, files and registry share it."""
    folder = tmp_path_factory.mktemp("good_run")
    (folder / "params.yaml").write_text("paths: {artifacts_dir: artifacts, registry_dir: registry}\n")
    (folder / "instance").mkdir()
    with dg.instance_for_test(temp_dir=str(folder / "instance")) as instance:
        result = run(instance, folder / "params.yaml")
    return folder, result


@pytest.mark.component
def test_the_whole_graph_materializes_with_every_check(good_run):
    folder, result = good_run
    assert result.success
    assert materialized(result) == ALL_ASSETS
    evaluations = checks(result)
    assert set(evaluations) == RAW_CHECKS | {
        "labels_agree_with_production",
        "accuracy_threshold",
        "not_worse_than_production",
    }
    assert all(evaluation.passed for evaluation in evaluations.values())

    artifacts = folder / "artifacts"
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.80  # about 1.0 with seed 42; one of 36 test rows is 2.8 points
    assert metrics["data"]["train_rows"] == 142 and metrics["data"]["test_rows"] == 36
    assert sum(map(sum, metrics["confusion_matrix"])) == 36
    assert set(metrics["per_class"]) == {"class_0", "class_1", "class_2"}
    for name in ("confusion_matrix.png", "feature_importance.png"):
        image = decode_png(artifacts / "plots" / name)
        assert image.shape[0] > 200 and image.std() > 0.05

    registry = ModelRegistry(folder / "registry")
    bundle = registry.load()
    assert bundle.version == 1
    # The released model is the very file training wrote, not a re-serialization of it.
    assert bundle.manifest["files"]["model.skops"]["sha256"] == sha256_file(artifacts / "model.skops")
    assert bundle.manifest["files"]["scaler.skops"]["sha256"] == sha256_file(artifacts / "scaler.skops")
    assert bundle.manifest["data_fingerprint"] == metrics["data"]["fingerprint"]
    assert bundle.manifest["metrics"]["accuracy"] == metrics["accuracy"]
    assert bundle.manifest["dagster_run_id"] == result.run_id


@pytest.mark.component
def test_asset_metadata_is_what_the_ui_shows(good_run):
    _, result = good_run
    meta = {
        event.asset_key.to_user_string(): event.step_materialization_data.materialization.metadata
        for event in result.get_asset_materialization_events()
    }
    assert meta["raw_wine"]["rows"].value == 178
    assert meta["raw_wine"]["class_counts"].value == {"0": 59, "1": 71, "2": 48}
    assert len(meta["raw_wine"]["preview"].value.records) == 5
    schema = (
        defs.resolve_assets_def("validated_wine")
        .specs_by_key[dg.AssetKey("validated_wine")]
        .metadata["dagster/column_schema"]
    )
    assert [column.name for column in schema.columns][-1] == "target"
    assert len(schema.columns) == 14
    assert isinstance(meta["evaluation_metrics"]["accuracy"], dg.FloatMetadataValue)
    assert meta["wine_model"]["hyperparameters"].value["n_estimators"] == 100
    for plot in ("confusion_matrix_plot", "feature_importance_plot"):
        assert meta[plot]["plot"].value.startswith("![") and "data:image/png;base64," in meta[plot]["plot"].value
    assert meta["model_deployment"]["version"].value == 1
    assert meta["model_deployment"]["tag"].value == "model-v1"


@pytest.mark.unit
def test_every_asset_has_a_description_code_version_and_group():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description, key
        assert node.code_version, key
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert groups == {
        "raw_wine": "ingestion",
        "validated_wine": "validation",
        "train_set": "features",
        "test_set": "features",
        "scaler": "features",
        "wine_model": "training",
        "evaluation_metrics": "evaluation",
        "confusion_matrix_plot": "evaluation",
        "feature_importance_plot": "evaluation",
        "model_deployment": "release",
    }


@pytest.fixture(scope="module")
def released_registry(good_run):
    """A registry with one good release (the shared good run's), copied into the tests that need one."""
    return good_run[0] / "registry"


@pytest.fixture
def registry_copy(released_registry, tmp_path):
    target = tmp_path / "registry"
    shutil.copytree(released_registry, target)
    return target


def _nan(frame):
    frame.loc[11, "flavanoids"] = float("nan")
    return frame


def _out_of_range(frame):
    frame.loc[23, "magnesium"] = 900.0
    return frame


def _non_numeric(frame):
    frame["hue"] = frame["hue"].astype(object)
    frame.loc[31, "hue"] = "pale"
    return frame


@pytest.mark.component
@pytest.mark.parametrize(
    ("edit", "failing_check", "column", "row"),
    [
        (_nan, "no_missing_values", "flavanoids", 11),
        (_out_of_range, "value_ranges", "magnesium", 23),
        (lambda frame: frame.drop(columns=["ash"]), "schema", "ash", None),
        (_non_numeric, "schema", "hue", 31),
    ],
    ids=["nan", "out_of_range", "missing_column", "non_numeric"],
)
def test_bad_data_fails_its_check_and_blocks_everything_after_it(
    instance, write_params, write_csv, registry_copy, tmp_path, edit, failing_check, column, row
):
    registry_before = tree_snapshot(registry_copy)
    csv = write_csv(edit=edit)
    result = run(instance, write_params(data={"source": csv.name}))
    assert not result.success
    evaluation = checks(result)[failing_check]
    assert not evaluation.passed
    failures = evaluation.metadata["failure_cases"].value.records
    assert any(record.data["column"] == column and record.data["row"] == row for record in failures)
    # Blocking: validated_wine and everything downstream were skipped in this very run.
    assert materialized(result) == {"raw_wine"}
    assert not (tmp_path / "artifacts" / "model.skops").exists()
    assert tree_snapshot(registry_copy) == registry_before


@pytest.mark.component
@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, r"data file not found: .*absent\.csv"), ("", r"data file .*absent\.csv is empty")],
    ids=["missing_file", "empty_file"],
)
def test_unreadable_sources_fail_raw_wine_with_the_file_named(
    instance, write_params, tmp_path, registry_copy, content, expected
):
    if content is not None:
        (tmp_path / "absent.csv").write_text(content)
    before = tree_snapshot(registry_copy)
    result = run(instance, write_params(data={"source": "absent.csv"}))
    assert not result.success
    assert materialized(result) == set()
    assert re.search(r"data\.source: " + expected, errors(result))
    assert not (tmp_path / "artifacts").exists()
    assert tree_snapshot(registry_copy) == before


@pytest.mark.component
def test_bad_params_fail_the_run_naming_the_key(instance, write_params, tmp_path):
    result = run(instance, write_params(data={"test_size": 1.5}))
    assert not result.success
    assert "data.test_size = 1.5 is out of range; allowed: 0 < value < 1" in errors(result)
    assert materialized(result) == set()
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.component
def test_shuffled_labels_fail_the_gate_and_nothing_is_deployed(
    instance, write_params, write_csv, tmp_path, monkeypatch
):
    # Nothing in production yet, so no trusted model checks the labels: the accuracy gate stops them.
    params_file = write_params(data={"source": write_csv(edit=shuffled_labels).name})
    result = run(instance, params_file)
    assert not result.success
    assert checks(result)["labels_agree_with_production"].passed
    gate = checks(result)["accuracy_threshold"]
    assert not gate.passed
    assert gate.metadata["accuracy"].value < 0.80
    assert gate.metadata["margin"].value < 0
    assert "model_deployment" not in materialized(result)
    assert {"evaluation_metrics", "confusion_matrix_plot"} <= materialized(result)  # the plot shows why
    assert not (tmp_path / "registry").exists()

    # The release job re-runs the gate on the stored evaluation and skips the deployment.
    release = run_job("release_job", instance, params_file, monkeypatch)
    assert not release.success
    assert not checks(release)["accuracy_threshold"].passed
    assert materialized(release) == set()
    assert not (tmp_path / "registry").exists()


@pytest.mark.component
def test_shuffled_labels_are_blocked_before_training_when_a_model_is_in_production(
    instance, write_params, write_csv, registry_copy
):
    before = tree_snapshot(registry_copy)
    result = run(instance, write_params(data={"source": write_csv(edit=shuffled_labels).name}))
    assert not result.success
    labels = checks(result)["labels_agree_with_production"]
    assert not labels.passed and labels.severity == dg.AssetCheckSeverity.ERROR
    assert "looks mislabelled" in labels.description
    assert labels.metadata["disagreeing_rows"].value > 60
    assert labels.metadata["p_value"].value < 0.001
    assert materialized(result) == {"raw_wine", "validated_wine"}  # nothing trained on them
    assert tree_snapshot(registry_copy) == before


@pytest.mark.component
def test_training_job_then_release_job_publishes_the_trained_files(instance, write_params, tmp_path, monkeypatch):
    params_file = write_params()
    training = run_job("training_job", instance, params_file, monkeypatch)
    assert training.success
    assert "model_deployment" not in materialized(training)
    assert not (tmp_path / "registry").exists()

    release = run_job("release_job", instance, params_file, monkeypatch)
    assert release.success
    assert materialized(release) == {"model_deployment"}
    assert checks(release)["accuracy_threshold"].passed
    manifest = ModelRegistry(tmp_path / "registry").verify()
    assert manifest["files"]["model.skops"]["sha256"] == sha256_file(tmp_path / "artifacts" / "model.skops")

    again = run_job("release_job", instance, params_file, monkeypatch)
    assert again.success
    deployment = again.get_asset_materialization_events()[0].step_materialization_data.materialization
    assert deployment.metadata["new_version"].value is False
    assert ModelRegistry(tmp_path / "registry").versions() == [1]


@pytest.mark.component
def test_release_refuses_an_artifact_rewritten_after_evaluation(instance, write_params, tmp_path, monkeypatch):
    params_file = write_params()
    assert run_job("training_job", instance, params_file, monkeypatch).success
    model_file = tmp_path / "artifacts" / "model.skops"
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    release = run_job("release_job", instance, params_file, monkeypatch)
    assert not release.success
    assert "is not the file evaluation_metrics scored" in errors(release)
    assert not (tmp_path / "registry" / "wine-classifier").exists()


@pytest.mark.component
def test_a_weaker_model_is_refused_against_production_and_nothing_moves(
    instance, write_params, registry_copy, monkeypatch
):
    before = tree_snapshot(registry_copy)
    weak = write_params(
        model={"n_estimators": 1, "max_depth": 1}, evaluation={"min_accuracy": 0.3, "max_regression": 0.02}
    )
    result = run(instance, weak)
    assert not result.success
    challenge = checks(result)["not_worse_than_production"]
    assert not challenge.passed and challenge.severity == dg.AssetCheckSeverity.ERROR
    assert challenge.metadata["verdict"].value == "refused"
    assert challenge.metadata["production_version"].value == "v1"
    assert (
        challenge.metadata["test_set/candidate_accuracy"].value
        < challenge.metadata["test_set/production_accuracy"].value
    )
    assert challenge.metadata["evaluation_set/p_value"].value < 0.05
    rows = {record.data["rows"]: record.data for record in challenge.metadata["comparison"].value.records}
    assert set(rows) == {"test set", "evaluation set"} and rows["test set"]["verdict"] == "worse"
    assert checks(result)["accuracy_threshold"].passed  # the gate alone would have let it through
    assert "model_deployment" not in materialized(result)
    assert tree_snapshot(registry_copy) == before

    # The release job re-runs the challenge on the stored model: still refused.
    release = run_job("release_job", instance, weak, monkeypatch)
    assert not release.success and not checks(release)["not_worse_than_production"].passed
    assert tree_snapshot(registry_copy) == before


@pytest.mark.component
def test_one_value_can_be_overridden_for_one_run(instance, write_params):
    result = run(
        instance,
        write_params(),
        selection=["raw_wine", "validated_wine", "train_set", "test_set", "scaler", "wine_model"],
        run_config={"resources": {"params": {"config": {"overrides": ["model.n_estimators=7"]}}}},
    )
    assert result.success
    model = result.asset_value("wine_model")
    assert len(model.estimators_) == 7


@pytest.mark.component
def test_a_bad_override_in_the_run_config_fails_the_run_naming_it(instance, write_params, tmp_path):
    """The run config's overrides are validated like the file (test_cli shows `-c FILE` reaches the resource)."""
    result = run(
        instance,
        write_params(),
        selection=["raw_wine"],
        run_config={"resources": {"params": {"config": {"overrides": ["evaluation.min_accuracy=1.5"]}}}},
    )
    assert not result.success
    assert "evaluation.min_accuracy = 1.5 is out of range; allowed: 0 <= value <= 1" in errors(result)
    assert materialized(result) == set()
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.component
def test_the_split_and_scaler_values_flow_between_assets(instance, write_params):
    result = run(instance, write_params(), selection=["raw_wine", "validated_wine", "train_set", "test_set", "scaler"])
    assert result.success
    train, test = result.asset_value("train_set"), result.asset_value("test_set")
    assert (len(train), len(test)) == (142, 36)
    assert train.attrs["fingerprint"] == test.attrs["fingerprint"]
    assert result.asset_value("scaler").mean_ == pytest.approx(train.drop(columns="target").mean().to_numpy())


@pytest.mark.component
def test_feature_drift_warns_against_the_production_training_data(instance, write_params, write_csv, registry_copy):
    same = run(instance, write_params(data={"source": write_csv("same.csv").name}), selection=["raw_wine"])
    assert checks(same)["feature_drift"].passed
    assert checks(same)["feature_drift"].metadata["drifted_features"].value == "none"

    def shifted(frame):
        frame["alcohol"] += 2.0  # still within the schema's bounds, far outside the training data
        return frame

    drifted = run(
        instance, write_params(data={"source": write_csv("shifted.csv", edit=shifted).name}), selection=["raw_wine"]
    )
    drift = checks(drifted)["feature_drift"]
    assert not drift.passed
    assert drift.severity == dg.AssetCheckSeverity.WARN
    assert drift.metadata["drifted_features"].value == "alcohol"
    tests = {record.data["feature"]: record.data for record in drift.metadata["ks_tests"].value.records}
    assert tests["alcohol"]["p_value"] < 0.01 and tests["alcohol"]["drifted"] is True
    assert len(tests) == 13
    assert drifted.success  # a warning, not a gate


@pytest.mark.component
def test_materializing_the_deployment_alone_cannot_bypass_the_gate(
    instance, write_params, write_csv, registry_copy, monkeypatch
):
    shutil.rmtree(registry_copy / "wine-classifier")  # no production: the labels reach the accuracy gate
    params_file = write_params(data={"source": write_csv(edit=shuffled_labels).name})
    assert not run_job("training_job", instance, params_file, monkeypatch).success
    alone = run(instance, params_file, selection=["model_deployment"])
    assert not alone.success
    assert re.search(r"test accuracy 0\.\d+ fails the gate evaluation\.min_accuracy = 0\.8000", errors(alone))
    assert not (registry_copy / "wine-classifier").exists()


@pytest.mark.component
def test_release_refuses_a_split_made_after_the_evaluation(instance, write_params, tmp_path, monkeypatch):
    params_file = write_params()
    assert run_job("training_job", instance, params_file, monkeypatch).success
    resplit = run(
        instance,
        params_file,
        selection=["raw_wine", "validated_wine", "train_set", "test_set"],
        run_config={"resources": {"params": {"config": {"overrides": ["data.random_state=7"]}}}},
    )
    assert resplit.success
    release = run_job("release_job", instance, params_file, monkeypatch)
    assert not release.success
    assert "is not the one evaluation_metrics used" in errors(release)
    assert not (tmp_path / "registry" / "wine-classifier").exists()


@pytest.mark.component
def test_a_damaged_production_alias_blocks_until_a_rollback_repairs_it(instance, write_params, registry_copy):
    alias = registry_copy / "wine-classifier" / "production"
    alias.write_text("garbage\n")
    params_file = write_params(model={"n_estimators": 30})
    result = run(instance, params_file)
    assert not result.success
    labels = checks(result)["labels_agree_with_production"]
    assert not labels.passed and "production model cannot be read" in labels.description
    assert "registry rollback" in labels.description
    assert not checks(result)["feature_drift"].passed
    assert alias.read_text() == "garbage\n"  # nothing guessed which model is in production

    registry = ModelRegistry(registry_copy)
    assert registry.set_production(1, {"by": "rollback", "reason": "repair"}) == (None, 1)
    repaired = run(instance, params_file)
    assert repaired.success
    assert checks(repaired)["not_worse_than_production"].passed
    assert registry.history()[-1]["by"].startswith("publish")


@pytest.mark.component
def test_a_run_reads_the_params_file_it_was_launched_with_or_fails_naming_it(instance, write_params, tmp_path):
    """The run's tags (what the project's executor writes at launch) win over the step's own folder,
    and a file that is gone by the time a step runs fails the run instead of falling back."""
    launched = write_params("launched.yaml", model={"n_estimators": 7})
    tags = LaunchParams.resolve(launched).to_tags()
    result = dg.materialize(
        [*ASSETS, *ASSET_CHECKS],
        instance=instance,
        resources={"params": WineParamsResource()},  # no file of its own: ./params.yaml is absent here
        selection=["raw_wine", "validated_wine", "train_set", "test_set", "scaler", "wine_model"],
        tags=tags,
    )
    model = result.output_for_node("wine_model")
    assert model.n_estimators == 7
    assert (tmp_path / "artifacts" / "model.skops").is_file()

    launched.unlink()
    result = dg.materialize(
        [*ASSETS, *ASSET_CHECKS],
        instance=instance,
        resources={"params": WineParamsResource()},
        selection=["raw_wine"],
        tags=tags,
        raise_on_error=False,
    )
    assert not result.success
    failure = next(event for event in result.all_events if event.is_failure)
    assert f"params file not found: {launched} (the file this run was launched with)" in str(
        failure.event_specific_data
    )


@pytest.mark.component
def test_a_run_launched_without_a_params_file_says_so_and_keeps_its_folder(instance, tmp_path, monkeypatch):
    launch_dir = tmp_path / "launch"
    launch_dir.mkdir()
    monkeypatch.chdir(launch_dir)
    tags = LaunchParams.resolve().to_tags()
    assert tags == {
        "wine_assets/params_file": "none (built-in defaults)",
        "wine_assets/params_base_dir": str(launch_dir),
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a worker's folder: the defaults' relative paths still mean launch/
    result = dg.materialize(
        [*ASSETS, *ASSET_CHECKS],
        instance=instance,
        resources={"params": WineParamsResource()},
        selection=["raw_wine", "validated_wine", "train_set", "test_set", "scaler"],
        tags=tags,
    )
    assert result.success
    assert (launch_dir / "artifacts" / "scaler.skops").is_file()
    assert not (elsewhere / "artifacts").exists()
    messages = [record.user_message for record in instance.all_logs(result.run_id)]
    assert any("no params file existed when this run was launched" in message for message in messages)
