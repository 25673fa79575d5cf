"""Scaling out against real servers on 127.0.0.1: PostgreSQL instance storage, the Celery
executor with Redis and workers started in other folders, trees fitted on a Dask cluster.

The servers come from wine_assets.services (the code behind `make services`), started once per
test run by the conftest fixtures and always stopped. Each xdist worker has its own PostgreSQL
database and Redis queue; the Celery tests share one xdist group and so one Celery worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import yaml
from sklearn.preprocessing import StandardScaler

from wine_assets import model_format, services, training
from wine_assets.features import features_of
from wine_assets.files import sha256_file
from wine_assets.params import ModelParams
from wine_assets.registry import ModelRegistry
from wine_assets.validation import FEATURE_COLUMNS

from .support import (
    ALL_ASSETS,
    BIN,
    REPO_ROOT,
    fresh_database,
    make_dagster_home,
    make_postgres_home,
    pg_rows,
    require_programs,
    scaleout_cli_env,
    shuffled_labels,
    start_in_group,
    stop_group,
    tree_snapshot,
    xdist_index,
)

RUN_CELERY = str(REPO_ROOT / "deploy" / "run-celery.yaml")


def dagster(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dagster"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def write_project(folder: Path, **sections) -> Path:
    """A folder with a params.yaml (relative artifacts/ and registry/), as a user's checkout."""
    folder.mkdir(parents=True, exist_ok=True)
    document = {"paths": {"artifacts_dir": "artifacts", "registry_dir": "registry"}}
    for section, values in sections.items():
        document.setdefault(section, {}).update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(document))
    return folder / "params.yaml"


@contextlib.contextmanager
def instance_at(home: Path, env: dict[str, str]):
    """The Dagster instance of a DAGSTER_HOME, its {env: ...} settings read from env."""
    saved = dict(os.environ)
    os.environ.update({key: value for key, value in env.items() if key.startswith(("DAGSTER_PG", "WINE_ASSETS"))})
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield instance
    finally:
        os.environ.clear()
        os.environ.update(saved)


def last_run(instance: dg.DagsterInstance) -> dg.DagsterRun:
    return instance.get_runs(limit=1)[0]


def materialized_in(instance: dg.DagsterInstance, run_id: str) -> set[str]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return {record.event_log_entry.dagster_event.asset_key.to_user_string() for record in records}


def step_pids(instance: dg.DagsterInstance, run_id: str) -> dict[str, int]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START).records
    return {record.event_log_entry.step_key: record.event_log_entry.dagster_event.pid for record in records}


# -- make services / make services-down --
@pytest.mark.integration
def test_make_services_starts_each_server_waits_and_stops_exactly_them(tmp_path):
    require_programs("postgres", "redis-server")
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    make = ["make", "--no-print-directory", "-C", str(REPO_ROOT), f"SERVICES_DIR={state}", f"SERVICES_ENV={env_file}"]
    started = subprocess.run([*make, "services"], capture_output=True, text=True, timeout=240)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        env = services.read_env_file(env_file)
        assert list(env) == list(services.ENV_NAMES)
        assert "DAGSTER_PG_PASSWORD=***" in started.stdout  # the password is not printed
        assert oct(env_file.stat().st_mode & 0o777) == "0o600"
        port = int(env["DAGSTER_PG_PORT"])
        assert port != 5432 and env["DAGSTER_PG_HOST"] == "127.0.0.1"
        assert pg_rows(env, "SELECT current_database()") == [("dagster",)]
        assert services._redis_ping(int(env["WINE_ASSETS_CELERY_BROKER"].split(":")[2].split("/")[0]))
        from distributed import Client

        with Client(env["WINE_ASSETS_DASK_SCHEDULER"], timeout=10) as client:
            assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
        rows = services.status(state)
        assert [name for name, _, _ in rows] == [
            "postgres",
            "redis",
            "dask-scheduler",
            "dask-worker-1",
            "dask-worker-2",
        ]
        assert all(alive for _, _, alive in rows)

        again = subprocess.run([*make, "services"], capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already running" in again.stdout
        assert services.read_env_file(env_file) == env  # the same servers, the same ports

        # Without a worker, a Celery run would wait for ever: the check says so first.
        checked = subprocess.run(
            [str(BIN / "wine-assets"), "services", "check", "--celery"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 1
        assert "no Celery worker answers on 127.0.0.1:" in checked.stderr

        # make worker: a Celery worker on that broker, in the foreground, until it is stopped.
        log = tmp_path / "worker.log"
        worker = start_in_group([*make, "worker", "WORKER_CONCURRENCY=1"], log)
        try:
            deadline = time.monotonic() + 90
            while " ready." not in log.read_text(errors="replace") and time.monotonic() < deadline:
                assert worker.poll() is None, log.read_text()[-3000:]
                time.sleep(0.3)
            text = log.read_text(errors="replace")
            assert " ready." in text, text[-3000:]
            broker = env["WINE_ASSETS_CELERY_BROKER"].replace("redis://", "redis://:**@")  # as Celery prints it
            assert f"transport:   {broker}" in text
            assert "concurrency: 1 (prefork)" in text
            checked = subprocess.run(
                [str(BIN / "wine-assets"), "services", "check"],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert checked.returncode == 0, checked.stderr
            assert "PostgreSQL database 'dagster' at 127.0.0.1:" in checked.stdout
            assert "1 Celery worker(s) answer" in checked.stdout
        finally:
            stop_group(worker)
    finally:
        stopped = subprocess.run([*make, "services-down"], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.count("pid") == 5
    pids = [pid for _, pid, _ in rows]
    assert not any(services._start_time(pid) for pid in pids)
    assert not env_file.exists()
    again = subprocess.run([*make, "services-down"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "no services were running" in again.stdout
    services.purge(state, env_file)  # the cluster too, wherever it lives
    assert not state.exists()


@pytest.mark.integration
def test_make_targets_pick_the_instance_and_executor_by_variables(tmp_path):
    def plan(*variables: str) -> str:
        dry = subprocess.run(
            ["make", "--no-print-directory", "-n", "-C", str(REPO_ROOT), "run", *variables],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "DAGSTER_HOME": str(tmp_path / "h")},
        )
        assert dry.returncode == 0, dry.stderr
        return dry.stdout

    default = plan()
    assert "services check" not in default and "-c deploy/run-celery.yaml" not in default
    postgres = plan("INSTANCE=postgres")
    assert f"cp deploy/dagster-postgres.yaml {REPO_ROOT}/.dagster_home_postgres/dagster.yaml" in postgres
    assert "wine-assets services check --postgres" in postgres and "--celery" not in postgres
    both = plan("INSTANCE=postgres", "EXECUTOR=celery")
    assert "services check --postgres --celery" in both and "--select '*' -c deploy/run-celery.yaml" in both
    wrong = subprocess.run(
        ["make", "-n", "-C", str(REPO_ROOT), "run", "INSTANCE=mysql"], capture_output=True, text=True, timeout=60
    )
    assert wrong.returncode != 0 and "INSTANCE=mysql: use sqlite (the default) or postgres" in wrong.stderr


# -- PostgreSQL instance storage --
@pytest.mark.integration
def test_the_postgres_instance_holds_runs_events_and_check_results(scaleout_env, tmp_path):
    params = write_project(tmp_path / "project")
    home = make_postgres_home(tmp_path / "dagster_home")
    env = scaleout_cli_env(scaleout_env, home, params)
    completed = dagster(["asset", "materialize", "-m", "wine_assets", "--select", "*"], env, tmp_path / "project")
    assert completed.returncode == 0, completed.stderr[-3000:]
    with instance_at(home, env) as instance:
        run = last_run(instance)
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert materialized_in(instance, run.run_id) == ALL_ASSETS
    assert pg_rows(env, "SELECT status FROM runs WHERE run_id = %s", (run.run_id,)) == [("SUCCESS",)]
    (events,) = pg_rows(env, "SELECT count(*) FROM event_logs WHERE run_id = %s", (run.run_id,))
    assert events[0] > 50
    checks = pg_rows(
        env, "SELECT check_name, execution_status FROM asset_check_executions WHERE run_id = %s", (run.run_id,)
    )
    assert ("accuracy_threshold", "SUCCEEDED") in checks and ("no_missing_values", "SUCCEEDED") in checks
    assert not [path for path in home.rglob("*") if path.suffix == ".db"]  # no SQLite storage at all


@pytest.mark.integration
def test_postgres_down_refuses_the_launch_naming_the_database_and_writes_nothing(tmp_path):
    require_programs("postgres")
    process, env = services.start_postgres(tmp_path / "pg", timeout=60)
    process.stop()
    assert not process.alive()
    services.purge(tmp_path / "pg")
    params = write_project(tmp_path / "project")
    home = make_postgres_home(tmp_path / "dagster_home")
    cli = scaleout_cli_env(env, home, params)
    completed = dagster(["asset", "materialize", "-m", "wine_assets", "--select", "*"], cli, tmp_path / "project")
    assert completed.returncode != 0
    assert f'connection to server at "127.0.0.1", port {env["DAGSTER_PG_PORT"]} failed' in completed.stderr
    assert not (tmp_path / "project" / "artifacts").exists() and not (tmp_path / "project" / "registry").exists()
    # make run INSTANCE=postgres checks first, and names the database.
    env_file = tmp_path / "services.env"
    env_file.write_text(
        services.env_file_text(
            {**env, "WINE_ASSETS_CELERY_BROKER": "", "WINE_ASSETS_CELERY_BACKEND": "", "WINE_ASSETS_DASK_SCHEDULER": ""}
        )
    )
    made = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(REPO_ROOT),
            "run",
            "INSTANCE=postgres",
            f"SERVICES_ENV={env_file}",
            f"DAGSTER_HOME={tmp_path / 'make_home'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode != 0
    assert (
        f"PostgreSQL database 'dagster' at 127.0.0.1:{env['DAGSTER_PG_PORT']} does not answer: connection to server"
        in made.stderr
    )
    assert "Traceback" not in made.stderr  # stopped by the check, before Dagster tried to connect


@pytest.mark.integration
def test_bad_storage_and_executor_config_are_refused_clearly(tmp_path, write_params):
    params = write_params()
    home = make_postgres_home(tmp_path / "dagster_home")
    env = scaleout_cli_env({}, home, params)
    for name in services.ENV_NAMES:
        env.pop(name, None)
    completed = dagster(["asset", "materialize", "-m", "wine_assets", "--select", "raw_wine"], env, tmp_path)
    assert completed.returncode != 0
    assert "DAGSTER_PG_HOST" in completed.stderr  # the variable a user forgot to set
    typo = tmp_path / "typo.yaml"
    typo.write_text("execution:\n  config:\n    celery:\n      brokr: redis://127.0.0.1:1/0\n")
    completed = dagster(
        ["asset", "materialize", "-m", "wine_assets", "--select", "raw_wine", "-c", str(typo)],
        scaleout_cli_env({}, make_dagster_home(tmp_path / "sqlite_home"), params),
        tmp_path,
    )
    assert completed.returncode != 0
    assert 'Received unexpected config entry "brokr"' in completed.stderr
    assert not (tmp_path / "artifacts").exists()


# -- the Celery executor --
@pytest.mark.integration
def test_celery_steps_run_on_the_worker_with_the_runs_params_and_match_in_process(
    scaleout_env, celery_worker, cli_materialized_once, tmp_path
):
    project = tmp_path / "project"
    params = write_project(project)
    home = make_postgres_home(tmp_path / "dagster_home")
    env = scaleout_cli_env(scaleout_env, home)  # the launcher finds ./params.yaml in its own folder
    completed = dagster(["job", "execute", "-m", "wine_assets", "-j", "training_job", "-c", RUN_CELERY], env, project)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert 'Submitting celery task for step "wine_model" to queue "dagster"' in completed.stderr
    with instance_at(home, env) as instance:
        run = last_run(instance)
        assert run.tags["wine_assets/params_file"] == str(params)
        pids = step_pids(instance, run.run_id)
        launcher = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_START).records
        launcher_pid = launcher[0].event_log_entry.dagster_event.pid
    assert set(pids) >= {"raw_wine", "validated_wine", "wine_model", "evaluation_metrics"}
    assert launcher_pid not in pids.values()
    assert set(pids.values()) <= celery_worker.pool_pids()  # each step in one of the worker's processes
    # The worker's own folder and its params.yaml (a 1-tree forest, other folders) were not read.
    assert not (celery_worker.folder / "worker_artifacts").exists()
    metrics = json.loads((project / "artifacts" / "metrics.json").read_text())
    in_process = json.loads((cli_materialized_once.root / "artifacts" / "metrics.json").read_text())
    for key in ("accuracy", "f1_macro", "per_class", "confusion_matrix"):
        assert metrics[key] == in_process[key]
    assert sha256_file(project / "artifacts" / "model.skops") == sha256_file(
        cli_materialized_once.root / "artifacts" / "model.skops"
    )

    # release_job on the workers publishes exactly the evaluated bytes.
    released = dagster(["job", "execute", "-m", "wine_assets", "-j", "release_job", "-c", RUN_CELERY], env, project)
    assert released.returncode == 0, released.stderr[-3000:]
    registry = ModelRegistry(project / "registry")
    manifest = registry.verify()
    assert manifest["version"] == 1
    assert sha256_file(registry.version_dir(1) / "model.skops") == sha256_file(project / "artifacts" / "model.skops")


@pytest.mark.integration
@pytest.mark.parametrize("executor", ["in_process", "multiprocess", "celery"])
def test_every_executor_stops_at_a_failed_blocking_data_check(executor, request, scaleout_env, tmp_path, write_csv):
    """dagster-dask's executor would not pass this: it submits every step up front."""
    source = write_csv(edit=lambda frame: frame.assign(alcohol=frame["alcohol"].where(frame.index != 5)))
    project = tmp_path / "project"
    params = write_project(project, data={"source": str(source)})
    config = {
        "in_process": [],
        "multiprocess": ["-c", str(tmp_path / "multiprocess.yaml")],
        "celery": ["-c", RUN_CELERY],
    }[executor]
    (tmp_path / "multiprocess.yaml").write_text("execution:\n  config:\n    multiprocess: {}\n")
    if executor == "celery":
        request.getfixturevalue("celery_worker")
    home = make_postgres_home(tmp_path / "dagster_home")
    env = scaleout_cli_env(scaleout_env, home, params)
    completed = dagster(["asset", "materialize", "-m", "wine_assets", "--select", "*", *config], env, project)
    assert completed.returncode != 0
    with instance_at(home, env) as instance:
        run = last_run(instance)
        assert run.status == dg.DagsterRunStatus.FAILURE
        assert materialized_in(instance, run.run_id) == {"raw_wine"}
        checks = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
        failed = {
            r.event_log_entry.dagster_event.event_specific_data.check_name
            for r in checks
            if not r.event_log_entry.dagster_event.event_specific_data.passed
        }
    assert "no_missing_values" in failed
    assert not (project / "artifacts").exists() and not (project / "registry").exists()


@pytest.mark.integration
def test_celery_gate_failure_leaves_the_deployment_unexecuted_and_the_registry_untouched(
    scaleout_env, celery_worker, cli_materialized_once, tmp_path, write_csv
):
    source = write_csv(edit=shuffled_labels)
    project = tmp_path / "project"
    params = write_project(project, data={"source": str(source)})
    registry_before = cli_materialized_once.root / "registry"
    shutil.copytree(registry_before, project / "registry")
    before = tree_snapshot(project / "registry")
    home = make_postgres_home(tmp_path / "dagster_home")
    env = scaleout_cli_env(scaleout_env, home, params)
    completed = dagster(["asset", "materialize", "-m", "wine_assets", "--select", "*", "-c", RUN_CELERY], env, project)
    assert completed.returncode != 0
    with instance_at(home, env) as instance:
        run = last_run(instance)
        # the blocking labels_agree_with_production check (v1 is in production) stops the run on a worker
        assert materialized_in(instance, run.run_id) == {"raw_wine", "validated_wine"}
        started = step_pids(instance, run.run_id)
        assert "wine_model" not in started and "model_deployment" not in started  # never started
    assert tree_snapshot(project / "registry") == before


@pytest.mark.integration
def test_a_worker_killed_mid_step_fails_the_run_and_leaves_no_half_written_file(scaleout_env, celery_worker, tmp_path):
    """The pool process running wine_model is killed (as the OOM killer would): Celery reports the
    task lost, the run fails with that event, and no model file or registry version appears. The
    worker itself replaces the lost process and serves the next tests."""
    worker = celery_worker
    project = tmp_path / "project"
    params = write_project(project, model={"n_estimators": 4000})  # long enough to be caught mid-fit
    home = make_postgres_home(tmp_path / "dagster_home")
    env = scaleout_cli_env(scaleout_env, home, params)
    log = tmp_path / "launcher.log"
    with instance_at(home, env) as instance:
        earlier = {run.run_id for run in instance.get_runs()}
    launcher = start_in_group(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "wine_assets", "--select", "*", "-c", RUN_CELERY],
        log,
        cwd=project,
        env=env,
    )
    try:
        victim = None
        deadline = time.monotonic() + 180
        with instance_at(home, env) as instance:
            while victim is None and time.monotonic() < deadline:
                assert launcher.poll() is None, log.read_text()[-3000:]
                # This database holds this worker's earlier runs too: only the new run counts.
                runs = [run for run in instance.get_runs(limit=1) if run.run_id not in earlier]
                if runs:
                    victim = step_pids(instance, runs[0].run_id).get("wine_model")
                time.sleep(0.2)
            assert victim in worker.pool_pids()
            time.sleep(1.0)  # inside the fit
            os.kill(victim, signal.SIGKILL)
            assert launcher.wait(timeout=120) != 0
            run = last_run(instance)
            assert run.status == dg.DagsterRunStatus.FAILURE
            assert "model_deployment" not in step_pids(instance, run.run_id)
    finally:
        if launcher.poll() is None:
            stop_group(launcher)
    text = log.read_text()
    assert "During celery execution errors occurred in workers" in text, text[-3000:]
    assert "[wine_model]: billiard.exceptions.WorkerLostError: Worker exited prematurely: signal 9 (SIGKILL)" in text
    artifacts = project / "artifacts"
    assert not (artifacts / "model.skops").exists()
    assert not [path.name for path in artifacts.rglob("*") if ".tmp" in path.name]
    assert not (project / "registry").exists()
    deadline = time.monotonic() + 30
    while len(worker.pool_pids()) < 2 and time.monotonic() < deadline:  # the pool is whole again
        time.sleep(0.2)
    assert victim not in worker.pool_pids() and len(worker.pool_pids()) == 2


# -- training on the Dask cluster --
@pytest.mark.integration
def test_the_cluster_fitted_forest_predicts_exactly_what_the_local_one_predicts(services_env, wine_frame):
    from distributed import Client

    def tasks_done() -> int:
        with Client(services_env["WINE_ASSETS_DASK_SCHEDULER"], timeout=10) as client:
            return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)

    before = tasks_done()
    scaler = StandardScaler().fit(features_of(wine_frame))
    local = training.train_model(wine_frame, scaler, ModelParams())
    cluster = training.train_model(
        wine_frame, scaler, ModelParams(dask_scheduler=services_env["WINE_ASSETS_DASK_SCHEDULER"])
    )
    assert cluster.backend.startswith(f"dask {services_env['WINE_ASSETS_DASK_SCHEDULER']} (2 workers)")
    assert tasks_done() - before >= 10  # the trees were fitted as tasks of this scheduler
    assert cluster.model.n_jobs == local.model.n_jobs == 1
    rng = np.random.default_rng(0)
    low, high = wine_frame[list(FEATURE_COLUMNS)].min(), wine_frame[list(FEATURE_COLUMNS)].max()
    synthetic = rng.uniform(low.to_numpy(), high.to_numpy(), size=(100_000, len(FEATURE_COLUMNS)))
    for rows in (features_of(wine_frame).to_numpy(), synthetic):
        features = scaler.transform(rows) if rows is synthetic else scaler.transform(features_of(wine_frame))
        assert np.array_equal(cluster.model.predict(features), local.model.predict(features))
        assert np.array_equal(cluster.model.predict_proba(features), local.model.predict_proba(features))
    # Same trees, same predictions; the pickled bytes are not the same (see README "Scaling out").
    assert [tree.tree_.node_count for tree in cluster.model.estimators_] == [
        tree.tree_.node_count for tree in local.model.estimators_
    ]
    assert model_format.dumps(cluster.model) != model_format.dumps(local.model)


@pytest.mark.unit
def test_an_unreachable_scheduler_fails_the_fit_naming_the_address_and_key(monkeypatch, wine_frame):
    monkeypatch.setattr(training, "DASK_CONNECT_SECONDS", 2.0)
    address = f"tcp://127.0.0.1:{services.free_port()}"
    scaler = StandardScaler().fit(features_of(wine_frame))
    with pytest.raises(training.ClusterUnavailable, match=rf"cannot reach the Dask scheduler at {address} \(model"):
        training.train_model(wine_frame, scaler, ModelParams(dask_scheduler=address))


@pytest.mark.integration
def test_the_pipeline_trains_on_the_cluster_when_the_params_say_so(services_env, tmp_path, write_params):
    from wine_assets.definitions import ASSET_CHECKS, ASSETS
    from wine_assets.pipeline.resources import WineParamsResource

    address = services_env["WINE_ASSETS_DASK_SCHEDULER"]
    params = write_params(model={"dask_scheduler": address})
    (tmp_path / "instance").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "instance")) as instance:
        result = dg.materialize(
            [*ASSETS, *ASSET_CHECKS],
            instance=instance,
            resources={"params": WineParamsResource(params_file=str(params))},
            selection=["raw_wine", "validated_wine", "train_set", "test_set", "scaler", "wine_model"],
        )
        materialization = result.asset_materializations_for_node("wine_model")[0]
    assert materialization.metadata["training_backend"].value.startswith(f"dask {address}")
    model = model_format.loads((tmp_path / "artifacts" / "model.skops").read_bytes(), "model", "model.skops")
    assert model.n_jobs == 1 and len(model.estimators_) == 100


# -- the one-at-a-time limit on the shared artifacts, through the run queue --
@pytest.mark.integration
def test_two_runs_launched_together_on_postgres_run_one_after_the_other(scaleout_env, tmp_path):
    project = tmp_path / "project"
    params = write_project(project)
    servers = fresh_database(scaleout_env, f"wine_assets_queue_gw{xdist_index()}")  # an empty run history
    home = make_postgres_home(tmp_path / "dagster_home")
    env = scaleout_cli_env(servers, home, params)
    for _ in range(2):
        launched = dagster(["job", "launch", "-m", "wine_assets", "-j", "training_job"], env, project, timeout=120)
        assert launched.returncode == 0, launched.stderr[-3000:]
    log = tmp_path / "daemon.log"
    daemon = start_in_group([str(BIN / "dagster-daemon"), "run", "-m", "wine_assets"], log, cwd=project, env=env)
    try:
        with instance_at(home, env) as instance:
            deadline = time.monotonic() + 240
            records = []
            while time.monotonic() < deadline:
                assert daemon.poll() is None, log.read_text()[-3000:]
                records = instance.get_run_records()
                if len(records) == 2 and all(record.dagster_run.is_finished for record in records):
                    break
                time.sleep(1)
    finally:
        stop_group(daemon)
    assert [record.dagster_run.status for record in records] == [dg.DagsterRunStatus.SUCCESS] * 2, log.read_text()[
        -3000:
    ]
    first, second = sorted(records, key=lambda record: record.start_time)
    assert first.end_time <= second.start_time  # never both at once on artifacts/
    assert first.dagster_run.tags["wine_assets/artifacts"] == "exclusive"
