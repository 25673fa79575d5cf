"""Shared fixtures: params files, CSV sources and Dagster instances in temporary folders."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from wine_assets import services
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


# -- real servers for the scale-out tests (wine_assets.services, the code behind `make services`) --
SERVICES_DIR_ENV = "WINE_ASSETS_TEST_SERVICES_DIR"
REQUIRE_SERVICES_ENV = "WINE_ASSETS_REQUIRE_SERVICES"


def pytest_configure(config: pytest.Config) -> None:
    """The controlling pytest process (not an xdist worker) owns one folder for the servers that
    every worker shares; it stops them in pytest_unconfigure, after the last worker is done."""
    if not hasattr(config, "workerinput") and SERVICES_DIR_ENV not in os.environ:
        root = tempfile.mkdtemp(prefix="wine-assets-services-")
        os.chmod(root, 0o755)  # as root, PostgreSQL runs as the postgres user, who must reach its folder
        os.environ[SERVICES_DIR_ENV] = root
        config.stash[_SERVICES_OWNER] = os.environ[SERVICES_DIR_ENV]


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(_SERVICES_OWNER, None)
    if root:
        services.purge(Path(root) / "state", Path(root) / "services.env")
        shutil.rmtree(root, ignore_errors=True)
        os.environ.pop(SERVICES_DIR_ENV, None)


_SERVICES_OWNER = pytest.StashKey[str]()


def _missing_servers() -> list[str]:
    missing = [] if shutil.which("redis-server") else ["redis-server"]
    if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")) and not shutil.which("postgres"):
        missing.append("postgresql")
    return missing


@pytest.fixture(scope="session")
def services_env() -> dict[str, str]:
    """PostgreSQL, Redis and a two-worker Dask cluster, started once for the whole test run by the
    first worker that asks (under a file lock), reused by the others, stopped by the controller."""
    missing = _missing_servers()
    if missing:
        message = f"needs {', '.join(missing)} (apt-get install {' '.join(missing)}; .ci/run installs them)"
        if os.environ.get(REQUIRE_SERVICES_ENV):
            pytest.fail(message)
        pytest.skip(message)
    root = Path(os.environ[SERVICES_DIR_ENV])
    with open(root / "services.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        return services.up(root / "state", root / "services.env", timeout=120)


def xdist_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0)


@pytest.fixture(scope="session")
def scaleout_env(services_env: dict[str, str]) -> dict[str, str]:
    """The servers' variables for this xdist worker: a PostgreSQL database and a Redis database of its
    own (tests on one worker run one after another; workers never share a queue or run history)."""
    index = xdist_index()
    database = f"wine_assets_gw{index}"
    services.create_database(
        services_env["DAGSTER_PG_HOST"],
        int(services_env["DAGSTER_PG_PORT"]),
        services_env["DAGSTER_PG_PASSWORD"],
        database,
    )
    redis = services_env["WINE_ASSETS_CELERY_BROKER"].rsplit("/", 1)[0]
    return {
        **services_env,
        "DAGSTER_PG_DB": database,
        "WINE_ASSETS_CELERY_BROKER": f"{redis}/{2 + 2 * index}",  # redis-server runs with 256 databases
        "WINE_ASSETS_CELERY_BACKEND": f"{redis}/{2 + 2 * index}",
    }


def pg_rows(env: dict[str, str], sql: str, args: tuple = ()) -> list[tuple]:
    """The rows of one query on the PostgreSQL database that env's DAGSTER_PG_* variables name."""
    import psycopg2

    connection = psycopg2.connect(
        host=env["DAGSTER_PG_HOST"],
        port=int(env["DAGSTER_PG_PORT"]),
        user=env["DAGSTER_PG_USER"],
        password=env["DAGSTER_PG_PASSWORD"],
        dbname=env["DAGSTER_PG_DB"],
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, args)
            return cursor.fetchall()
    finally:
        connection.close()


def make_postgres_home(home: Path) -> Path:
    """A DAGSTER_HOME whose dagster.yaml is deploy/dagster-postgres.yaml, as `make run INSTANCE=postgres`."""
    home.mkdir(exist_ok=True)
    shutil.copy(REPO_ROOT / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    return home


def start_in_group(
    argv: list[str], log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """A long-running command in a process group of its own (see stop_group), output to log."""
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(process: subprocess.Popen, grace: float = 30) -> None:
    """Stop a process started with start_new_session=True and everything in its group."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            # The leader is gone; make sure no member of its group outlives it.
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class CeleryWorker:
    process: subprocess.Popen
    folder: Path
    log: Path
    env: dict[str, str]

    def pool_pids(self) -> set[int]:
        return services.group_members(self.process.pid) - {self.process.pid}


def start_celery_worker(folder: Path, env: dict[str, str], concurrency: int = 2, timeout: float = 90) -> CeleryWorker:
    """`make worker`'s command, started in `folder` (not the project), ready when it says so."""
    process = services.start_celery_worker(folder, env, concurrency, timeout)
    return CeleryWorker(process, folder, folder / "worker.log", env)


def fresh_database(env: dict[str, str], name: str) -> dict[str, str]:
    """env with DAGSTER_PG_DB set to a database of its own (an empty run history), created if need be."""
    services.create_database(env["DAGSTER_PG_HOST"], int(env["DAGSTER_PG_PORT"]), env["DAGSTER_PG_PASSWORD"], name)
    return {**env, "DAGSTER_PG_DB": name}


def scaleout_cli_env(base: dict[str, str], home: Path, params_file: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(base)
    env.update(DAGSTER_HOME=str(home), PYTHONWARNINGS="ignore")
    env.pop("WINE_ASSETS_PARAMS", None)
    if params_file is not None:
        env["WINE_ASSETS_PARAMS"] = str(params_file)
    return env


@pytest.fixture(scope="session")
def celery_worker(scaleout_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    """One Celery worker per xdist worker, on that worker's own queue, started in a folder with a
    params.yaml of its own that no run must read (it names other folders and a 1-tree forest)."""
    folder = tmp_path_factory.mktemp("celery_worker")
    (folder / "params.yaml").write_text(
        "model: {n_estimators: 1}\npaths: {artifacts_dir: worker_artifacts, registry_dir: worker_registry}\n"
    )
    env = scaleout_cli_env(scaleout_env, make_postgres_home(folder / "dagster_home"))
    worker = start_celery_worker(folder, env)
    try:
        yield worker
    finally:
        stop_group(worker.process)
