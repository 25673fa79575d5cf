"""Shared fixtures: params files, CSV sources and Dagster instances in temporary folders."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from wine_assets.ingestion import load_builtin_frame

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ALL_ASSETS = {
    "raw_wine",
    "validated_wine",
    "train_set",
    "test_set",
    "scaler",
    "wine_model",
    "evaluation_metrics",
    "confusion_matrix_plot",
    "feature_importance_plot",
    "model_deployment",
}


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the repository's params.yaml or a developer's DAGSTER_HOME by accident."""
    monkeypatch.delenv("WINE_ASSETS_PARAMS", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def wine_frame() -> pd.DataFrame:
    return load_builtin_frame()


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[..., Path]:
    """Write a params file into tmp_path; keyword sections are merged over the defaults."""

    def write(name: str = "params.yaml", **sections: dict[str, Any]) -> Path:
        document: dict[str, Any] = {
            "paths": {"artifacts_dir": "artifacts", "registry_dir": "registry"},
        }
        for section, values in sections.items():
            document.setdefault(section, {}).update(values)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(document), encoding="utf-8")
        return path

    return write


@pytest.fixture
def write_csv(tmp_path: Path, wine_frame: pd.DataFrame) -> Callable[..., Path]:
    """Write the wine data (optionally changed by ``edit``) as a CSV source in tmp_path."""

    def write(name: str = "wine.csv", edit: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> Path:
        frame = wine_frame.copy()
        if edit is not None:
            frame = edit(frame)
        path = tmp_path / name
        frame.to_csv(path, index=False)
        return path

    return write


def shuffled_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Valid schema, meaningless labels: a model trained on them cannot pass the 80% gate."""
    frame = frame.copy()
    frame["target"] = np.random.default_rng(7).permutation(frame["target"].to_numpy())
    return frame


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its sha256: equal snapshots mean byte-for-byte equal trees."""
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def make_dagster_home(home: Path) -> Path:
    """A persistent Dagster instance folder with telemetry off, for CLI runs."""
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    return home


@pytest.fixture
def dagster_home(tmp_path: Path) -> Iterator[Path]:
    yield make_dagster_home(tmp_path / "dagster_home")


def cli_env(dagster_home: Path, params_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DAGSTER_HOME=str(dagster_home),
        WINE_ASSETS_PARAMS=str(params_file),
        PYTHONWARNINGS="ignore",
    )
    return env


@dataclass(frozen=True)
class Materialized:
    """A folder after one real `dagster asset materialize --select '*'`: params.yaml, artifacts/,
    registry/ and the Dagster instance in dagster_home/."""

    root: Path
    env: dict[str, str]
    completed: subprocess.CompletedProcess


def _prepare(root: Path) -> tuple[Path, Path]:
    home = make_dagster_home(root / "dagster_home")
    params = root / "params.yaml"
    params.write_text("paths: {artifacts_dir: artifacts, registry_dir: registry}\n", encoding="utf-8")
    return home, params


@pytest.fixture(scope="session")
def cli_materialized_once(tmp_path_factory: pytest.TempPathFactory) -> Materialized:
    """The whole graph materialized once per test session by the real CLI, for tests to copy.

    Under pytest-xdist each worker has a session of its own: the first to get here materializes
    into a folder that all the run's workers share, the others wait on its lock and reuse it.
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / "materialized"
    with open(shared / "materialized.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not (root / "materialize.json").is_file():
            root.mkdir(exist_ok=True)
            home, params = _prepare(root)
            completed = subprocess.run(
                [str(BIN / "dagster"), "asset", "materialize", "-m", "wine_assets", "--select", "*"],
                env=cli_env(home, params),
                cwd=root,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert completed.returncode == 0, completed.stderr[-3000:]
            record = {"args": completed.args, "stdout": completed.stdout, "stderr": completed.stderr}
            (root / "materialize.json").write_text(json.dumps(record), encoding="utf-8")
    record = json.loads((root / "materialize.json").read_text(encoding="utf-8"))
    completed = subprocess.CompletedProcess(record["args"], 0, record["stdout"], record["stderr"])
    return Materialized(root, cli_env(root / "dagster_home", root / "params.yaml"), completed)


@pytest.fixture
def cli_materialized(cli_materialized_once: Materialized, tmp_path: Path) -> Materialized:
    """A private copy of that folder in tmp_path (relative paths in params.yaml follow the copy)."""
    shutil.copytree(
        cli_materialized_once.root, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("materialize.json")
    )
    return Materialized(
        tmp_path, cli_env(tmp_path / "dagster_home", tmp_path / "params.yaml"), cli_materialized_once.completed
    )
