"""The statistics of comparing variants: the corrected resampled t-test, Holm, the decision rule."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from dagster import AssetKey, DagsterInstance
from scipy import stats
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from benchmarks.synthetic import linear_frame  # the dataset where production is weak, shared with make bench
from wine_assets.experiments import (
    Protocol,
    VariantScores,
    check_variants,
    corrected_ttest,
    decide,
    decision_for,
    holm,
    release_challenger,
    score_variant,
    variants_of,
)
from wine_assets.features import split_frame
from wine_assets.ingestion import load_builtin_frame
from wine_assets.params import ParamsError, load_params
from wine_assets.pipeline.experiments import DECISION, SCORES
from wine_assets.registry import ModelRegistry
from wine_assets.release import ReleaseError

from .support import (
    REPO_ROOT,
    build_once,
    cli_env,
    copy_folder,
    make_dagster_home,
    run_program,
    tree_snapshot,
)


@pytest.mark.unit
def test_the_corrected_t_statistic_by_hand():
    differences = [0.02, 0.0, 0.05, -0.01, 0.03, 0.01]
    t_value, dof, p_value, (low, high) = corrected_ttest(differences, n_train=120, n_test=30, delta=0.0)
    mean, variance = np.mean(differences), np.var(differences, ddof=1)
    expected_t = mean / math.sqrt((1 / 6 + 30 / 120) * variance)
    assert t_value == pytest.approx(expected_t) and dof == 5
    assert p_value == pytest.approx(stats.t.sf(expected_t, 5))
    assert low < mean < high
    # The naive paired t-test ignores that the training sets overlap: it is far more confident.
    naive = stats.ttest_1samp(differences, 0.0, alternative="greater").pvalue
    assert naive < p_value


@pytest.mark.unit
def test_a_minimum_improvement_shifts_the_test_and_constant_differences_are_decided_by_sign():
    differences = [0.03, 0.04, 0.05, 0.02, 0.06]
    _, _, without, _ = corrected_ttest(differences, 100, 25, delta=0.0)
    _, _, with_delta, _ = corrected_ttest(differences, 100, 25, delta=0.03)
    assert without < with_delta
    assert corrected_ttest([0.0] * 5, 100, 25)[2] == 1.0  # a tie is no win
    assert corrected_ttest([0.01] * 5, 100, 25)[2] == 0.0
    with pytest.raises(ValueError, match="at least two"):
        corrected_ttest([0.1], 100, 25)


@pytest.mark.unit
def test_holm_adjusts_step_down_and_stays_monotone():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"only": 0.2}) == {"only": 0.2}
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


@pytest.mark.unit
def test_the_decision_needs_significance_and_the_gate():
    champion = [0.90, 0.92, 0.91, 0.89, 0.93, 0.90, 0.91, 0.92, 0.90, 0.91]
    better = [score + 0.06 + 0.002 * (i % 3) for i, score in enumerate(champion)]
    twin = [score + (0.01 if i % 2 else -0.01) for i, score in enumerate(champion)]
    scores = {"production": champion, "better": better, "twin": twin, "gate-fails": better}
    accuracy = {"production": 0.97, "better": 0.97, "twin": 0.97, "gate-fails": 0.75}
    decision = decide(scores, "production", 142, 36, accuracy, min_accuracy=0.8, min_improvement=0.01)
    assert decision.winner == "better" and decision.challenger_wins
    assert decision.reasons["twin"].startswith("not significantly better")
    assert decision.reasons["gate-fails"].startswith("significantly better, but fails the gate")
    assert decision.adjusted_p_values["better"] >= decision.tests["better"].p_value
    assert decision.tests["better"].effect_size > 0
    same = decide({"production": champion, "copy": champion}, "production", 142, 36, accuracy, 0.8)
    assert same.winner == "production" and not same.challenger_wins
    with pytest.raises(ValueError, match="use the same folds"):
        decide({"production": champion, "short": champion[:5]}, "production", 142, 36, accuracy, 0.8)


@pytest.fixture(scope="module")
def training_rows():
    frame = load_builtin_frame()
    train, _ = split_frame(frame, 0.2, 42)
    return train.drop(columns="target").to_numpy(), train["target"].to_numpy()


def fold_accuracies(model, features, labels, protocol):
    scores = []
    for train_index, test_index in protocol.splits(labels):
        fitted = make_pipeline(StandardScaler(), model).fit(features[train_index], labels[train_index])
        scores.append(float((fitted.predict(features[test_index]) == labels[test_index]).mean()))
    return scores


@pytest.mark.unit
def test_on_the_wine_data_a_twin_does_not_win_and_a_stump_loses_clearly(training_rows):
    features, labels = training_rows
    protocol = Protocol(folds=5, repeats=5, seed=0)
    splits = protocol.splits(labels)
    assert len(splits) == 25 and splits[0][0].tolist() == protocol.splits(labels)[0][0].tolist()
    n_train, n_test = len(splits[0][0]), len(splits[0][1])
    scores = {
        "production": fold_accuracies(RandomForestClassifier(30, random_state=1), features, labels, protocol),
        "twin": fold_accuracies(RandomForestClassifier(30, random_state=2), features, labels, protocol),
        "stump": fold_accuracies(RandomForestClassifier(1, max_depth=1, random_state=1), features, labels, protocol),
    }
    gate = {"production": 1.0, "twin": 1.0, "stump": 0.6}
    decision = decide(scores, "production", n_train, n_test, gate, min_accuracy=0.8)
    assert decision.winner == "production"
    assert decision.adjusted_p_values["twin"] > 0.05
    assert decision.tests["stump"].mean_difference < -0.2 and decision.tests["stump"].p_value > 0.99
    # The other way round: the forest against a stump champion wins, significantly.
    reverse = decide(scores, "stump", n_train, n_test, gate, min_accuracy=0.8, min_improvement=0.05)
    assert reverse.winner in ("production", "twin")
    assert reverse.adjusted_p_values[reverse.winner] < 0.01


# -- the experiment grid, run for real once per test run: Dagster runs on a DAGSTER_HOME instance
# through the real `wine-assets experiment run`, shared by every grid test (each mutating test works
# on a private copy). Three datasets: the wines (where production is strong: a stump loses, a twin
# is noise), the linear data of benchmarks/synthetic.py (where logistic regression wins) and the
# wines with a NaN (blocked by its check, alone). Tracked in MLflow when the extra is installed.
GRID_VARIANTS = {
    "stump": {"family": "decision_tree", "max_depth": 1, "random_state": 0},
    # production's configuration with another seed: any gain is noise
    "twin": {"family": "random_forest", "n_estimators": 30, "random_state": 7},
    "logistic": {"family": "logistic_regression", "C": 10.0, "max_iter": 2000},
}


def experiment_document(**experiments: Any) -> dict[str, Any]:
    return {
        "paths": {"artifacts_dir": "artifacts", "registry_dir": "registry"},
        "model": {"n_estimators": 30},
        "experiments": {"folds": 5, "repeats": 2, "seed": 3, **experiments},
    }


def _run_the_grid(root: Path) -> dict[str, Any]:
    linear_frame().to_csv(root / "linear.csv", index=False)
    broken = load_builtin_frame()
    broken.loc[5, "alcohol"] = np.nan
    broken.to_csv(root / "broken.csv", index=False)
    experiments: dict[str, Any] = {
        "datasets": {"wine": "builtin", "linear": "linear.csv", "broken": "broken.csv"},
        "variants": GRID_VARIANTS,
    }
    tracked = importlib.util.find_spec("mlflow") is not None
    if tracked:
        (root / "tracking").mkdir()
        experiments["mlflow_tracking_uri"] = "sqlite:///tracking/mlflow.db"
    (root / "params.yaml").write_text(yaml.safe_dump(experiment_document(**experiments)))
    elsewhere = root / "elsewhere"  # the command runs from another folder: paths follow the params file
    elsewhere.mkdir()
    env = cli_env(make_dagster_home(root / "dagster_home"), root / "params.yaml")
    completed = run_program("wine-assets", "experiment", "run", "--workers", "2", env=env, cwd=elsewhere)
    return {
        "returncode": completed.returncode,
        "stdout": completed.stdout,
        "stderr": completed.stderr,
        "mlflow": tracked,
    }


@dataclass(frozen=True)
class Grid:
    root: Path
    env: dict[str, str]
    run: dict[str, Any]

    @property
    def home(self) -> Path:
        return Path(self.env["DAGSTER_HOME"])

    def decision(self, dataset: str) -> dict[str, Any]:
        return json.loads((self.root / f"artifacts/experiments/{dataset}/decision.json").read_text())


# The tests of the shared grid run on one xdist worker: the first builds the grid, the others
# follow, and no other worker sits waiting on the grid's lock meanwhile.
GRID = pytest.mark.xdist_group("grid")


@pytest.fixture(scope="session")
def grid_once(tmp_path_factory) -> Grid:
    root, record = build_once(tmp_path_factory, "experiment_grid", _run_the_grid)
    return Grid(root, cli_env(root / "dagster_home", root / "params.yaml"), record)


@pytest.fixture
def grid(grid_once: Grid, tmp_path: Path) -> Grid:
    """A private copy of the grid's folder (params, artifacts, instance, tracking store)."""
    copy_folder(grid_once.root, tmp_path)
    return Grid(tmp_path, cli_env(tmp_path / "dagster_home", tmp_path / "params.yaml"), grid_once.run)


def stored_partitions(home: Path, key: AssetKey) -> set[str]:
    with DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_materializations(key, limit=100).records
        return {record.partition_key for record in records}


@pytest.mark.integration
@GRID
def test_the_grid_runs_every_partition_and_a_bad_dataset_blocks_only_itself(grid_once):
    run = grid_once.run
    assert run["returncode"] == 1, run["stderr"][-3000:]  # one dataset was not compared
    assert "dataset 'broken' not compared: check no_missing_values failed" in run["stderr"]
    assert "Traceback" not in run["stderr"]
    assert "== wine: decision: keep production ==" in run["stdout"]
    assert "== linear: decision: promote logistic ==" in run["stdout"]
    variants = {"production", *GRID_VARIANTS}
    assert stored_partitions(grid_once.home, SCORES) == {
        f"{dataset}|{variant}" for dataset in ("wine", "linear") for variant in variants
    }
    assert stored_partitions(grid_once.home, DECISION) == {"wine", "linear"}
    assert not (grid_once.root / "registry").exists()  # the grid never publishes


@pytest.mark.integration
@GRID
def test_weak_and_twin_variants_are_not_promoted_and_release_is_blocked(grid, wine_assets_cli):
    summary = grid.decision("wine")
    assert summary["decision"] == "keep production" and summary["winner"] == "production"
    tests = {test["challenger"]: test for test in summary["tests"]}
    assert tests["stump"]["mean_difference"] < -0.1 and tests["stump"]["holm_p_value"] > 0.9
    assert tests["twin"]["holm_p_value"] >= 0.05
    rows = json.loads((grid.root / "artifacts/experiments/wine/leaderboard.json").read_text())
    assert rows[-1]["variant"] == "stump" and [row["rank"] for row in rows] == [1, 2, 3, 4]
    # every partition is a materialization in the instance, each with its per-fold scores
    with DagsterInstance.from_config(str(grid.home)) as instance:
        record = instance.fetch_materializations(SCORES, limit=1).records[0]
        metadata = record.asset_materialization.metadata
        assert len(metadata["fold_scores"].value) == 10 and 0 < metadata["mean_accuracy"].value <= 1
        decisions = instance.fetch_materializations(DECISION, limit=10).records
        decision = next(r for r in decisions if r.partition_key == "wine").asset_materialization.metadata
        assert decision["decision"].value == "keep production"
        assert decision["p_value"].value == pytest.approx(summary["p_value"])
    # the blocking check stops the release; nothing reaches the registry
    released = wine_assets_cli("experiment", "release", "--dataset", "wine", env=grid.env, cwd=grid.root)
    assert released.returncode == 1
    assert "challenger_won failed (keep production)" in released.stderr
    assert not (grid.root / "registry").exists()
    # the same params give the same fold scores: the pure function outside Dagster agrees
    params = load_params(grid.root / "params.yaml")
    fitted = score_variant(load_builtin_frame(), "wine", variants_of(params)["twin"], params)
    stored = json.loads((grid.root / "artifacts/experiments/wine/twin/scores.json").read_text())
    assert stored["fold_scores"] == fitted.scores.fold_scores


@pytest.mark.integration
@GRID
def test_a_better_family_is_released_as_candidate_then_production(grid, wine_assets_cli):
    summary = grid.decision("linear")
    assert summary["challenger"] == "logistic" and summary["p_value"] < 0.05 and summary["effect_size"] > 0

    # as a candidate first: published, production untouched, ready for serving.candidate_version
    document = yaml.safe_load((grid.root / "params.yaml").read_text())
    document["experiments"]["release_as"] = "candidate"
    candidate_params = grid.root / "candidate.yaml"
    candidate_params.write_text(yaml.safe_dump(document))
    candidate_env = cli_env(grid.home, candidate_params)
    released = wine_assets_cli("experiment", "release", "--dataset", "linear", env=candidate_env, cwd=grid.root)
    assert released.returncode == 0, released.stderr[-3000:]
    assert "production stays empty; to A/B test it, set serving.experiment and serving.candidate_version: 1" in (
        released.stdout
    )
    registry = ModelRegistry(grid.root / "registry")
    assert registry.versions() == [1] and registry.production_version() is None
    # then as production: the same bytes, so no new version; the alias moves
    released = wine_assets_cli("experiment", "release", "--dataset", "linear", env=grid.env, cwd=grid.root)
    assert released.returncode == 0, released.stderr[-3000:]
    assert "released logistic from linear as v1" in released.stdout and "production is v1" in released.stdout
    manifest = registry.manifest(1)
    assert registry.versions() == [1] and registry.production_version() == 1
    assert manifest["variant"]["name"] == "logistic" and manifest["variant"]["family"] == "logistic_regression"
    assert manifest["variant"]["hyperparameters"] == {"C": 10.0, "max_iter": 2000}
    assert manifest["variant"]["decision"]["p_value"] == pytest.approx(summary["p_value"])
    assert type(registry.load(1).model).__name__ == "LogisticRegression"
    # the released bytes are the ones the partition wrote and the decision judged
    assert manifest["files"]["model.skops"]["sha256"] == summary["files"]["logistic"]["model.skops"]
    # and the ordinary predict path scores with it
    out = grid.root / "out.csv"
    predicted = wine_assets_cli("predict", grid.root / "linear.csv", "--output", out, env=grid.env, cwd=grid.root)
    assert predicted.returncode == 0, predicted.stderr
    assert (pd.read_csv(out)["predicted_class"] == linear_frame()["target"]).mean() > 0.85


@pytest.mark.integration
@GRID
def test_one_partition_from_the_dagster_command_line_and_a_decision_out_of_date(grid, wine_assets_cli):
    """The README's way to materialize one partition with `dagster asset materialize`; once a
    dataset holds other rows, its decision is out of date and its release is refused."""
    before = tree_snapshot(grid.root / "registry")
    linear_frame(seed=8).to_csv(grid.root / "linear.csv", index=False)
    module = ["asset", "materialize", "-m", "wine_assets.experiments_definitions", "--select"]
    datasets = run_program(
        "dagster", *module, "experiments/raw_wine,experiments/validated_wine", "--partition", "linear",
        env=grid.env, cwd=grid.root,
    )  # fmt: skip
    assert datasets.returncode == 0, datasets.stderr[-3000:]
    refused = wine_assets_cli("experiment", "release", "--dataset", "linear", env=grid.env, cwd=grid.root)
    assert refused.returncode == 1 and "the rows of dataset 'linear' changed after the decision" in refused.stderr
    assert tree_snapshot(grid.root / "registry") == before
    with DagsterInstance.from_config(str(grid.home)) as instance:
        records = instance.fetch_materializations(AssetKey(["experiments", "validated_wine"]), limit=100).records
    assert sorted(record.partition_key for record in records) == ["linear", "linear", "wine"]


@pytest.mark.integration
@GRID
def test_mlflow_tracking_logs_every_partition_and_mirrors_the_decision(grid_once):
    mlflow = pytest.importorskip("mlflow")
    assert grid_once.run["mlflow"]
    store = f"sqlite:///{grid_once.root / 'tracking/mlflow.db'}"
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("wine_assets/wine")
    runs = {run.data.tags["variant"]: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"production", *GRID_VARIANTS}
    stored = json.loads((grid_once.root / "artifacts/experiments/wine/stump/scores.json").read_text())
    history = client.get_metric_history(runs["stump"].info.run_id, "fold_accuracy")
    assert [metric.value for metric in sorted(history, key=lambda m: m.step)] == stored["fold_scores"]
    assert runs["stump"].data.params["hp.max_depth"] == "1"
    summary = json.loads((grid_once.root / "artifacts/experiments/wine/decision.json").read_text())
    aliases = client.get_registered_model("wine-wine").aliases
    champion = client.get_model_version("wine-wine", aliases["champion"])
    challenger = client.get_model_version("wine-wine", aliases["challenger"])
    assert champion.run_id == runs["production"].info.run_id
    assert challenger.run_id == runs[summary["challenger"]].info.run_id
    # the model artifacts sit with the other artifacts, not in the folder the command ran from
    assert not (grid_once.root / "elsewhere" / "mlruns").exists() and (grid_once.root / "artifacts/mlflow").is_dir()
    mlflow.set_tracking_uri(store)
    logged = mlflow.sklearn.load_model("models:/wine-wine@champion")
    assert type(logged).__name__ == "RandomForestClassifier"


@pytest.mark.unit
def test_tracking_set_without_mlflow_installed_names_the_key_and_the_extra(monkeypatch, write_params):
    import builtins

    from wine_assets.tracking import TrackingError, log_variant

    real_import = builtins.__import__

    def without_mlflow(name, *args, **kwargs):  # this machine has the extra; pretend it does not
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mlflow)
    params = load_params(write_params(experiments={"mlflow_tracking_uri": "sqlite:///m.db"}))
    with pytest.raises(
        TrackingError, match=r"experiments.mlflow_tracking_uri = 'sqlite:///m.db'.*wine_assets\[mlflow\]"
    ):
        log_variant(params, None, None)
    assert log_variant(load_params(write_params(name="off.yaml")), None, None) is None


@pytest.mark.component
def test_partitions_come_from_the_params(write_params):
    from wine_assets.pipeline.experiments import build_definitions

    params = load_params(
        write_params(
            experiments={
                "datasets": {"wine": "builtin", "other": "other.csv"},
                "variants": {"stump": {"family": "decision_tree", "max_depth": 1}},
            }
        )
    )
    definitions = build_definitions(params)
    graph = definitions.resolve_asset_graph()
    grid = graph.get(SCORES).partitions_def
    assert set(grid.get_partition_keys()) == {
        "wine|production",
        "wine|stump",
        "other|production",
        "other|stump",
    }
    datasets = graph.get(DECISION).partitions_def
    assert set(datasets.get_partition_keys()) == {"wine", "other"}
    # the blocking checks are partitioned like their asset: a failing dataset stops only itself
    specs = {spec.name: spec for checks in definitions.asset_checks for spec in checks.check_specs}
    for name in ("schema", "no_missing_values", "value_ranges", "sample_size", "challenger_won"):
        assert specs[name].blocking and specs[name].partitions_def == datasets
    assert {job.name for job in definitions.jobs} == {
        "experiment_datasets_job",
        "experiment_variants_job",
        "experiment_decision_job",
        "challenger_release_job",
    }


@pytest.mark.integration
def test_the_workspace_loads_both_locations_and_bad_params_are_named(tmp_path, write_params, dagster_home):
    env = cli_env(dagster_home, write_params())
    completed = run_program("dagster", "definitions", "validate", "-w", "workspace.yaml", env=env, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = completed.stdout + completed.stderr
    assert "wine_assets_experiments" in output and "All code locations passed" in output
    bad = write_params(name="bad.yaml", experiments={"variants": {"et": {"family": "extra_trees", "n_estimators": 0}}})
    validate = ["definitions", "validate", "-m", "wine_assets.experiments_definitions"]
    completed = run_program("dagster", *validate, env=cli_env(dagster_home, bad), cwd=tmp_path)
    assert completed.returncode != 0
    assert "bad.yaml: experiments.variants.et: The 'n_estimators' parameter" in completed.stdout + completed.stderr


def _scores(variant: str, folds: int = 5, seed: int = 1) -> VariantScores:
    return VariantScores(
        dataset="wine",
        variant=variant,
        family="random_forest",
        hyperparameters={},
        folds=folds,
        repeats=1,
        seed=seed,
        fold_scores=[0.9] * folds,
        mean=0.9,
        interval=(0.85, 0.95),
        n_train=100,
        n_test=25,
        fit_seconds=0.1,
        holdout_metrics={"accuracy": 0.9},
        model_bytes=10,
    )


@pytest.mark.unit
def test_partitions_scored_on_other_folds_are_not_compared(write_params):
    params = load_params(write_params())
    with pytest.raises(
        ValueError, match=r"scored on different folds: production \(5x1, seed 1\), other \(5x1, seed 2\)"
    ):
        decision_for([_scores("production"), _scores("other", seed=2)], params)
    with pytest.raises(ValueError, match="no scores for 'production'"):
        decision_for([_scores("other")], params)


@pytest.mark.unit
def test_release_refuses_a_kept_champion_and_a_decision_that_is_out_of_date(tmp_path, write_params):
    params = load_params(write_params(experiments={"variants": {"other": {"family": "decision_tree"}}}))
    frame = load_builtin_frame()
    kept = {"dataset": "wine", "champion": "production", "winner": "production"}
    with pytest.raises(ReleaseError, match="keeps production: there is no challenger to release"):
        release_challenger(kept, frame, params)
    declared = {
        name: {"family": v.family, "hyperparameters": v.hyperparameters} for name, v in variants_of(params).items()
    }
    folder = tmp_path / "artifacts/experiments/wine/other"
    folder.mkdir(parents=True)
    (folder / "model.skops").write_bytes(b"written after the decision")
    won = {
        "dataset": "wine",
        "champion": "production",
        "winner": "other",
        "variants": declared,
        "files": {"other": {"model.skops": "0" * 64, "scaler.skops": "0" * 64}},
        "train_digest": "",
        "test_digest": "",
    }
    with pytest.raises(
        ReleaseError, match="is not the file the decision on 'wine' judged .* changed after the decision"
    ):
        release_challenger(won, frame, params)
    # the params' variants moved on since the decision: refused before any file is read
    other = load_params(write_params(name="other.yaml", experiments={"variants": {"other": {"family": "extra_trees"}}}))
    with pytest.raises(ReleaseError, match=r"not the ones the decision on 'wine' compared \(changed: other\)"):
        release_challenger(won, frame, other)
    assert not (tmp_path / "registry").exists()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ({"family": "extra_trees", "n_estimator": 3}, "ExtraTreesClassifier has no hyperparameter 'n_estimator'"),
        (
            {"family": "extra_trees", "n_estimators": 0},
            "The 'n_estimators' parameter of ExtraTreesClassifier must be an int in the range [1, inf). Got 0",
        ),
        ({"family": "extra_trees", "n_estimators": True}, "n_estimators = True: a flag where"),
        (
            {"family": "logistic_regression", "penalty": "l1"},
            "fails a trial fit on 30 rows: Solver lbfgs supports only",
        ),
        ({"family": "gradient_boosting", "loss": "exponential"}, "only suitable for a binary classification"),
        ({"family": "decision_tree", "class_weight": {5: 1.0}}, "fails a trial fit on 30 rows"),
    ],
)
def test_variants_scikit_learn_refuses_fail_before_any_partition(write_params, variant, expected):
    params = load_params(write_params(experiments={"variants": {"bad": variant, "fine": {"family": "decision_tree"}}}))
    with pytest.raises(ParamsError) as raised:
        check_variants(params)
    lines = str(raised.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{params.origin}: experiments.variants.bad: ")
    assert expected in lines[0]


@pytest.mark.integration
def test_loading_params_with_variants_does_not_import_scikit_learn(write_params, tmp_path):
    """`wine-assets summary` and friends read the params; scikit-learn costs them a second."""
    path = write_params(experiments={"variants": {"et": {"family": "extra_trees"}}})
    code = f"import sys; import wine_assets.params as p; p.load_params({str(path)!r}); print('sklearn' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert completed.stdout.strip() == "False", completed.stderr


@pytest.mark.component
def test_experiment_commands_refuse_clearly_and_run_nothing(tmp_path, write_params, dagster_home, wine_assets_cli):
    params_file = write_params(model={"n_estimators": 30}, experiments={"folds": 5, "repeats": 1, "variants": {}})
    env = cli_env(dagster_home, params_file)
    outcomes = {
        "show before any run": (
            wine_assets_cli("experiment", "show", env=env, cwd=tmp_path),
            1,
            "no decision for dataset 'wine' yet",
        ),
        "release before any decision": (
            wine_assets_cli("experiment", "release", "--dataset", "wine", env=env, cwd=tmp_path),
            2,
            "no champion_decision for dataset 'wine' in this DAGSTER_HOME yet",
        ),
        "unknown dataset": (
            wine_assets_cli("experiment", "run", "--dataset", "nope", env=env, cwd=tmp_path),
            2,
            "no dataset 'nope' in experiments.datasets",
        ),
        "no instance folder": (
            wine_assets_cli("experiment", "run", env={**env, "DAGSTER_HOME": str(tmp_path / "missing")}, cwd=tmp_path),
            2,
            "missing is not a folder",
        ),
    }
    bad = write_params(
        name="bad.yaml", experiments={"variants": {"lr": {"family": "logistic_regression", "penalty": "l1"}}}
    )
    outcomes["a variant scikit-learn refuses"] = (
        wine_assets_cli("--params", str(bad), "experiment", "run", env=env, cwd=tmp_path),
        2,
        "bad.yaml: experiments.variants.lr: logistic_regression fails a trial fit on 30 rows",
    )
    # --params wins over a broken ./params.yaml of the folder the command runs in
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "params.yaml").write_text("experiments: {folds: 1}\n")
    without = {key: value for key, value in env.items() if key != "WINE_ASSETS_PARAMS"}
    outcomes["--params over ./params.yaml"] = (
        wine_assets_cli(
            "--params", str(params_file), "experiment", "release", "--dataset", "wine", env=without, cwd=elsewhere
        ),
        2,
        "no champion_decision for dataset 'wine'",
    )
    for case, (completed, code, message) in outcomes.items():
        assert completed.returncode == code, (case, completed.stderr[-2000:])
        assert message in completed.stderr, (case, completed.stderr[-2000:])
        assert "Traceback" not in completed.stderr, case
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.get_runs() == []
