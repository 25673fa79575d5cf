"""The command lines. The dagster and dg CLIs against the project as real processes, where the behaviour
is the process's own (exit codes, launch tags, the executor, dg reading pyproject.toml); the wine-assets
command in-process for what it does, and once per subcommand as a real process."""

import io
import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

import wine_assets
from wine_assets.definitions import defs
from wine_assets.predict import clear_cache, predict
from wine_assets.registry import ModelRegistry

from .support import (
    ALL_ASSETS,
    BIN,
    REPO_ROOT,
    cli_env,
    make_dagster_home,
    run_program,
    shuffled_labels,
    tiny_model_files,
    tree_snapshot,
)


@pytest.fixture
def env(dagster_home, write_params):
    return cli_env(dagster_home, write_params())


# The tests of the one shared CLI materialization run on one xdist worker (see test_experiments' GRID).
MATERIALIZED = pytest.mark.xdist_group("materialized")


def publish(registry: ModelRegistry, *tags: str) -> None:
    for tag in tags:
        registry.publish(
            tiny_model_files(tag),
            {"metrics": {"accuracy": 0.9}},
        )


# -- the definitions in-process, then dagster and dg as real processes -------------------------------
@pytest.mark.component
def test_the_module_definitions_are_loadable():
    """What `dagster definitions validate -m wine_assets` checks, on the object it finds: the module's
    lazy ``defs`` is wine_assets.definitions.defs, and every job, sensor, schedule and resource of it
    resolves. The CLI's own run of the same validation is `dg check defs` below."""
    assert wine_assets.defs is defs
    dg.Definitions.validate_loadable(defs)
    assert {job.name for job in defs.resolve_all_job_defs()} >= {"training_job", "release_job"}


@pytest.mark.integration
def test_dg_checks_and_lists_the_project_definitions(env):
    """Dagster's `dg` reads [tool.dg] in pyproject.toml and loads the same definitions."""
    # dg works on the project folder it runs in; VIRTUAL_ENV names the venv it should use.
    dg_env = {**env, "VIRTUAL_ENV": str(BIN.parent)}
    checked = run_program("dg", "check", "defs", env=dg_env, cwd=REPO_ROOT)
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    assert "does not match the virtual environment" not in checked.stdout + checked.stderr
    listed = run_program("dg", "list", "defs", "--json", env=dg_env, cwd=REPO_ROOT)
    assert listed.returncode == 0, listed.stderr[-2000:]
    found = json.loads(listed.stdout)
    assert {asset["asset_key"] for asset in found["assets"]} == ALL_ASSETS
    assert {job["name"] for job in found["jobs"]} == {"training_job", "release_job"}
    assert {sensor["name"] for sensor in found["sensors"]} == {"new_data_sensor", "release_after_training"}
    assert len(found["asset_checks"]) == 9


@pytest.mark.integration
@MATERIALIZED
def test_release_job_exits_non_zero_when_the_gate_fails(cli_materialized, tmp_path, write_csv, monkeypatch):
    env = cli_materialized.env
    registry = tmp_path / "registry"
    assert ModelRegistry(registry).production_version() == 1
    before = tree_snapshot(registry)

    params_file = Path(env["WINE_ASSETS_PARAMS"])
    document = yaml.safe_load(params_file.read_text())
    document["data"] = {"source": write_csv(edit=shuffled_labels).name}
    # An empty registry: with v1 in production, labels_agree_with_production would stop these labels
    # before training (test_pipeline); here they must reach the accuracy gate.
    document["paths"] = {**document.get("paths", {}), "registry_dir": "empty-registry"}
    params_file.write_text(yaml.safe_dump(document))

    # The failing evaluation is stored in the CLI's instance by a training run in this process (the
    # gate logic is test_pipeline's); the release job's exit code is the CLI process's own.
    monkeypatch.setenv("WINE_ASSETS_PARAMS", str(params_file))
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        training = defs.resolve_job_def("training_job").execute_in_process(instance=instance, raise_on_error=False)
    assert not training.success
    gate = {evaluation.check_name: evaluation for evaluation in training.get_asset_check_evaluations()}
    assert not gate["accuracy_threshold"].passed

    release = run_program("dagster", "job", "execute", "-m", "wine_assets", "-j", "release_job", env=env, cwd=tmp_path)
    assert release.returncode != 0
    assert "1 blocking asset check failed with ERROR severity" in release.stderr
    assert tree_snapshot(registry) == before
    assert ModelRegistry(registry).production_version() == 1
    assert not (tmp_path / "empty-registry" / "wine-classifier").exists()


@pytest.mark.integration
@MATERIALIZED
def test_multiprocess_executor_is_selectable_by_run_config(cli_materialized, tmp_path):
    # One step (scaler, whose input train_set is stored in the copied instance): the executor's
    # choice is what is under test, and each step is a process that imports everything.
    # The params file named (relatively) in the run config is what the run is tagged with.
    (tmp_path / "other.yaml").write_text((tmp_path / "params.yaml").read_text())
    config = tmp_path / "multiprocess.yaml"
    config.write_text(
        "execution:\n  config:\n    multiprocess:\n      max_concurrent: 2\n"
        "resources:\n  params:\n    config:\n      params_file: other.yaml\n"
    )
    env = cli_materialized.env
    completed = run_program(
        "dagster",
        "asset",
        "materialize",
        "-m",
        "wine_assets",
        "--select",
        "scaler",
        "-c",
        config,
        env=env,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Executing steps using multiprocess executor" in completed.stderr
    assert "Executing steps in process" not in completed.stderr
    assert 'Launching subprocess for "scaler"' in completed.stderr
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        tags = instance.get_runs(limit=1)[0].tags
    assert tags["wine_assets/params_file"] == str(tmp_path / "other.yaml")
    assert tags["wine_assets/params_base_dir"] == str(tmp_path)


@pytest.mark.integration
@MATERIALIZED
def test_a_cli_run_is_tagged_with_the_absolute_params_file_it_was_launched_with(cli_materialized_once):
    root = cli_materialized_once.root
    with dg.DagsterInstance.from_config(str(root / "dagster_home")) as instance:
        (run,) = instance.get_runs()
    assert run.tags["wine_assets/params_file"] == str(root / "params.yaml")
    assert run.tags["wine_assets/params_base_dir"] == str(root)


@pytest.mark.integration
def test_a_run_launched_with_no_params_file_is_tagged_and_warns(tmp_path):
    """Built-in defaults only where no params file exists at launch, and the run says so."""
    home = make_dagster_home(tmp_path / "dagster_home")
    env = cli_env(home, tmp_path / "unused.yaml")
    env.pop("WINE_ASSETS_PARAMS")
    completed = run_program(
        "dagster", "asset", "materialize", "-m", "wine_assets", "--select", "raw_wine", env=env, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"no params file existed when this run was launched: built-in defaults, paths relative to {tmp_path}" in (
        completed.stderr
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        tags = instance.get_runs(limit=1)[0].tags
    assert tags["wine_assets/params_file"] == "none (built-in defaults)"
    assert tags["wine_assets/params_base_dir"] == str(tmp_path)


# -- wine-assets: one real process per subcommand ----------------------------------------------------
@pytest.mark.integration
@MATERIALIZED
def test_materialize_everything_then_run_each_wine_assets_subcommand(cli_materialized, tmp_path, wine_frame):
    """After the real `dagster asset materialize`, every user-facing subcommand once as a real process
    (`serve` and `experiment` have their own tests): exit code, standard output and error, no traceback."""
    env = cli_materialized.env
    assert "Executing steps in process" in cli_materialized.completed.stderr
    artifacts = tmp_path / "artifacts"
    for name in (
        "model.skops",
        "scaler.skops",
        "metrics.json",
        "plots/confusion_matrix.png",
        "plots/feature_importance.png",
    ):
        assert (artifacts / name).is_file(), name
    metrics = json.loads((artifacts / "metrics.json").read_text())
    accuracy = metrics["accuracy"]
    assert accuracy >= 0.80

    def wine_assets_process(*args, stdin=None):
        completed = run_program("wine-assets", *args, env=env, cwd=tmp_path, stdin=stdin)
        assert "Traceback" not in completed.stdout + completed.stderr, completed.stderr
        return completed

    summary = wine_assets_process("summary")
    assert summary.returncode == 0, summary.stderr
    assert f"test accuracy   {accuracy:.4f} (passes the gate of 0.80)" in summary.stdout
    assert "production      v1" in summary.stdout
    assert summary.stderr == ""

    listing = wine_assets_process("registry", "list")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[1].startswith("v1 ") and listing.stdout.rstrip().endswith("*")

    show = wine_assets_process("registry", "show", "--json")
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["tag"] == "model-v1"

    missing = wine_assets_process("registry", "rollback", "7")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("wine-assets: error: version v7 is not in")
    assert "published versions: v1" in missing.stderr

    exported = wine_assets_process("registry", "export", "--output", "v1.tar.gz")
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == "exported v1 to v1.tar.gz\n"
    imported = wine_assets_process("registry", "--registry", "elsewhere", "import", "v1.tar.gz", "--production")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == "v1.tar.gz: imported as v1; production is v1\n"
    assert ModelRegistry(tmp_path / "elsewhere").verify() == ModelRegistry(tmp_path / "registry").verify(1)

    reserved = wine_assets_process("registry", "reserve", "v9")
    assert reserved.returncode == 0, reserved.stderr
    assert reserved.stdout == "numbers up to v9 are taken; the next version is v10\n"

    wines = wine_frame.drop(columns="target").sample(6, random_state=3)
    wines.to_csv(tmp_path / "wines.csv", index=False)
    clear_cache()
    expected = predict(wines, registry_dir=tmp_path / "registry").predictions.reset_index(drop=True)
    from_file = wine_assets_process("predict", "wines.csv")
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stderr == ""
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(from_file.stdout)), expected, check_dtype=False)
    piped = wine_assets_process("predict", "-", "--format", "json", stdin=wines.head(2).to_json(orient="records"))
    assert piped.returncode == 0, piped.stderr
    pd.testing.assert_frame_equal(pd.DataFrame(json.loads(piped.stdout)), expected.head(2), check_dtype=False)

    (tmp_path / "main-metrics.json").write_text(json.dumps({**metrics, "accuracy": 0.5}))
    report = wine_assets_process("report", "--baseline", "main-metrics.json", "--output", "out/report.md")
    assert report.returncode == 0, report.stderr
    assert report.stdout == "" and "wine-assets: report written to out/report.md" in report.stderr
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| accuracy | 0.5000 |" in text
    assert "| evaluation_metrics | accuracy_threshold | pass |" in text  # read from DAGSTER_HOME's run


@pytest.mark.integration
def test_the_cli_modules_do_not_import_dagster(tmp_path):
    code = "import sys, wine_assets.cli, wine_assets.registry; print('dagster' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


# -- wine-assets in-process ---------------------------------------------------------------------------
@pytest.mark.component
def test_wine_assets_errors_go_to_stderr_with_exit_codes(env, tmp_path, wine_assets_cli):
    nothing = wine_assets_cli("registry", "show", env=env, cwd=tmp_path)
    assert nothing.returncode == 1
    assert nothing.stdout == ""
    assert "no model in production" in nothing.stderr and "release" in nothing.stderr
    assert wine_assets_cli("registry", "list", env=env, cwd=tmp_path).stdout.startswith("no versions in")
    bad_version = wine_assets_cli("registry", "show", "latest", env=env, cwd=tmp_path)
    assert bad_version.returncode == 2 and "'latest' is not a version" in bad_version.stderr
    no_metrics = wine_assets_cli("summary", env=env, cwd=tmp_path)
    assert no_metrics.returncode == 1 and "run the pipeline first" in no_metrics.stderr
    bad_params = tmp_path / "bad.yaml"
    bad_params.write_text("data: {test_size: 2}\n")
    refused = wine_assets_cli("--params", str(bad_params), "summary", env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "data.test_size = 2 is out of range" in refused.stderr
    usage = wine_assets_cli("registry", env=env, cwd=tmp_path)
    assert usage.returncode == 2


@pytest.mark.component
def test_rollback_moves_production_and_refuses_a_tampered_version(env, tmp_path, wine_assets_cli):
    registry = ModelRegistry(tmp_path / "registry")
    publish(registry, "a", "b", "c")
    moved = wine_assets_cli("registry", "rollback", "v2", env=env, cwd=tmp_path)
    assert moved.returncode == 0 and moved.stdout.strip() == "production moved from v3 to v2 (recorded)"
    assert registry.production_version() == 2
    same = wine_assets_cli("registry", "rollback", "2", env=env, cwd=tmp_path)
    assert same.returncode == 0 and same.stdout.strip() == "production is already v2"

    (registry.version_dir(1) / "scaler.skops").write_bytes(b"changed")
    before = tree_snapshot(registry.root)
    refused = wine_assets_cli("registry", "rollback", "1", env=env, cwd=tmp_path)
    assert refused.returncode == 1
    assert "scaler.skops does not match its sha256" in refused.stderr
    assert tree_snapshot(registry.root) == before
    shown = wine_assets_cli("registry", "show", "1", env=env, cwd=tmp_path)
    assert shown.returncode == 1 and "refusing to load" in shown.stderr

    reserved = wine_assets_cli("registry", "reserve", "v9", env=env, cwd=tmp_path)
    assert reserved.returncode == 0
    assert reserved.stdout.strip() == "numbers up to v9 are taken; the next version is v10"
    not_a_number = wine_assets_cli("registry", "reserve", "nine", env=env, cwd=tmp_path)
    assert not_a_number.returncode == 2 and "'nine' is not a version" in not_a_number.stderr


@pytest.mark.component
def test_registry_show_prints_the_manifest_with_verified_files(env, tmp_path, wine_assets_cli):
    registry = ModelRegistry(tmp_path / "registry")
    publish(registry, "a", "b")
    text = wine_assets_cli("registry", "show", "v2", env=env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("wine-classifier v2  (production)\n")
    assert "files (sha256 verified)" in text.stdout
    assert registry.manifest(2)["files"]["model.skops"]["sha256"] in text.stdout
    older = wine_assets_cli("registry", "show", "1", env=env, cwd=tmp_path)
    assert older.stdout.startswith("wine-classifier v1\n")
    as_json = wine_assets_cli("registry", "show", "--json", env=env, cwd=tmp_path)
    assert json.loads(as_json.stdout) == registry.manifest(2)


@pytest.mark.component
def test_summary_exits_1_when_the_gate_fails_or_the_metrics_are_broken(env, tmp_path, wine_assets_cli):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "f1_macro": 0.4, "data": {}}))
    failed = wine_assets_cli("summary", env=env, cwd=tmp_path)
    assert failed.returncode == 1 and "0.5000 (FAILS the gate of 0.80)" in failed.stdout
    assert "production      none yet in" in failed.stdout
    (artifacts / "metrics.json").write_text("{oops")
    broken = wine_assets_cli("summary", env=env, cwd=tmp_path)
    assert broken.returncode == 1 and "is not valid JSON" in broken.stderr and "Traceback" not in broken.stderr
    (artifacts / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    partial = wine_assets_cli("summary", env=env, cwd=tmp_path)
    assert partial.returncode == 1 and "has no numeric f1_macro" in partial.stderr


@pytest.mark.component
def test_export_and_import_through_the_command(env, tmp_path, wine_assets_cli):
    registry = ModelRegistry(tmp_path / "registry")
    publish(registry, "a", "b")
    exported = wine_assets_cli("registry", "export", "1", env=env, cwd=tmp_path)
    assert exported.returncode == 0 and exported.stdout == "exported v1 to wine-classifier-v1.tar.gz\n"
    into = ["registry", "--registry", "other", "import"]
    imported = wine_assets_cli(*into, "wine-classifier-v1.tar.gz", env=env, cwd=tmp_path)
    assert imported.returncode == 0 and imported.stdout == "wine-classifier-v1.tar.gz: imported as v1\n"
    again = wine_assets_cli(*into, "wine-classifier-v1.tar.gz", "--production", env=env, cwd=tmp_path)
    assert again.stdout == "wine-classifier-v1.tar.gz: already present as v1; production is v1\n"
    absent = wine_assets_cli(*into, "nope.tar.gz", env=env, cwd=tmp_path)
    assert absent.returncode == 2 and "bundle not found: nope.tar.gz" in absent.stderr
