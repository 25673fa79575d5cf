"""Production never goes back to a worse model: real Dagster runs (in-process) of the trials the
release rules exist for, on real files and a real registry.

1. an experiment's winner is promoted, then the next ordinary run must not undo it;
2. rotated labels must stop at a blocking check before training;
3. a slightly (not significantly) worse model is released; a better one is released.
"""

import dagster as dg
import pytest
import yaml
from sklearn.linear_model import LogisticRegression

from benchmarks.synthetic import linear_frame
from wine_assets import model_format
from wine_assets.definitions import ASSET_CHECKS, ASSETS
from wine_assets.features import features_of, fit_scaler, split_frame
from wine_assets.ingestion import load_builtin_frame
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.registry import ModelRegistry
from wine_assets.training import build_estimator

from .support import tree_snapshot

pytestmark = pytest.mark.component

LOGISTIC = {"family": "logistic_regression", "C": 1.0, "max_iter": 1000}


def materialize(params_file, home):
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        return dg.materialize(
            [*ASSETS, *ASSET_CHECKS],
            instance=instance,
            resources={"params": WineParamsResource(params_file=str(params_file))},
            raise_on_error=False,
        )


def checks(result):
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def linear_params(folder, model=None):
    """A params file on the linear data (a forest passes the gate there; logistic regression is far
    better), with one experiment: the forest against logistic regression."""
    linear_frame(1500).to_csv(folder / "linear.csv", index=False)
    document = {
        "data": {"source": "linear.csv"},
        "model": model or {"family": "random_forest", "n_estimators": 100, "random_state": 42},
        "paths": {"artifacts_dir": "artifacts", "registry_dir": "registry"},
        "experiments": {
            "datasets": {"linear": "linear.csv"},
            "variants": {"logistic_regression": LOGISTIC},
            "folds": 3,
            "repeats": 1,
        },
    }
    path = folder / "params.yaml"
    path.write_text(
        "# the team's params: this comment survives a release\n" + yaml.safe_dump(document, sort_keys=False)
    )
    return path


def test_a_promoted_winner_is_not_undone_by_the_next_ordinary_run(tmp_path, dagster_home, wine_assets_cli):
    params_file = linear_params(tmp_path)
    first = materialize(params_file, tmp_path / "instance-1")
    assert first.success
    registry = ModelRegistry(tmp_path / "registry")
    assert registry.production_version() == 1
    forest_accuracy = registry.manifest(1)["metrics"]["accuracy"]
    assert 0.80 <= forest_accuracy < 0.90  # passes the gate, yet weak on this data
    assert registry.evaluation_set()[1]["source"] == "the test set of v1"

    env = {"DAGSTER_HOME": str(dagster_home), "WINE_ASSETS_PARAMS": str(params_file)}
    grid = wine_assets_cli("experiment", "run", env=env, cwd=tmp_path)
    assert grid.returncode == 0, grid.stderr
    before = params_file.read_text()
    plan = wine_assets_cli("experiment", "release", "--dataset", "linear", "--dry-run", env=env, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "+  family: logistic_regression" in plan.stdout and "-  n_estimators: 100" in plan.stdout
    assert "nothing was changed" in plan.stdout
    assert params_file.read_text() == before and registry.production_version() == 1

    released = wine_assets_cli("experiment", "release", "--dataset", "linear", env=env, cwd=tmp_path)
    assert released.returncode == 0, released.stderr
    assert registry.production_version() == 2
    assert "+  family: logistic_regression" in released.stdout  # the diff is printed
    manifest = registry.manifest(2)
    assert "+  family: logistic_regression" in manifest["params_change"]["diff"]
    assert manifest["challenge"]["passed"] and manifest["challenge"]["production_version"] == 1
    assert manifest["metrics"]["accuracy"] > forest_accuracy + 0.1
    written = params_file.read_text()
    assert written.startswith("# the team's params: this comment survives a release\n")
    assert yaml.safe_load(written)["model"] == {"family": "logistic_regression", "C": 1.0, "max_iter": 1000}

    # The next ordinary run (what the next push to main runs) trains what production is.
    again = materialize(params_file, tmp_path / "instance-2")
    assert again.success
    assert checks(again)["not_worse_than_production"].passed
    assert registry.production_version() == 2
    assert isinstance(registry.load().model, LogisticRegression)

    # A run that trains the forest again (the bytes of v1) is refused: production does not go back.
    snapshot = tree_snapshot(tmp_path / "registry")
    forest = linear_params(tmp_path)
    back = materialize(forest, tmp_path / "instance-3")
    assert not back.success
    refused = checks(back)["not_worse_than_production"]
    assert not refused.passed and refused.metadata["production_version"].value == "v2"
    assert refused.metadata["evaluation_set/candidate_accuracy"].value == pytest.approx(forest_accuracy)
    assert "model_deployment" not in {event.asset_key.path[-1] for event in back.get_asset_materialization_events()}
    assert tree_snapshot(tmp_path / "registry") == snapshot

    # The history says every move: v1 published, v2 by the experiment's release.
    moves = [event for event in registry.history() if event["action"] == "production"]
    assert [(event["from"], event["to"]) for event in moves] == [(None, 1), (1, 2)]
    assert moves[1]["by"] == "experiment release (linear: logistic_regression)"


def test_rotated_labels_stop_before_training_and_production_is_unchanged(tmp_path, write_params, write_csv):
    good = materialize(write_params(), tmp_path / "instance-1")
    assert good.success
    registry = ModelRegistry(tmp_path / "registry")
    snapshot = tree_snapshot(tmp_path / "registry")

    def rotate(frame):
        frame["target"] = (frame["target"] + 1) % 3  # class 0 -> 1 -> 2 -> 0
        return frame

    rotated = materialize(write_params(data={"source": write_csv("rotated.csv", edit=rotate).name}), tmp_path / "i2")
    assert not rotated.success
    labels = checks(rotated)["labels_agree_with_production"]
    assert not labels.passed
    assert labels.metadata["production_version"].value == "v1"
    assert labels.metadata["disagreeing_rows"].value == 178  # every row: the trusted model knows them all
    pairs = {
        (row.data["label"], row.data["production_predicts"]) for row in labels.metadata["disagreements"].value.records
    }
    assert pairs == {("class_1", "class_0"), ("class_2", "class_1"), ("class_0", "class_2")}
    assert "labelled class_1 where production predicts class_0" in labels.description
    produced = {event.asset_key.path[-1] for event in rotated.get_asset_materialization_events()}
    assert produced == {"raw_wine", "validated_wine"}
    assert tree_snapshot(tmp_path / "registry") == snapshot
    assert registry.production_version() == 1


def test_a_slightly_worse_model_is_released_and_so_is_a_better_one(tmp_path):
    # v1: the forest on the linear data. Logistic regression is far better: it passes the challenge.
    assert materialize(linear_params(tmp_path), tmp_path / "instance-1").success
    registry = ModelRegistry(tmp_path / "registry")
    better = materialize(linear_params(tmp_path, model=LOGISTIC), tmp_path / "instance-2")
    assert better.success
    verdict = checks(better)["not_worse_than_production"]
    assert verdict.passed and verdict.metadata["verdict"].value == "passes"
    assert (
        verdict.metadata["test_set/candidate_accuracy"].value > verdict.metadata["test_set/production_accuracy"].value
    )
    assert registry.production_version() == 2

    # C = 0.05 gets one more of the 300 test rows wrong than C = 1: not significant, within 0.02.
    slightly = materialize(linear_params(tmp_path, model={**LOGISTIC, "C": 0.05}), tmp_path / "instance-3")
    assert slightly.success
    verdict = checks(slightly)["not_worse_than_production"]
    assert verdict.passed
    change = (
        verdict.metadata["test_set/candidate_accuracy"].value - verdict.metadata["test_set/production_accuracy"].value
    )
    assert -0.02 <= change < 0
    assert verdict.metadata["test_set/p_value"].value > 0.05
    assert registry.production_version() == 3
    assert registry.manifest(3)["challenge"]["comparisons"][0]["verdict"] == "not worse"


def test_rollback_is_the_recorded_override_and_import_is_judged(tmp_path, write_params, write_csv, wine_assets_cli):
    params_file = write_params()
    assert materialize(params_file, tmp_path / "instance-1").success
    registry = ModelRegistry(tmp_path / "registry")
    # a weak model published beside production (as a candidate would be), never judged
    frame = load_builtin_frame()
    train, _ = split_frame(frame, 0.2, 42)
    scaler = fit_scaler(train)
    stump = build_estimator("decision_tree", {"max_depth": 1, "random_state": 0})
    stump.fit(scaler.transform(features_of(train)), train["target"])
    registry.publish(
        {"model.skops": model_format.dumps(stump), "scaler.skops": model_format.dumps(scaler)}, {}, set_production=False
    )
    env = {"WINE_ASSETS_PARAMS": str(params_file)}

    # import --production of the worse bundle is refused, and the registry stays as it was
    assert wine_assets_cli("registry", "export", "2", "--output", tmp_path / "v2.tar.gz", env=env).returncode == 0
    snapshot = tree_snapshot(tmp_path / "registry")
    imported = wine_assets_cli("registry", "import", tmp_path / "v2.tar.gz", "--production", env=env)
    assert imported.returncode == 1
    assert "not imported: v2 is refused against production v1" in imported.stderr
    assert "significantly worse on the evaluation set" in imported.stderr
    assert "registry rollback 2 --reason" in imported.stderr
    assert tree_snapshot(tmp_path / "registry") == snapshot

    # rollback is allowed, says the version is worse, and records the verdict and the reason
    rolled = wine_assets_cli("registry", "rollback", "2", "--reason", "checking the stump", env=env)
    assert rolled.returncode == 0, rolled.stderr
    assert "warning: v2 is refused against production v1" in rolled.stdout
    assert "production moved from v1 to v2 (recorded)" in rolled.stdout
    last = registry.history()[-1]
    assert (last["from"], last["to"], last["by"], last["reason"]) == (1, 2, "registry rollback", "checking the stump")
    assert last["challenge"]["passed"] is False
    back = wine_assets_cli("registry", "rollback", "1", env=env)
    assert back.returncode == 0 and "not worse than production v2" in back.stdout
    history = wine_assets_cli("registry", "history", env=env)
    assert history.returncode == 0
    lines = history.stdout.splitlines()
    assert lines[0].split() == ["at", "action", "from", "to", "by", "verdict", "reason"]
    assert lines[1].split()[1:5] == ["production", "none", "v1", "publish"]
    assert "evaluation-set" in lines[2] and "seeded by the first release" in lines[2]
    assert lines[-2].split()[1:] == [
        "production",
        "v1",
        "v2",
        "registry",
        "rollback",
        "worse",
        "checking",
        "the",
        "stump",
    ]

    # the evaluation set changes only by an explicit, recorded, validated command
    shown = wine_assets_cli("registry", "evaluation-set", "show", env=env)
    assert shown.returncode == 0 and "the test set of v1" in shown.stdout and "rows     36" in shown.stdout
    bad = write_csv("bad.csv", edit=lambda rows: rows.drop(columns=["proline"]))
    refused = wine_assets_cli("registry", "evaluation-set", "replace", bad, "--reason", "new rows", env=env)
    assert refused.returncode == 2 and str(bad) in refused.stderr and "proline" in refused.stderr
    assert registry.evaluation_set()[1]["rows"] == 36
    whole = write_csv("whole.csv")
    replaced = wine_assets_cli("registry", "evaluation-set", "replace", whole, "--reason", "all rows", env=env)
    assert replaced.returncode == 0, replaced.stderr
    assert registry.evaluation_set()[1]["rows"] == 178
    assert registry.history()[-1]["reason"] == "all rows"
