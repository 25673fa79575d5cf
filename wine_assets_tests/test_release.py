"""The release stage as plain functions: artifact identity, the simulated production check, the manifest."""

import dataclasses
import subprocess

import pandas as pd
import pytest

from wine_assets import model_format
from wine_assets.evaluation import evaluate
from wine_assets.features import fit_scaler, frame_digest, split_frame
from wine_assets.files import sha256_bytes, write_bytes_atomic
from wine_assets.params import EvaluationParams, load_params
from wine_assets.registry import ModelRegistry
from wine_assets.release import ReleaseError, manifest_fields, read_evaluated_artifacts, release
from wine_assets.training import train_model
from wine_assets.validation import FEATURE_COLUMNS

from .support import tree_snapshot


@pytest.fixture
def trained(write_params, wine_frame):
    """A params file, its artifacts written as the pipeline writes them, and what was evaluated."""
    params = load_params(write_params(model={"n_estimators": 10}))
    frame = wine_frame.copy()
    frame.attrs = {"source": "builtin", "fingerprint": "f" * 64}
    train, test = split_frame(frame, 0.2, 42)
    scaler = fit_scaler(train)
    model = train_model(train, scaler, params.model).model
    files = {"model.skops": model_format.dumps(model), "scaler.skops": model_format.dumps(scaler)}
    for name, content in files.items():
        write_bytes_atomic(params.artifacts_dir / name, content)
    evaluated = {name: sha256_bytes(content) for name, content in files.items()}
    evaluated.update(train_set=frame_digest(train), test_set=frame_digest(test))
    return params, evaluate(model, scaler, train, test), train, test, evaluated


@pytest.mark.unit
def test_release_publishes_the_evaluated_files(trained):
    params, metrics, train, test, evaluated = trained
    result = release(evaluated, metrics, train, test, params, run_id="run-1")
    assert result.created and result.version == 1 and result.production == 1
    manifest = result.manifest
    for name in ("model.skops", "scaler.skops"):
        assert manifest["files"][name]["sha256"] == evaluated[name]
    assert manifest["dagster_run_id"] == "run-1"
    assert manifest["data_fingerprint"] == "f" * 64
    assert manifest["feature_names"][0] == "alcohol" and len(manifest["feature_names"]) == 13
    assert manifest["class_labels"] == ["class_0", "class_1", "class_2"]
    assert manifest["metrics"]["accuracy"] == metrics["accuracy"]
    stored_params = (result.path / "params.yaml").read_text()
    assert "n_estimators: 10" in stored_params
    reference = pd.read_csv(result.path / "reference.csv")
    assert list(reference.columns) == list(FEATURE_COLUMNS) and len(reference) == len(train)


@pytest.mark.unit
def test_a_bundle_that_scores_differently_is_discarded(trained):
    params, metrics, train, test, evaluated = trained
    registry = ModelRegistry(params.registry_dir)
    earlier = train_model(train, fit_scaler(train), params.model.model_copy(update={"n_estimators": 3})).model
    registry.publish(
        {"model.skops": model_format.dumps(earlier), "scaler.skops": model_format.dumps(fit_scaler(train))}, {}
    )
    before = tree_snapshot(params.registry_dir)
    # judged against production first (any verdict passes here), then the loaded-back bundle is re-scored
    lenient = dataclasses.replace(
        params, evaluation=EvaluationParams(min_accuracy=0.0, max_regression=1.0, alpha=1e-12)
    )
    claimed = dict(metrics, accuracy=metrics["accuracy"] - 0.25)
    with pytest.raises(ReleaseError, match="scores .* not the evaluated .*production was not moved"):
        release(evaluated, claimed, train, test, lenient)
    assert tree_snapshot(params.registry_dir) == before
    assert registry.versions() == [1] and registry.production_version() == 1


@pytest.mark.unit
def test_a_model_below_the_gate_is_refused_whatever_runs_the_release(trained):
    params, metrics, train, test, evaluated = trained
    with pytest.raises(ReleaseError, match=r"test accuracy 0\.5000 fails the gate .*nothing was published"):
        release(evaluated, dict(metrics, accuracy=0.5), train, test, params)
    assert not params.registry_dir.exists()


@pytest.mark.unit
def test_train_and_test_rows_must_be_the_evaluated_ones(trained, wine_frame):
    params, metrics, train, test, evaluated = trained
    _, other_test = split_frame(wine_frame, 0.5, 7)
    with pytest.raises(ReleaseError, match="the stored test_set is not the one evaluation_metrics used"):
        release(evaluated, metrics, train, other_test, params)
    with pytest.raises(ReleaseError, match="no record of which train_set"):
        release(dict(evaluated, train_set=None), metrics, train, test, params)
    assert not params.registry_dir.exists()


@pytest.mark.unit
def test_artifacts_must_be_the_evaluated_ones(trained):
    params, _, _, _, evaluated = trained
    with pytest.raises(ReleaseError, match="no record of which model.skops"):
        read_evaluated_artifacts(params.artifacts_dir, {"model.skops": None, "scaler.skops": "x"})
    with pytest.raises(ReleaseError, match=r"scaler\.skops \(sha256 .*\) is not the file evaluation_metrics scored"):
        read_evaluated_artifacts(params.artifacts_dir, dict(evaluated, **{"scaler.skops": "0" * 64}))
    (params.artifacts_dir / "model.skops").unlink()
    with pytest.raises(ReleaseError, match=r"model\.skops is missing: run training_job"):
        read_evaluated_artifacts(params.artifacts_dir, evaluated)
    assert not params.registry_dir.exists()


@pytest.mark.integration
def test_manifest_records_the_git_commit_when_there_is_one(trained, tmp_path):
    params, metrics, _, _, _ = trained
    assert manifest_fields(metrics, params, None)["git_commit"] is None
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert manifest_fields(metrics, params, None)["git_commit"] == head.strip()
