"""The pull-request report against hand-made baselines, the check results, and the command in-process
(test_cli runs it once as a real process, after the real materialize)."""

import json
import shutil

import dagster as dg
import pytest

from wine_assets.definitions import ASSET_CHECKS, ASSETS, defs
from wine_assets.params import Params
from wine_assets.pipeline.history import latest_check_results
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.registry import ModelRegistry
from wine_assets.report import ABSENT, Baseline, CheckRow, ReportError, load_baseline, params_diff, plot_links, render

from .support import cli_env, make_dagster_home, tiny_model_files

METRICS = {
    "accuracy": 0.9444,
    "precision_macro": 0.95,
    "recall_macro": 0.94,
    "f1_macro": 0.945,
    "precision_weighted": 0.95,
    "recall_weighted": 0.9444,
    "f1_weighted": 0.9443,
    "data": {"source": "builtin", "fingerprint": "ab" * 32, "train_rows": 142, "test_rows": 36},
    "params": Params().to_dict(),
}


def baseline_file(tmp_path, **changes):
    metrics = {**METRICS, **changes}
    path = tmp_path / "main-metrics.json"
    path.write_text(json.dumps(metrics))
    return path


def row(report, metric):
    return next(line for line in report.splitlines() if line.startswith(f"| {metric} |"))


@pytest.mark.unit
def test_an_improvement_shows_baseline_current_and_a_positive_change(tmp_path):
    baseline = load_baseline(str(baseline_file(tmp_path, accuracy=0.9167)), tmp_path / "registry")
    report = render(METRICS, baseline, METRICS["params"], [], [])
    assert "| Metric | Baseline | Current | Change |" in report
    assert row(report, "accuracy") == "| accuracy | 0.9167 | 0.9444 | +0.0277 |"
    assert row(report, "f1_macro") == "| f1_macro | 0.9450 | 0.9450 | +0.0000 |"
    assert "No params changed." in report


@pytest.mark.unit
def test_a_regression_shows_a_negative_change(tmp_path):
    baseline = load_baseline(str(baseline_file(tmp_path, accuracy=1.0, recall_macro=1.0)), tmp_path / "registry")
    report = render(METRICS, baseline, METRICS["params"], [], [])
    assert row(report, "accuracy") == "| accuracy | 1.0000 | 0.9444 | -0.0556 |"
    assert row(report, "recall_macro") == "| recall_macro | 1.0000 | 0.9400 | -0.0600 |"


@pytest.mark.unit
def test_without_a_baseline_the_values_stand_alone(tmp_path):
    assert load_baseline("production", tmp_path / "empty-registry") is None
    report = render(METRICS, None, METRICS["params"], None, [])
    assert "No baseline" in report
    assert "| Metric | Value |" in report and row(report, "accuracy") == "| accuracy | 0.9444 |"
    assert "Change" not in report
    assert "No baseline to compare params with." in report
    assert "DAGSTER_HOME not set" in report


@pytest.mark.unit
def test_changed_params_are_listed_and_only_those(tmp_path):
    changed = Params().to_dict()
    changed["model"]["n_estimators"] = 300
    changed["data"]["test_size"] = 0.25
    baseline = load_baseline(str(baseline_file(tmp_path)), tmp_path / "registry")
    report = render(METRICS, baseline, changed, [], [])
    assert "| model.n_estimators | `100` | `300` |" in report
    assert "| data.test_size | `0.2` | `0.25` |" in report
    assert report.count("| model.") == 1
    assert params_diff({"a": {"x": 1}}, {"a": {"x": 1, "y": 2}}) == [("a.y", 2, ABSENT)]
    nulled = Params().to_dict()
    nulled["model"]["max_depth"] = None
    deeper = Params().to_dict()
    deeper["model"]["max_depth"] = 5
    report = render(METRICS, Baseline("b", METRICS, deeper), nulled, [], [])
    assert "| model.max_depth | `5` | `null` |" in report


@pytest.mark.unit
def test_the_checks_data_and_plots_sections(tmp_path):
    plots = tmp_path / "artifacts" / "plots"
    plots.mkdir(parents=True)
    (plots / "confusion_matrix.png").write_bytes(b"png")
    links = plot_links(tmp_path / "artifacts", tmp_path)
    assert links == [("Confusion matrix", "artifacts/plots/confusion_matrix.png")]
    checks = [
        CheckRow("raw_wine", "schema", "pass", "0123456789"),
        CheckRow("evaluation_metrics", "no_regression", "warn", None),
    ]
    report = render(METRICS, None, METRICS["params"], checks, links)
    assert "| raw_wine | schema | pass | 01234567 |" in report
    assert "| evaluation_metrics | no_regression | warn | - |" in report
    assert f"- fingerprint (sha256): `{'ab' * 32}`" in report
    assert "- rows: 142 train, 36 test" in report
    assert "![Confusion matrix](artifacts/plots/confusion_matrix.png)" in report


@pytest.mark.unit
def test_broken_baselines_are_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="baseline metrics not found"):
        load_baseline(str(tmp_path / "nope.json"), tmp_path)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="is not a JSON object"):
        load_baseline(str(tmp_path / "bad.json"), tmp_path)
    (tmp_path / "metrics.json").write_text('{"accuracy": 0.9}')
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{name}: &{name} [*{previous}, *{previous}, *{previous}]\n"
        for previous, name in zip("abcdefg", "bcdefgh", strict=True)
    )
    (tmp_path / "params.yaml").write_text(laughs)
    with pytest.raises(ReportError, match=r"the baseline's params .*params.yaml cannot be read: .*YAML aliases"):
        load_baseline(str(tmp_path / "metrics.json"), tmp_path)


@pytest.mark.unit
def test_production_baseline_reads_the_released_metrics_and_params(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    registry.publish(
        {
            **tiny_model_files("m"),
            "metrics.json": json.dumps({**METRICS, "accuracy": 0.9}).encode(),
            "params.yaml": b"model: {n_estimators: 50}\n",
        },
        {},
    )
    baseline = load_baseline("production", tmp_path / "registry")
    assert baseline.label == "production v1"
    assert baseline.metrics["accuracy"] == 0.9
    assert baseline.params == {"model": {"n_estimators": 50}}


@pytest.mark.component
def test_check_results_come_from_the_latest_runs(tmp_path, write_params, write_csv):
    (tmp_path / "instance").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "instance")) as instance:
        dg.materialize(
            [*ASSETS, *ASSET_CHECKS],
            instance=instance,
            selection=["raw_wine"],
            resources={"params": WineParamsResource(params_file=str(write_params()))},
        )
        rows = {(row.asset, row.check): row for row in latest_check_results(instance, defs)}
    assert rows[("raw_wine", "schema")].status == "pass"
    assert rows[("raw_wine", "feature_drift")].status == "pass"
    assert rows[("evaluation_metrics", "accuracy_threshold")].status == "not run"
    assert len(rows) == 9


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """The whole graph materialized in-process into a persistent instance (a DAGSTER_HOME the command
    reads), with a small forest: artifacts/, registry/ and the check results of a real run."""
    folder = tmp_path_factory.mktemp("pipeline_run")
    params_file = folder / "params.yaml"
    params_file.write_text("paths: {artifacts_dir: artifacts, registry_dir: registry}\nmodel: {n_estimators: 10}\n")
    home = make_dagster_home(folder / "dagster_home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = dg.materialize(
            [*ASSETS, *ASSET_CHECKS],
            instance=instance,
            resources={"params": WineParamsResource(params_file=str(params_file))},
        )
    assert result.success
    return folder


@pytest.mark.component
def test_the_report_command_after_a_run(pipeline_run, tmp_path, wine_assets_cli):
    shutil.copytree(pipeline_run, tmp_path, dirs_exist_ok=True)
    env = cli_env(tmp_path / "dagster_home", tmp_path / "params.yaml")
    baseline = baseline_file(tmp_path, accuracy=0.5)
    completed = wine_assets_cli(
        "report", "--baseline", str(baseline), "--output", "out/report.md", env=env, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "" and completed.stderr == "wine-assets: report written to out/report.md\n"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| accuracy | 0.5000 |" in row(report, "accuracy") and "| +0." in row(report, "accuracy")
    assert "| raw_wine | schema | pass |" in report
    assert "| evaluation_metrics | accuracy_threshold | pass |" in report
    assert "| model.n_estimators | `100` | `10` |" in report  # the run's params against the baseline's
    assert "![Confusion matrix](../artifacts/plots/confusion_matrix.png)" in report
    printed = wine_assets_cli("report", "--baseline", "production", env=env, cwd=tmp_path)
    assert printed.returncode == 0 and printed.stdout.startswith("#") and "production v1" in printed.stdout
    missing = wine_assets_cli("report", "--baseline", "nope.json", env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "baseline metrics not found" in missing.stderr
    gone = wine_assets_cli("report", env={**env, "DAGSTER_HOME": str(tmp_path / "absent")}, cwd=tmp_path)
    assert gone.returncode == 1 and "is not a folder" in gone.stderr
