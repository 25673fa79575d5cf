"""End to end: one real `dagster dev -w workspace.yaml` (webserver and daemon, both code locations)
on 127.0.0.1, started once for this module, on PostgreSQL where its server is installed (the
instance of `make dev INSTANCE=postgres`), on SQLite elsewhere.

Two flows through the webserver's GraphQL API: a new CSV in the watched folder makes the
new-data sensor request a training run and the release sensor a release run after it, and a
new version appears in the registry; then a backfill of the experiment grid, run by the daemon
from the queue, stops the dataset that fails its check and lets the good one reach a decision.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dagster import AssetCheckKey, AssetKey, DagsterInstance

from wine_assets.ingestion import load_builtin_frame
from wine_assets.pipeline.experiments import DECISION
from wine_assets.registry import ModelRegistry

from .support import (
    BIN,
    REPO_ROOT,
    REQUIRE_SERVICES_ENV,
    cli_env,
    find_program,
    free_port,
    fresh_database,
    make_dagster_home,
    make_postgres_home,
    pg_rows,
    start_in_group,
    stop_group,
    xdist_index,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]
BUDGET_SECONDS = 180
RUNS_QUERY = "{ runsOrError { ... on Runs { results { runId jobName status tags { key value } } } } }"
SENSORS_QUERY = (
    '{ sensorsOrError(repositorySelector: {repositoryName: "__repository__", '
    'repositoryLocationName: "wine_assets"}) { ... on Sensors { results { name sensorState { status } } } } }'
)
LOCATIONS_QUERY = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
BACKFILL = """mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
  }
}"""
BACKFILL_STATUS = (
    "query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }"
)
PIPELINE_JOBS = {"training_job", "release_job"}


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@dataclass
class DevServer:
    port: int
    folder: Path
    home: Path
    env: dict[str, str]
    log: Path
    postgres: bool

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _instance_home(folder: Path, request: pytest.FixtureRequest) -> tuple[Path, dict[str, str], bool]:
    """PostgreSQL (a database of this module's own: an empty run history) where its server and the
    services stack can run; SQLite where they cannot, unless .ci/run requires them."""
    queue = {"max_concurrent_runs": 2}  # the backfill's runs, at most one per core
    if find_program("postgres") and find_program("redis-server") or os.environ.get(REQUIRE_SERVICES_ENV):
        servers = fresh_database(request.getfixturevalue("services_env"), f"wine_assets_dev_gw{xdist_index()}")
        home = make_postgres_home(folder / "dagster_home")
        config = yaml.safe_load((home / "dagster.yaml").read_text())
        config["run_queue"].update(queue)
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        return home, servers, True
    home = make_dagster_home(folder / "dagster_home", yaml.safe_dump({"run_queue": queue}))
    return home, {}, False


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[DevServer]:
    folder = tmp_path_factory.mktemp("dev")
    (folder / "incoming").mkdir()
    broken = load_builtin_frame()
    broken.loc[5, "alcohol"] = float("nan")
    broken.to_csv(folder / "broken.csv", index=False)
    document = {
        "paths": {"artifacts_dir": "artifacts", "registry_dir": "registry"},
        "data": {"watch_dir": "incoming"},
        "model": {"n_estimators": 20},
        "experiments": {
            "datasets": {"wine": "builtin", "broken": "broken.csv"},
            "variants": {"stump": {"family": "decision_tree", "max_depth": 1}},
            "folds": 3,
            "repeats": 1,
        },
    }
    (folder / "params.yaml").write_text(yaml.safe_dump(document))
    home, servers, postgres = _instance_home(folder, request)
    env = {**cli_env(home, folder / "params.yaml"), **servers}
    env.update(WINE_ASSETS_SENSORS="running", WINE_ASSETS_SENSOR_INTERVAL="3")
    port = free_port()
    log = folder / "dagster_dev.log"
    process = start_in_group(
        [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        log,
        cwd=REPO_ROOT,
        env=env,
    )
    server = DevServer(port, folder, home, env, log, postgres)
    try:
        deadline = time.monotonic() + BUDGET_SECONDS
        loaded: dict[str, str] = {}
        while time.monotonic() < deadline:
            assert process.poll() is None, server.log_tail()
            try:
                entries = graphql(port, LOCATIONS_QUERY)["data"]["workspaceOrError"]["locationEntries"]
                loaded = {entry["name"]: entry["loadStatus"] for entry in entries}
                if loaded and all(status == "LOADED" for status in loaded.values()):
                    break
            except (urllib.error.URLError, ConnectionError, KeyError, TypeError):
                pass
            time.sleep(1)
        assert loaded == {"wine_assets": "LOADED", "wine_assets_experiments": "LOADED"}, (loaded, server.log_tail())
        yield server
    finally:
        stop_group(process)
    assert process.poll() is not None


def test_new_csv_trains_and_releases_through_the_sensors(dev_server, write_csv):
    port = dev_server.port
    sensors = graphql(port, SENSORS_QUERY)["data"]["sensorsOrError"]["results"]
    assert {item["name"]: item["sensorState"]["status"] for item in sensors} == {
        "new_data_sensor": "RUNNING",
        "release_after_training": "RUNNING",
    }
    csv = dev_server.folder / "incoming" / "harvest-2026.csv"
    write_csv("harvest.csv").rename(csv)  # appears whole in the watched folder
    deadline = time.monotonic() + BUDGET_SECONDS
    runs: dict[str, str] = {}
    while time.monotonic() < deadline:
        results = [run for run in graphql(port, RUNS_QUERY)["data"]["runsOrError"]["results"]]
        runs = {run["jobName"]: run["status"] for run in results if run["jobName"] in PIPELINE_JOBS}
        assert "FAILURE" not in runs.values(), (runs, dev_server.log_tail())
        if runs.get("training_job") == "SUCCESS" and runs.get("release_job") == "SUCCESS":
            break
        time.sleep(2)
    assert runs == {"training_job": "SUCCESS", "release_job": "SUCCESS"}, runs
    training = next(run for run in results if run["jobName"] == "training_job")
    tags = {tag["key"]: tag["value"] for tag in training["tags"]}
    assert tags["wine_assets/data_source"] == str(csv)

    registry = ModelRegistry(dev_server.folder / "registry")
    assert registry.versions() == [1]
    manifest = registry.verify()
    assert manifest["data_source"] == str(csv)
    assert manifest["dagster_run_id"] in {run["runId"] for run in results}
    if dev_server.postgres:  # the run history is in PostgreSQL, not in a SQLite file
        rows = pg_rows(dev_server.env, "SELECT pipeline_name, status FROM runs ORDER BY create_timestamp")
        assert [row for row in rows if row[0] in PIPELINE_JOBS] == [
            ("training_job", "SUCCESS"),
            ("release_job", "SUCCESS"),
        ]
        assert not list(dev_server.home.rglob("*.db"))


def test_a_backfill_of_the_experiment_grid_blocks_only_the_dataset_that_fails(dev_server):
    """The UI's way: one backfill of every experiments asset over all partitions, run by the daemon
    from the queue. The dataset with a NaN stops at its blocking check; the good one goes on to
    its leaderboard and decision."""
    keys = [AssetKey(["experiments", name]) for name in ("raw_wine", "validated_wine", "cv_scores", "leaderboard")]
    keys.append(DECISION)
    selection = [{"path": key.path} for key in keys]
    launched = graphql(dev_server.port, BACKFILL, {"params": {"assetSelection": selection, "allPartitions": True}})
    backfill_id = launched["data"]["launchPartitionBackfill"]["backfillId"]
    status = "REQUESTED"
    deadline = time.monotonic() + 2 * BUDGET_SECONDS
    while time.monotonic() < deadline and status == "REQUESTED":
        time.sleep(2)
        answer = graphql(dev_server.port, BACKFILL_STATUS, {"id": backfill_id})
        status = answer["data"]["partitionBackfillOrError"]["status"]
    # failed as a whole: the broken dataset's check, and challenger_won (production stays)
    assert status == "COMPLETED_FAILED", (status, dev_server.log_tail())
    saved = dict(os.environ)
    os.environ.update({key: value for key, value in dev_server.env.items() if key.startswith("DAGSTER_PG")})
    try:
        with DagsterInstance.from_config(str(dev_server.home)) as instance:
            materialized = {
                "/".join(key.path): {r.partition_key for r in instance.fetch_materializations(key, 50).records}
                for key in keys
            }
            evaluations = instance.event_log_storage.get_asset_check_execution_history(
                AssetCheckKey(AssetKey(["experiments", "raw_wine"]), "no_missing_values"), limit=10
            )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert materialized == {
        "experiments/raw_wine": {"wine", "broken"},
        "experiments/validated_wine": {"wine"},
        "experiments/cv_scores": {"wine|production", "wine|stump"},
        "experiments/leaderboard": {"wine"},
        "experiments/champion_decision": {"wine"},
    }
    outcomes = {record.partition: record.status.value for record in evaluations}
    assert outcomes == {"wine": "SUCCEEDED", "broken": "FAILED"}
