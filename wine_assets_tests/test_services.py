"""The service manager's own logic, without servers: process identity, stopping, the env file."""

import subprocess
import sys
import time

import pytest

from wine_assets import services


@pytest.mark.integration
def test_a_recycled_process_id_is_never_signalled():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # The pid as a state file recorded it, with the start time of an older process.
        stale = services.Process("postgres", bystander.pid, "1", "/dev/null")
        assert not stale.alive()
        stale.stop(timeout=1)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.integration
def test_stop_ends_the_whole_process_group():
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"],
        start_new_session=True,
    )
    try:
        started = services._start_time(leader.pid)
        assert started is not None
        process = services.Process("dask-worker-1", leader.pid, started, "/dev/null")
        deadline = time.monotonic() + 10
        while len(services.group_members(leader.pid)) < 2 and time.monotonic() < deadline:
            pass
        assert len(services.group_members(leader.pid)) == 2  # the leader and its child
        process.stop(timeout=10)
        assert not process.alive()
        assert services.group_members(leader.pid) == set()
    finally:
        leader.kill()
        leader.wait()


@pytest.mark.integration
def test_the_env_file_round_trips_and_quotes_values(tmp_path):
    env = {name: f"value of {name}" for name in services.ENV_NAMES}
    env["DAGSTER_PG_PASSWORD"] = "it's $ecret"
    path = tmp_path / "services.env"
    path.write_text(services.env_file_text(env))
    assert services.read_env_file(path) == env
    shell = subprocess.run(
        ["bash", "-c", f'set -a; . {path}; printf %s "$DAGSTER_PG_PASSWORD"'], capture_output=True, text=True
    )
    assert shell.stdout == "it's $ecret"


@pytest.mark.unit
def test_check_names_what_is_missing_or_down():
    with pytest.raises(services.ServiceError, match="DAGSTER_PG_HOST, DAGSTER_PG_PORT.* not set"):
        services.check({})
    port = services.free_port()
    env = {
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(port),
        "DAGSTER_PG_USER": "u",
        "DAGSTER_PG_PASSWORD": "p",
        "DAGSTER_PG_DB": "runs",
    }
    with pytest.raises(services.ServiceError, match=rf"PostgreSQL database 'runs' at 127.0.0.1:{port} does not answer"):
        services.check(env)
    with pytest.raises(
        services.ServiceError, match=rf"Redis at 127.0.0.1:{port} \(the Celery broker\) does not answer"
    ):
        services.check({"WINE_ASSETS_CELERY_BROKER": f"redis://127.0.0.1:{port}/0"}, postgres=False, celery=True)
