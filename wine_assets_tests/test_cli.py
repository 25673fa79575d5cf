"""Real command-line runs: the dagster CLI against the module, and the wine-assets command."""

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from wine_assets.registry import ModelRegistry

from .conftest import ALL_ASSETS, REPO_ROOT, cli_env, shuffled_labels, tree_snapshot

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TIMEOUT = 300


def sh(args, env, cwd):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def dagster(*args, env, cwd):
    return sh([str(BIN / "dagster"), *args], env, cwd)


def wine_assets(*args, env, cwd):
    return sh([str(BIN / "wine-assets"), *args], env, cwd)


@pytest.fixture
def env(dagster_home, write_params):
    return cli_env(dagster_home, write_params())


def test_definitions_validate(env, tmp_path):
    completed = dagster("definitions", "validate", "-m", "wine_assets", env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_dg_checks_and_lists_the_project_definitions(env):
    """Dagster's `dg` reads [tool.dg] in pyproject.toml and loads the same definitions."""
    # dg works on the project folder it runs in; VIRTUAL_ENV names the venv it should use.
    dg_env = {**env, "VIRTUAL_ENV": str(BIN.parent)}
    checked = sh([str(BIN / "dg"), "check", "defs"], dg_env, REPO_ROOT)
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    assert "does not match the virtual environment" not in checked.stdout + checked.stderr
    listed = sh([str(BIN / "dg"), "list", "defs", "--json"], dg_env, REPO_ROOT)
    assert listed.returncode == 0, listed.stderr[-2000:]
    found = json.loads(listed.stdout)
    assert {asset["asset_key"] for asset in found["assets"]} == ALL_ASSETS
    assert {job["name"] for job in found["jobs"]} == {"training_job", "release_job"}
    assert {sensor["name"] for sensor in found["sensors"]} == {"new_data_sensor", "release_after_training"}
    assert len(found["asset_checks"]) == 8


def test_materialize_everything_then_use_the_wine_assets_command(cli_materialized, tmp_path):
    env = cli_materialized.env
    assert "Executing steps in process" in cli_materialized.completed.stderr
    artifacts = tmp_path / "artifacts"
    for name in (
        "model.joblib",
        "scaler.joblib",
        "metrics.json",
        "plots/confusion_matrix.png",
        "plots/feature_importance.png",
    ):
        assert (artifacts / name).is_file(), name
    accuracy = json.loads((artifacts / "metrics.json").read_text())["accuracy"]
    assert accuracy >= 0.80

    summary = wine_assets("summary", env=env, cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr
    assert f"test accuracy   {accuracy:.4f} (passes the gate of 0.80)" in summary.stdout
    assert "production      v1" in summary.stdout

    listing = wine_assets("registry", "list", env=env, cwd=tmp_path)
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[1].startswith("v1 ") and listing.stdout.rstrip().endswith("*")

    show = wine_assets("registry", "show", "--json", env=env, cwd=tmp_path)
    assert show.returncode == 0
    assert json.loads(show.stdout)["tag"] == "model-v1"
    text = wine_assets("registry", "show", "v1", env=env, cwd=tmp_path)
    assert "wine-classifier v1  (production)" in text.stdout and "files (sha256 verified)" in text.stdout

    missing = wine_assets("registry", "rollback", "7", env=env, cwd=tmp_path)
    assert missing.returncode == 2
    assert "version v7 is not in" in missing.stderr and "published versions: v1" in missing.stderr
    same = wine_assets("registry", "rollback", "v1", env=env, cwd=tmp_path)
    assert same.returncode == 0 and "production is already v1" in same.stdout


def test_release_job_exits_non_zero_when_the_gate_fails(cli_materialized, tmp_path, write_csv):
    env = cli_materialized.env
    registry = tmp_path / "registry"
    assert ModelRegistry(registry).production_version() == 1
    before = tree_snapshot(registry)

    params_file = Path(env["WINE_ASSETS_PARAMS"])
    document = yaml.safe_load(params_file.read_text())
    document["data"] = {"source": write_csv(edit=shuffled_labels).name}
    params_file.write_text(yaml.safe_dump(document))

    training = dagster("job", "execute", "-m", "wine_assets", "-j", "training_job", env=env, cwd=tmp_path)
    assert training.returncode != 0
    assert "accuracy_threshold" in training.stderr
    release = dagster("job", "execute", "-m", "wine_assets", "-j", "release_job", env=env, cwd=tmp_path)
    assert release.returncode != 0
    assert "1 blocking asset check failed with ERROR severity" in release.stderr
    assert tree_snapshot(registry) == before
    assert ModelRegistry(registry).production_version() == 1


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
    completed = dagster(
        "asset", "materialize", "-m", "wine_assets", "--select", "scaler", "-c", str(config), env=env, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Executing steps using multiprocess executor" in completed.stderr
    assert "Executing steps in process" not in completed.stderr
    assert 'Launching subprocess for "scaler"' in completed.stderr
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        tags = instance.get_runs(limit=1)[0].tags
    assert tags["wine_assets/params_file"] == str(tmp_path / "other.yaml")
    assert tags["wine_assets/params_base_dir"] == str(tmp_path)


def test_a_cli_run_is_tagged_with_the_absolute_params_file_it_was_launched_with(cli_materialized_once):
    root = cli_materialized_once.root
    with dg.DagsterInstance.from_config(str(root / "dagster_home")) as instance:
        (run,) = instance.get_runs()
    assert run.tags["wine_assets/params_file"] == str(root / "params.yaml")
    assert run.tags["wine_assets/params_base_dir"] == str(root)


def test_params_override_from_a_run_config_file(env, tmp_path):
    config = tmp_path / "override.yaml"
    config.write_text('resources:\n  params:\n    config:\n      overrides: ["evaluation.min_accuracy=1.5"]\n')
    completed = dagster(
        "asset", "materialize", "-m", "wine_assets", "--select", "raw_wine", "-c", str(config), env=env, cwd=tmp_path
    )
    assert completed.returncode != 0
    assert "evaluation.min_accuracy = 1.5 is out of range; allowed: 0 <= value <= 1" in completed.stderr


def test_wine_assets_errors_go_to_stderr_with_exit_codes(env, tmp_path):
    nothing = wine_assets("registry", "show", env=env, cwd=tmp_path)
    assert nothing.returncode == 1
    assert nothing.stdout == ""
    assert "no model in production" in nothing.stderr and "release" in nothing.stderr
    assert wine_assets("registry", "list", env=env, cwd=tmp_path).stdout.startswith("no versions in")
    bad_version = wine_assets("registry", "show", "latest", env=env, cwd=tmp_path)
    assert bad_version.returncode == 2 and "'latest' is not a version" in bad_version.stderr
    no_metrics = wine_assets("summary", env=env, cwd=tmp_path)
    assert no_metrics.returncode == 1 and "run the pipeline first" in no_metrics.stderr
    bad_params = tmp_path / "bad.yaml"
    bad_params.write_text("data: {test_size: 2}\n")
    refused = wine_assets("--params", str(bad_params), "summary", env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "data.test_size = 2 is out of range" in refused.stderr
    usage = wine_assets("registry", env=env, cwd=tmp_path)
    assert usage.returncode == 2


def test_the_cli_modules_do_not_import_dagster(tmp_path):
    code = "import sys, wine_assets.cli, wine_assets.registry; print('dagster' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert completed.stdout.strip() == "False"


def test_rollback_moves_production_and_refuses_a_tampered_version(env, tmp_path):
    from wine_assets.files import joblib_bytes

    registry = ModelRegistry(tmp_path / "registry")
    for tag in ("a", "b", "c"):
        registry.publish(
            {"model.joblib": joblib_bytes(tag), "scaler.joblib": joblib_bytes(tag)}, {"metrics": {"accuracy": 0.9}}
        )
    moved = wine_assets("registry", "rollback", "v2", env=env, cwd=tmp_path)
    assert moved.returncode == 0 and moved.stdout.strip() == "production moved from v3 to v2"
    assert registry.production_version() == 2

    (registry.version_dir(1) / "scaler.joblib").write_bytes(b"changed")
    before = tree_snapshot(registry.root)
    refused = wine_assets("registry", "rollback", "1", env=env, cwd=tmp_path)
    assert refused.returncode == 1
    assert "scaler.joblib does not match its sha256" in refused.stderr
    assert tree_snapshot(registry.root) == before
    shown = wine_assets("registry", "show", "1", env=env, cwd=tmp_path)
    assert shown.returncode == 1 and "refusing to load" in shown.stderr

    reserved = wine_assets("registry", "reserve", "v9", env=env, cwd=tmp_path)
    assert reserved.returncode == 0
    assert reserved.stdout.strip() == "numbers up to v9 are taken; the next version is v10"
    not_a_number = wine_assets("registry", "reserve", "nine", env=env, cwd=tmp_path)
    assert not_a_number.returncode == 2 and "'nine' is not a version" in not_a_number.stderr


def test_summary_exits_1_when_the_gate_fails_or_the_metrics_are_broken(env, tmp_path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "f1_macro": 0.4, "data": {}}))
    failed = wine_assets("summary", env=env, cwd=tmp_path)
    assert failed.returncode == 1 and "0.5000 (FAILS the gate of 0.80)" in failed.stdout
    (artifacts / "metrics.json").write_text("{oops")
    broken = wine_assets("summary", env=env, cwd=tmp_path)
    assert broken.returncode == 1 and "is not valid JSON" in broken.stderr and "Traceback" not in broken.stderr
    (artifacts / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    partial = wine_assets("summary", env=env, cwd=tmp_path)
    assert partial.returncode == 1 and "has no numeric f1_macro" in partial.stderr


def test_a_run_launched_with_no_params_file_is_tagged_and_warns(tmp_path):
    """Built-in defaults only where no params file exists at launch, and the run says so."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = cli_env(home, tmp_path / "unused.yaml")
    env.pop("WINE_ASSETS_PARAMS")
    completed = dagster("asset", "materialize", "-m", "wine_assets", "--select", "raw_wine", env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"no params file existed when this run was launched: built-in defaults, paths relative to {tmp_path}" in (
        completed.stderr
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        tags = instance.get_runs(limit=1)[0].tags
    assert tags["wine_assets/params_file"] == "none (built-in defaults)"
    assert tags["wine_assets/params_base_dir"] == str(tmp_path)
