"""Fixtures: params files, CSV sources, Dagster instances in temporary folders, the real runs and
servers that tests share, and the tiers every test belongs to (README "Tests").

Helpers that are not fixtures live in support.py.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from wine_assets import services, signing
from wine_assets.ingestion import load_builtin_frame

from .serving_support import Versions, train_versions, wine_features
from .support import (
    BIN,
    CeleryWorker,
    InProcessCli,
    build_once,
    cli_env,
    copy_folder,
    fresh_database,
    make_dagster_home,
    make_postgres_home,
    require_programs,
    scaleout_cli_env,
    start_celery_worker,
    stop_group,
    xdist_index,
)

# -- tiers ----------------------------------------------------------------------------------------
TIERS = {
    "unit": "plain calls of pure functions; no Dagster run, no process, no server",
    "component": "Dagster in-process, `cli.main([...])` in-process, the HTTP app in-process",
    "integration": "real processes (CLIs, servers, workers), each started once and shared",
    "e2e": "one `dagster dev` (webserver and daemon) driven through its GraphQL API",
}


def pytest_configure(config: pytest.Config) -> None:
    for tier, what in TIERS.items():
        config.addinivalue_line("markers", f"{tier}: {what}")
    _own_the_services_folder(config)
    _own_the_signing_key(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test is in exactly one tier, so that `-m` selects each tier completely.

    `item.nodeid` is read only for the error message: pytest 9.2 caches it on first read, and
    xdist's loadgroup appends the `@group` suffix to it after this hook (reading it here first
    silently ungroups every xdist_group, pytest-xdist issue 1386)."""
    wrong = []
    for item in items:
        tiers = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
        if len(tiers) != 1:
            wrong.append((item, sorted(tiers)))
    if wrong:
        wrong = [f"{item.nodeid}: {tiers or 'no tier'}" for item, tiers in wrong]
        raise pytest.UsageError(
            "each test needs exactly one tier marker (" + ", ".join(TIERS) + "):\n" + "\n".join(wrong)
        )


def pytest_collection_finish(session: pytest.Session) -> None:
    """On an xdist worker under --dist=loadgroup, every test of an xdist_group must carry its
    `@group` id suffix, or its group's shared server starts once per worker without a word."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(
            f"--dist=loadgroup did not group {len(lost)} test(s), e.g. {lost[0]}: this pytest and "
            "pytest-xdist do not agree on test ids (see the pytest pin in pyproject.toml)"
        )


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: Any) -> Iterator[None]:
    """After every other summary (coverage, durations, the short list): one line naming what was
    skipped and why (the programs this machine lacks), just above pytest's closing line."""
    yield
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        parts = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
        terminalreporter.write_line(f"skipped {sum(reasons.values())}: {parts}", yellow=True)


# -- isolation ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the repository's params.yaml or a developer's DAGSTER_HOME by accident."""
    monkeypatch.delenv("WINE_ASSETS_PARAMS", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv(signing.SIGNING_KEY_ENV, raising=False)
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def wine_frame() -> pd.DataFrame:
    return load_builtin_frame()


@pytest.fixture(scope="session")
def wines() -> pd.DataFrame:
    """The wine data with the feature names the serving API uses."""
    return wine_features()


@pytest.fixture(scope="session")
def versions(wines: pd.DataFrame) -> Versions:
    """Bundles ready to publish for the serving tests: the production forest and a small challenger."""
    return train_versions(wines)


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
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
        return path

    return write


@pytest.fixture
def dagster_home(tmp_path: Path) -> Iterator[Path]:
    yield make_dagster_home(tmp_path / "dagster_home")


@pytest.fixture
def wine_assets_cli(monkeypatch: pytest.MonkeyPatch) -> InProcessCli:
    """`wine-assets ...` in-process: ``wine_assets_cli("registry", "show", env=..., cwd=...)``."""
    return InProcessCli(monkeypatch)


# -- work done once per test run and shared by every xdist worker ----------------------------------
@dataclass(frozen=True)
class Materialized:
    """A folder after one real `dagster asset materialize --select '*'`: params.yaml, artifacts/,
    registry/ and the Dagster instance in dagster_home/."""

    root: Path
    env: dict[str, str]
    completed: subprocess.CompletedProcess


def _materialize(root: Path) -> dict[str, Any]:
    home = make_dagster_home(root / "dagster_home")
    params = root / "params.yaml"
    params.write_text("paths: {artifacts_dir: artifacts, registry_dir: registry}\n", encoding="utf-8")
    completed = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "wine_assets", "--select", "*"],
        env=cli_env(home, params),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {"args": completed.args, "stdout": completed.stdout, "stderr": completed.stderr}


@pytest.fixture(scope="session")
def cli_materialized_once(tmp_path_factory: pytest.TempPathFactory) -> Materialized:
    """The whole graph materialized once per test run by the real CLI, for tests to copy."""
    root, record = build_once(tmp_path_factory, "materialized", _materialize)
    completed = subprocess.CompletedProcess(record["args"], 0, record["stdout"], record["stderr"])
    return Materialized(root, cli_env(root / "dagster_home", root / "params.yaml"), completed)


@pytest.fixture
def cli_materialized(cli_materialized_once: Materialized, tmp_path: Path) -> Materialized:
    """A private copy of that folder in tmp_path."""
    copy_folder(cli_materialized_once.root, tmp_path)
    return Materialized(
        tmp_path, cli_env(tmp_path / "dagster_home", tmp_path / "params.yaml"), cli_materialized_once.completed
    )


# -- real servers for the scale-out tests (wine_assets.services, the code behind `make services`) --
SERVICES_DIR_ENV = "WINE_ASSETS_TEST_SERVICES_DIR"
_SERVICES_OWNER = pytest.StashKey[str]()
_KEY_OWNER = pytest.StashKey[str]()


def _own_the_services_folder(config: pytest.Config) -> None:
    """The controlling pytest process (not an xdist worker) owns one folder for the servers that
    every worker shares; it stops them in pytest_unconfigure, after the last worker is done."""
    if not hasattr(config, "workerinput") and SERVICES_DIR_ENV not in os.environ:
        root = tempfile.mkdtemp(prefix="wine-assets-services-")
        os.chmod(root, 0o755)  # as root, PostgreSQL runs as the postgres user, who must reach its folder
        os.environ[SERVICES_DIR_ENV] = root
        config.stash[_SERVICES_OWNER] = root


def _own_the_signing_key(config: pytest.Config) -> None:
    """One Ed25519 signing key for the whole run, made by the controlling process: every worker,
    CLI and server the tests start signs and trusts with it (never the developer's own key)."""
    if not hasattr(config, "workerinput") and signing.SIGNING_KEY_FILE_ENV not in os.environ:
        root = tempfile.mkdtemp(prefix="wine-assets-key-")
        key_file = Path(root) / "signing-key.pem"
        signing.write_private_key(key_file, signing.new_private_key_pem())
        os.environ[signing.SIGNING_KEY_FILE_ENV] = str(key_file)
        config.stash[_KEY_OWNER] = root


def pytest_unconfigure(config: pytest.Config) -> None:
    key_root = config.stash.get(_KEY_OWNER, None)
    if key_root:
        shutil.rmtree(key_root, ignore_errors=True)
        os.environ.pop(signing.SIGNING_KEY_FILE_ENV, None)
    root = config.stash.get(_SERVICES_OWNER, None)
    if root:
        services.purge(Path(root) / "state", Path(root) / "services.env")
        shutil.rmtree(root, ignore_errors=True)
        os.environ.pop(SERVICES_DIR_ENV, None)


@pytest.fixture(scope="session")
def services_env() -> dict[str, str]:
    """PostgreSQL, Redis and a two-worker Dask cluster, started once for the whole test run by the
    first worker that asks (under a file lock), reused by the others, stopped by the controller."""
    require_programs("postgres", "redis-server")
    root = Path(os.environ[SERVICES_DIR_ENV])
    with open(root / "services.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        return services.up(root / "state", root / "services.env", timeout=120)


@pytest.fixture(scope="session")
def scaleout_env(services_env: dict[str, str]) -> dict[str, str]:
    """The servers' variables for this xdist worker: a PostgreSQL database and a Redis database of its
    own (tests on one worker run one after another; workers never share a queue or run history)."""
    index = xdist_index()
    env = fresh_database(services_env, f"wine_assets_gw{index}")
    redis = services_env["WINE_ASSETS_CELERY_BROKER"].rsplit("/", 1)[0]
    return {
        **env,
        "WINE_ASSETS_CELERY_BROKER": f"{redis}/{2 + 2 * index}",  # redis-server runs with 256 databases
        "WINE_ASSETS_CELERY_BACKEND": f"{redis}/{2 + 2 * index}",
    }


@pytest.fixture(scope="session")
def celery_worker(scaleout_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    """One Celery worker on this xdist worker's queue, shared by the Celery tests that land on it
    (not one xdist group: run one after another they take longer than a worker each), started in
    a folder with a params.yaml of its own that no run must read (it names other folders and a 1-tree forest)."""
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
