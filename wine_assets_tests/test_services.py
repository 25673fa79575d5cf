"""The service manager's own logic, without servers: process identity, stopping, the env file."""

import os
import subprocess
import sys
import time

import pytest

from wine_assets import services

GONE_PID = 2**31 - 2  # above any pid_max: a process that cannot exist


@pytest.mark.integration
def test_a_recycled_process_id_is_never_signalled():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # The pid as a state file recorded it, with the start time of an older process.
        stale = services.Process("postgres", bystander.pid, services._start_time(bystander.pid) - 3600, "/dev/null")
        assert stale.identify()[0] == services.NOT_OURS
        assert not stale.alive()
        assert stale.stop(timeout=1) is False
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
        assert process.stop(timeout=10) is True
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


@pytest.mark.unit
def test_a_process_is_ours_only_with_its_pid_and_its_start_time_within_the_tolerance():
    started = services._start_time(os.getpid())
    assert started is not None

    def identity(pid: int, recorded: float) -> str:
        return services.Process("me", pid, recorded, "/dev/null").identify()[0]

    tolerance = services.START_TIME_TOLERANCE
    assert identity(os.getpid(), started) == services.OURS
    # /proc/stat's btime is whole seconds: a one-second disagreement between two readers is the same process
    assert identity(os.getpid(), started + 1.0) == identity(os.getpid(), started - 1.0) == services.OURS
    assert identity(os.getpid(), started + tolerance + 0.1) == services.NOT_OURS
    assert identity(os.getpid(), started - 60) == services.NOT_OURS
    assert identity(GONE_PID, started) == services.GONE
    kind, why = services.Process("me", 0, started, "/dev/null").identify()
    assert (kind, why) == (services.NOT_OURS, "pid 0 is never a server's")  # 0 would signal our own group
    kind, why = services.Process("me", os.getpid(), started - 60, "/dev/null").identify()
    assert why.startswith(f"pid {os.getpid()} is now '") and why.endswith(
        f", not at the recorded {services._when(started - 60)}"
    )
