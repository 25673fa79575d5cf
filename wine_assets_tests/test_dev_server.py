"""End to end: a real `dg dev` (what `make dev` runs: webserver and daemon) on 127.0.0.1 reacting
to a new CSV.

The new-data sensor must request a training run, the release sensor a release run after it,
and a new version must appear in the registry; all observed through the webserver's GraphQL API.
"""

import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetKey, DagsterInstance

from wine_assets.pipeline.experiments import DECISION
from wine_assets.registry import ModelRegistry

from .conftest import (
    REPO_ROOT,
    cli_env,
    fresh_database,
    make_postgres_home,
    pg_rows,
    start_in_group,
    stop_group,
    xdist_index,
)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
BUDGET_SECONDS = 180
RUNS_QUERY = "{ runsOrError { ... on Runs { results { runId jobName status tags { key value } } } } }"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.mark.parametrize("instance", ["sqlite", "postgres"])
def test_new_csv_trains_and_releases_through_the_sensors(instance, request, tmp_path, write_params, write_csv):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    params_file = write_params(data={"watch_dir": "incoming"})
    if instance == "postgres":  # deploy/dagster-postgres.yaml, a database of this test's own
        # An empty run history: the runs below are all there is.
        servers = fresh_database(request.getfixturevalue("scaleout_env"), f"wine_assets_dev_gw{xdist_index()}")
        dagster_home = make_postgres_home(tmp_path / "dagster_home")
        env = {**cli_env(dagster_home, params_file), **servers}
    else:
        dagster_home = request.getfixturevalue("dagster_home")
        env = cli_env(dagster_home, params_file)
    env.update(WINE_ASSETS_SENSORS="running", WINE_ASSETS_SENSOR_INTERVAL="3", VIRTUAL_ENV=str(BIN.parent))
    port = free_port()
    log_path = tmp_path / "dagster_dev.log"
    deadline = time.monotonic() + BUDGET_SECONDS
    # dg dev serves the project of the folder it starts in ([tool.dg] in pyproject.toml).
    server = start_in_group(
        [str(BIN / "dg"), "dev", "-h", "127.0.0.1", "-p", str(port)], log_path, cwd=REPO_ROOT, env=env
    )
    try:
        sensors = None
        while time.monotonic() < deadline:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                answer = graphql(
                    port,
                    '{ sensorsOrError(repositorySelector: {repositoryName: "__repository__", '
                    'repositoryLocationName: "wine_assets"}) { ... on Sensors { results { name '
                    "sensorState { status } } } } }",
                )
                sensors = {
                    item["name"]: item["sensorState"]["status"]
                    for item in answer["data"]["sensorsOrError"].get("results", [])
                }
                if sensors:
                    break
            except (urllib.error.URLError, ConnectionError, KeyError, TypeError):
                pass
            time.sleep(1)
        assert sensors == {"new_data_sensor": "RUNNING", "release_after_training": "RUNNING"}, sensors

        csv = write_csv("incoming/harvest-2026.csv")
        runs: dict[str, str] = {}
        while time.monotonic() < deadline:
            results = graphql(port, RUNS_QUERY)["data"]["runsOrError"]["results"]
            runs = {run["jobName"]: run["status"] for run in results}
            assert "FAILURE" not in runs.values(), (runs, log_path.read_text()[-3000:])
            if runs.get("training_job") == "SUCCESS" and runs.get("release_job") == "SUCCESS":
                break
            time.sleep(2)
        assert runs == {"training_job": "SUCCESS", "release_job": "SUCCESS"}, runs
        training = next(run for run in results if run["jobName"] == "training_job")
        tags = {tag["key"]: tag["value"] for tag in training["tags"]}
        assert tags["wine_assets/data_source"] == str(csv)

        registry = ModelRegistry(tmp_path / "registry")
        assert registry.versions() == [1]
        manifest = registry.verify()
        assert manifest["data_source"] == str(csv)
        assert manifest["dagster_run_id"] in {run["runId"] for run in results}
    finally:
        stop_group(server)
    assert server.poll() is not None
    assert "SupersessionWarning" not in log_path.read_text()
    if instance == "postgres":  # the run history is in PostgreSQL, not in a SQLite file
        runs = pg_rows(env, "SELECT pipeline_name, status FROM runs ORDER BY create_timestamp")
        assert runs == [("training_job", "SUCCESS"), ("release_job", "SUCCESS")]
        assert not list(dagster_home.rglob("*.db"))


BACKFILL = """mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
  }
}"""
BACKFILL_STATUS = (
    "query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }"
)


def graphql_with(port: int, query: str, variables: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_a_backfill_of_the_experiment_grid_blocks_only_the_dataset_that_fails(
    tmp_path, write_params, write_csv, dagster_home
):
    """The UI's way: one backfill of every experiments asset over all partitions, run by the daemon
    from the queue. The dataset with a NaN stops at its blocking check; the good one goes on to
    its leaderboard and decision."""
    write_csv("broken.csv", edit=lambda frame: frame.assign(alcohol=frame["alcohol"].where(frame.index != 5)))
    params_file = write_params(
        model={"n_estimators": 20},
        experiments={
            "datasets": {"wine": "builtin", "broken": "broken.csv"},
            "variants": {"stump": {"family": "decision_tree", "max_depth": 1}},
            "folds": 3,
            "repeats": 1,
        },
    )
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nrun_queue:\n  max_concurrent_runs: 2\n")
    env = cli_env(dagster_home, params_file)
    port = free_port()
    log_path = tmp_path / "dagster_dev.log"
    deadline = time.monotonic() + 2 * BUDGET_SECONDS
    server = start_in_group(
        [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        log_path,
        cwd=REPO_ROOT,
        env=env,
    )
    keys = [AssetKey(["experiments", name]) for name in ("raw_wine", "validated_wine", "cv_scores", "leaderboard")]
    keys.append(DECISION)
    try:
        loaded: list[str] = []
        while time.monotonic() < deadline:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                answer = graphql(port, "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }")
                loaded = [entry["loadStatus"] for entry in answer["data"]["workspaceOrError"]["locationEntries"]]
                if loaded and all(status == "LOADED" for status in loaded):
                    break
            except (urllib.error.URLError, ConnectionError, KeyError, TypeError):
                pass
            time.sleep(1)
        assert loaded == ["LOADED", "LOADED"], loaded
        selection = [{"path": key.path} for key in keys]
        launched = graphql_with(port, BACKFILL, {"params": {"assetSelection": selection, "allPartitions": True}})
        backfill_id = launched["data"]["launchPartitionBackfill"]["backfillId"]
        status = "REQUESTED"
        while time.monotonic() < deadline and status == "REQUESTED":
            time.sleep(2)
            answer = graphql_with(port, BACKFILL_STATUS, {"id": backfill_id})
            status = answer["data"]["partitionBackfillOrError"]["status"]
        # failed as a whole: the broken dataset's check, and challenger_won (production stays)
        assert status == "COMPLETED_FAILED", (status, log_path.read_text()[-3000:])
    finally:
        stop_group(server)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        materialized = {
            "/".join(key.path): {record.partition_key for record in instance.fetch_materializations(key, 50).records}
            for key in keys
        }
        evaluations = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(AssetKey(["experiments", "raw_wine"]), "no_missing_values"), limit=10
        )
    assert materialized == {
        "experiments/raw_wine": {"wine", "broken"},
        "experiments/validated_wine": {"wine"},
        "experiments/cv_scores": {"wine|production", "wine|stump"},
        "experiments/leaderboard": {"wine"},
        "experiments/champion_decision": {"wine"},
    }
    outcomes = {record.partition: record.status.value for record in evaluations}
    assert outcomes == {"wine": "SUCCEEDED", "broken": "FAILED"}
