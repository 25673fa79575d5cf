"""The service manager (wine_assets.services, behind `make services`) in the cases test_services.py and
the scale-out tests leave out: servers that die or never answer while starting, a process that ignores
SIGTERM, the PostgreSQL cluster's folder when its user cannot reach the state dir, clusters left half
made, retries on another port, the `wine-assets services` actions on recorded and dead processes,
records whose pid another process has taken (never signalled), purge refusing folders the stack did
not make and deleting symbolic links as links, and the checks of servers that answer wrongly."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from wine_assets import cli, services

from .support import BIN, free_port, require_programs, tree_snapshot

GONE_PID = 2**31 - 2  # above any pid_max: a process that cannot exist


def namespace(action: str, state_dir: Path, env_file: Path, **flags) -> argparse.Namespace:
    """`wine-assets services <action> --state-dir ... --env-file ...` as its parser builds it."""
    parser = argparse.ArgumentParser()
    services.add_arguments(parser)
    args = [action, "--state-dir", str(state_dir), "--env-file", str(env_file)]
    args += [f"--{name}" for name, on in flags.items() if on]
    return parser.parse_args(args)


def record(state_dir: Path, processes: list[services.Process], env: dict[str, str]) -> None:
    """The state file as up() leaves it, in a state dir the services stack made (if it is not there yet)."""
    services.make_state_dir(state_dir)
    document = {"env": env, "processes": [vars(process) for process in processes]}
    (state_dir / "state.json").write_text(json.dumps(document), encoding="utf-8")


def python_server(log: Path, code: str, name: str = "server") -> services.Process:
    """A Python program started as the service manager starts a server: own session, output to log."""
    return services._spawn(name, [sys.executable, "-c", code], log)


def wait_for_text(path: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} in {path} within {timeout} s"
        time.sleep(0.02)


def kill_if_left(process: services.Process) -> None:
    """Clean-up after a test: SIGKILL to the group, if it is still ours."""
    if process.alive() or services.group_members(process.pid):
        services._signal_group(process.pid, signal.SIGKILL)


@pytest.fixture
def unreachable(tmp_path: Path) -> Path:
    """A folder no other user can enter (as root, the 'postgres' user cannot reach what is inside)."""
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    return folder


def as_root_with_postgres_user() -> None:
    require_programs("postgres")  # the package brings the 'postgres' user
    if os.geteuid() != 0:
        pytest.skip("the cluster's fallback folder is made only as root (PostgreSQL then runs as 'postgres')")
    services._server_user()  # a ServiceError here names the missing 'postgres' user


# -- processes --------------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_server_that_ignores_sigterm_is_killed_with_its_group(tmp_path, caplog):
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ignoring', flush=True); time.sleep(60)"
    )
    process = python_server(tmp_path / "stubborn.log", code, "stubborn")
    try:
        wait_for_text(tmp_path / "stubborn.log", "ignoring")
        with caplog.at_level(logging.WARNING, logger="wine_assets.services"):
            process.stop(timeout=1)
        assert not process.alive()
        assert services.group_members(process.pid) == set()
        assert f"stubborn (pid {process.pid}) did not stop in 1 s: killing its process group" in caplog.messages
    finally:
        kill_if_left(process)


@pytest.mark.integration
def test_a_server_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    code = "import sys, time; print('FATAL: could not bind 127.0.0.1', flush=True); time.sleep(0.3); sys.exit(3)"
    port = free_port()  # nothing listens there
    process = python_server(tmp_path / "dying.log", code, "dying")
    try:
        with pytest.raises(services.ServiceError) as caught:
            services._wait("the dying server", process, lambda: socket.create_connection(("127.0.0.1", port)), 20)
        assert str(caught.value) == "the dying server exited while starting:\nFATAL: could not bind 127.0.0.1"
    finally:
        kill_if_left(process)
        try:
            os.waitpid(process.pid, 0)  # this test started it: reap it
        except ChildProcessError:  # subprocess reaped it already
            pass


@pytest.mark.unit
def test_a_server_that_never_answers_times_out_naming_its_log(tmp_path):
    me = services.Process("me", os.getpid(), services._start_time(os.getpid()), str(tmp_path / "missing.log"))
    with pytest.raises(services.ServiceError) as caught:
        services._wait("Redis on 127.0.0.1:1", me, lambda: False, 0.3)
    assert str(caught.value) == f"Redis on 127.0.0.1:1 did not answer within 0 s (None); log {me.log}:\n(no log)"

    def refused() -> bool:
        raise ConnectionRefusedError("connection refused")

    log = tmp_path / "server.log"
    log.write_text("\n".join(f"line {n}" for n in range(30)) + "\n")
    me = services.Process("me", me.pid, me.started, str(log))
    with pytest.raises(services.ServiceError) as caught:
        services._wait("Redis on 127.0.0.1:1", me, refused, 0.3)
    message = str(caught.value)
    assert message.startswith(f"Redis on 127.0.0.1:1 did not answer within 0 s (connection refused); log {log}:\n")
    assert message.endswith("\n".join(f"line {n}" for n in range(15, 30)))  # the last 15 lines


@pytest.mark.unit
def test_signalling_a_group_that_is_gone_is_quiet():
    services._signal_group(GONE_PID, signal.SIGTERM)
    assert services.group_members(GONE_PID) == set()


# -- PostgreSQL's programs and folders ---------------------------------------------------------------
@pytest.mark.unit
def test_postgres_programs_are_found_off_and_on_path_or_named():
    assert services._pg_bin("sh") == shutil.which("sh")  # no PostgreSQL folder holds it: PATH does
    with pytest.raises(services.ServiceError) as caught:
        services._pg_bin("pg_no_such_program")
    assert str(caught.value) == (
        "PostgreSQL's pg_no_such_program was not found: install the server (apt-get install postgresql)"
    )


@pytest.mark.unit
def test_a_recorded_cluster_folder_counts_only_while_it_is_a_real_folder(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    assert services._fallback_dir(state) is None  # nothing recorded
    location = state / "postgres.location"
    location.write_text(str(tmp_path / "gone") + "\n")
    assert services._fallback_dir(state) is None
    (tmp_path / "cluster").mkdir()
    location.write_text(str(tmp_path / "cluster") + "\n")
    assert services._fallback_dir(state) is None  # a folder the services stack did not make: never used
    services._mark_made(tmp_path / "cluster", services.CLUSTER_FOLDER)
    (tmp_path / "link").symlink_to(tmp_path / "cluster")
    location.write_text(str(tmp_path / "link"))
    assert services._fallback_dir(state) is None  # a symlink could point anywhere: never followed
    location.write_text(str(tmp_path / "cluster") + "\n")
    assert services._fallback_dir(state) == tmp_path / "cluster"
    (tmp_path / "state-dir-like").mkdir()
    services._mark_made(tmp_path / "state-dir-like", services.STATE_DIR)
    location.write_text(str(tmp_path / "state-dir-like"))
    assert services._fallback_dir(state) is None  # marked, but as a state dir, not as a cluster folder


@pytest.mark.unit
def test_without_a_server_user_the_cluster_lives_in_the_state_dir(tmp_path):
    assert services._reachable_by(None, tmp_path)
    folder = services._pg_dirs(tmp_path / "state", None)
    assert folder == tmp_path / "state" / "postgres" and folder.is_dir()
    assert not (tmp_path / "state" / "postgres.location").exists()


@pytest.mark.integration
def test_a_state_dir_postgres_cannot_reach_gets_one_recorded_folder_that_purge_deletes(unreachable):
    as_root_with_postgres_user()
    state, env_file = unreachable / "state", unreachable / "services.env"
    first = services._pg_dirs(state, "postgres")
    try:
        assert first.parent == Path("/var/tmp") and first.name.startswith("wine-assets-postgres-")
        assert first.owner() == "postgres"
        assert (state / "postgres.location").read_text() == str(first)
        assert oct((state / "postgres.location").stat().st_mode & 0o777) == "0o600"
        assert services._pg_dirs(state, "postgres") == first  # the next start finds the same folder
        env_file.write_text("DAGSTER_PG_HOST=127.0.0.1\n")
        services.purge(state, env_file)
        assert not first.exists() and not state.exists() and not env_file.exists()
    finally:
        shutil.rmtree(first, ignore_errors=True)


def _cluster_without_password(state: Path, elsewhere: Path) -> None:
    """A cluster whose data folder exists (wherever this user's server would look) but whose password is gone."""
    for root in (state / "postgres", elsewhere):
        (root / "data").mkdir(parents=True)
        (root / "data" / "PG_VERSION").write_text("15\n")
    services._mark_made(elsewhere, services.CLUSTER_FOLDER)  # as the services stack made it
    (state / "postgres.location").write_text(str(elsewhere))


@pytest.mark.integration
def test_a_cluster_whose_password_is_gone_is_refused_and_up_gives_up_after_three_tries(unreachable, tmp_path, caplog):
    require_programs("postgres")
    state, env_file = unreachable / "state", unreachable / "services.env"
    _cluster_without_password(state, tmp_path / "cluster")
    with pytest.raises(services.ServiceError) as caught:
        services.start_postgres(state, timeout=5)
    # as root the cluster is the recorded folder (postgres cannot reach the state dir); else the state dir's
    data = (tmp_path / "cluster" if os.geteuid() == 0 else state / "postgres") / "data"
    assert str(caught.value) == (
        f"{data} exists but its password file {state / 'postgres.password'} is gone: `make services-down` and "
        f"remove {data} to start afresh"
    )
    with caplog.at_level(logging.WARNING, logger="wine_assets.services"):
        with pytest.raises(services.ServiceError, match="password file .* is gone"):
            services.up(state, env_file, timeout=5)
    retries = [m for m in caplog.messages if m.endswith("; trying again on another port")]
    assert len(retries) == 2  # three attempts in all
    assert not env_file.exists() and not (state / "state.json").exists()


@pytest.mark.integration
def test_initdb_failing_is_reported_with_its_message(unreachable, tmp_path):
    require_programs("postgres")
    state = unreachable / "state"
    for root in (state / "postgres", tmp_path / "cluster"):
        root.mkdir(parents=True)
        (root / "data").write_text("a file where the cluster's folder belongs\n")
    services._mark_made(tmp_path / "cluster", services.CLUSTER_FOLDER)  # as the services stack made it
    (state / "postgres.location").write_text(str(tmp_path / "cluster"))
    with pytest.raises(services.ServiceError) as caught:
        services.start_postgres(state, timeout=5)
    # Either way initdb fails and says why: as this user, on a file where its folder belongs; as root, run as
    # 'postgres', already on reading its password file in the recorded folder (which 'postgres' cannot reach).
    data = (tmp_path / "cluster" if os.geteuid() == 0 else state / "postgres") / "data"
    message = str(caught.value)
    assert message.startswith(f"initdb failed for {data}:\n") and len(message.splitlines()) > 1  # initdb's own words
    assert not (state / "postgres.password").exists()  # no password is kept for a cluster that was not made
    assert not list(state.parent.rglob("initdb.pw")) and not list(tmp_path.rglob("initdb.pw"))


# -- starting with retries, and servers that are not installed -----------------------------------------
@pytest.mark.unit
def test_a_server_that_could_not_start_is_tried_again(tmp_path, caplog):
    attempts: list[Path] = []

    def flaky(state_dir: Path, timeout: float) -> str:
        attempts.append(state_dir)
        if len(attempts) < 3:
            raise services.ServiceError(f"Redis on 127.0.0.1:{6000 + len(attempts)} exited while starting:\nin use")
        return "started"

    with caplog.at_level(logging.WARNING, logger="wine_assets.services"):
        assert services._start_with_retry(flaky, tmp_path, 1.0) == "started"
    assert attempts == [tmp_path] * 3
    assert caplog.messages == [
        "Redis on 127.0.0.1:6001 exited while starting:; trying again on another port",
        "Redis on 127.0.0.1:6002 exited while starting:; trying again on another port",
    ]

    def broken(state_dir: Path, timeout: float) -> str:
        attempts.append(state_dir)
        raise services.ServiceError("Redis did not answer")

    attempts.clear()
    with pytest.raises(services.ServiceError, match="^Redis did not answer$"):
        services._start_with_retry(broken, tmp_path, 1.0, attempts=2)
    assert len(attempts) == 2


@pytest.mark.unit
def test_a_server_that_is_not_installed_is_not_tried_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    calls = []

    def start_redis(state_dir: Path, timeout: float):  # noqa: ANN202
        calls.append(1)
        return services.start_redis(state_dir, timeout)

    with pytest.raises(services.ServiceError) as caught:
        services._start_with_retry(start_redis, tmp_path / "state", 1.0)
    assert str(caught.value) == "redis-server was not found: install it (apt-get install redis-server)"
    assert calls == [1]
    assert not (tmp_path / "state").exists()


# -- down, status, purge and the command ------------------------------------------------------------------
@pytest.mark.unit
def test_down_without_a_state_dir_removes_the_env_file(tmp_path):
    env_file = tmp_path / "services.env"
    env_file.write_text("DAGSTER_PG_HOST=127.0.0.1\n")
    assert services.down(tmp_path / "never-started", env_file) == services.DownReport([], [])
    assert not env_file.exists() and not (tmp_path / "never-started").exists()


@pytest.mark.unit
def test_recorded_processes_that_are_gone_are_shown_stopped_and_forgotten(tmp_path, capsys):
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    record(state, [services.Process("redis", GONE_PID, 12345.0, str(state / "redis.log"))], {"X": "1"})
    env_file.write_text("X=1\n")
    assert services.status(state) == [("redis", GONE_PID, False)]
    assert services.running(state, env_file) is None
    assert services.run(namespace("status", state, env_file)) == 1
    assert capsys.readouterr().out == f"redis            pid {GONE_PID} stopped\n"
    assert services.run(namespace("down", state, env_file)) == 0
    assert capsys.readouterr().out == "no services were running\n"
    assert not (state / "state.json").exists() and not env_file.exists()
    assert services.run(namespace("status", state, env_file)) == 1
    assert capsys.readouterr().out == "no services recorded\n"


@pytest.mark.unit
def test_purge_stops_and_deletes_the_state_dir(tmp_path, capsys):
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    record(state, [], {})
    (state / "postgres.password").write_text("secret")
    assert services.run(namespace("purge", state, env_file)) == 0
    assert capsys.readouterr().out == f"services stopped; {state} and the PostgreSQL cluster deleted\n"
    assert not state.exists()


@pytest.mark.integration
def test_status_is_0_while_every_recorded_server_runs_and_down_stops_them(tmp_path, capsys):
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    sleeper = python_server(state / "sleeper.log", "import time; time.sleep(60)", "sleeper")
    try:
        record(state, [sleeper], {"WINE_ASSETS_DASK_SCHEDULER": "tcp://127.0.0.1:1"})
        env_file.write_text("WINE_ASSETS_DASK_SCHEDULER=tcp://127.0.0.1:1\n")
        assert services.running(state, env_file) == {"WINE_ASSETS_DASK_SCHEDULER": "tcp://127.0.0.1:1"}
        assert services.run(namespace("status", state, env_file)) == 0
        assert capsys.readouterr().out == f"sleeper          pid {sleeper.pid:<8} running\n"
        assert services.run(namespace("down", state, env_file)) == 0
        assert capsys.readouterr().out == f"stopped sleeper (pid {sleeper.pid})\n"
        assert not sleeper.alive() and services.group_members(sleeper.pid) == set()
    finally:
        kill_if_left(sleeper)


@pytest.fixture
def setsid_sleep() -> Iterator[subprocess.Popen]:
    """`setsid sleep 300`: a process in a session of its own that the services stack did not start."""
    sleeper = subprocess.Popen(["setsid", "sleep", "300"])
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(sleeper.pid).name() != "sleep" or os.getpgid(sleeper.pid) != sleeper.pid:
            assert time.monotonic() < deadline, "setsid sleep 300 did not start"
            time.sleep(0.01)
        yield sleeper
    finally:
        sleeper.kill()
        sleeper.wait()


def where(state_dir: Path, env_file: Path) -> list[str]:
    return ["--state-dir", str(state_dir), "--env-file", str(env_file)]


def still_running(process: subprocess.Popen) -> bool:
    """Whether process is running half a second on (time for a signal sent to it to have ended it)."""
    time.sleep(0.5)
    return process.poll() is None and psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE


@pytest.mark.integration
def test_down_leaves_a_process_recorded_under_a_wrong_start_time_running(tmp_path, capsys, setsid_sleep):
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    pid = setsid_sleep.pid
    actual = psutil.Process(pid).create_time()
    wrong = actual - 3600  # the record's pid, but not the process that had it when it was written
    record(state, [services.Process("redis", pid, wrong, str(state / "redis.log"))], {"X": "1"})
    env_file.write_text("X=1\n")
    why = f"pid {pid} is now 'sleep', started {services._when(actual)}, not at the recorded {services._when(wrong)}"
    assert cli.main(["services", "status", *where(state, env_file)]) == 1
    assert capsys.readouterr().out == f"redis            pid {pid:<8} not ours, left running: {why}\n"
    assert cli.main(["services", "down", *where(state, env_file)]) == 0
    assert capsys.readouterr().out == f"no services were running\nredis (pid {pid}) is not ours, left running: {why}\n"
    assert still_running(setsid_sleep)
    assert not (state / "state.json").exists() and not env_file.exists()  # the stale record is forgotten


@pytest.mark.integration
def test_the_clean_up_before_up_leaves_a_process_that_is_not_ours_running(tmp_path, caplog, setsid_sleep):
    if os.geteuid() == 0:
        require_programs("postgres")  # as root, up runs PostgreSQL as the 'postgres' user its package makes
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    pid = setsid_sleep.pid
    record(state, [services.Process("postgres", pid, psutil.Process(pid).create_time() - 60, "pg.log")], {"X": "1"})
    (state / "postgres").write_text("a file where the cluster's folder belongs\n")  # up fails after its clean-up
    with caplog.at_level(logging.WARNING, logger="wine_assets.services"):
        with pytest.raises(FileExistsError):
            services.up(state, env_file, timeout=5)
    assert still_running(setsid_sleep)
    assert [m for m in caplog.messages if m.startswith(f"postgres (pid {pid}) is not ours, left running: pid {pid}")]
    assert not (state / "state.json").exists()


@pytest.mark.integration
def test_down_stops_a_recorded_process_whose_pid_and_start_time_match(tmp_path, capsys, setsid_sleep):
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    pid = setsid_sleep.pid
    recorded = psutil.Process(pid).create_time() + 1.0  # another reader's whole-second boot time
    record(state, [services.Process("sleeper", pid, recorded, str(state / "sleeper.log"))], {"X": "1"})
    assert cli.main(["services", "down", *where(state, env_file)]) == 0
    assert capsys.readouterr().out == f"stopped sleeper (pid {pid})\n"
    assert services._start_time(pid) is None and services.group_members(pid) == set()


@pytest.mark.integration
def test_a_recorded_leader_that_is_gone_is_forgotten_and_its_leftover_group_is_not_signalled(tmp_path, capsys):
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess; subprocess.Popen(['sleep', '300'])"], start_new_session=True
    )
    started = psutil.Process(leader.pid).create_time()  # readable while it runs and while it is a zombie
    leader.wait(timeout=30)
    left = services.group_members(leader.pid)  # its child, still in the group the leader made
    try:
        assert len(left) == 1
        record(state, [services.Process("dask-worker-1", leader.pid, started, "w.log")], {"X": "1"})
        assert cli.main(["services", "down", *where(state, env_file)]) == 0
        assert capsys.readouterr().out == (
            f"no services were running\ndask-worker-1 (pid {leader.pid}) is gone; processes {min(left)} of its "
            "process group are left running: they cannot be verified as its own\n"
        )
        time.sleep(0.5)
        assert services.group_members(leader.pid) == left
        assert not (state / "state.json").exists()
    finally:
        for pid in left:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.component
def test_a_state_file_that_up_did_not_write_is_refused_and_nothing_signalled(tmp_path, capsys):
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    services.make_state_dir(state)
    document = {"env": {}, "processes": [{"name": "redis", "pid": "abc", "started": 1.0, "log": "r.log"}]}
    (state / "state.json").write_text(json.dumps(document))
    assert cli.main(["services", "down", *where(state, env_file)]) == 1
    assert capsys.readouterr().err == (
        f"wine-assets: error: process 1 of {state / 'state.json'} is not a record `wine-assets services up` wrote "
        "(ValueError: invalid literal for int() with base 10: 'abc'): nothing was signalled\n"
    )
    (state / "state.json").write_text("{not json")
    assert cli.main(["services", "status", *where(state, env_file)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"wine-assets: error: {state / 'state.json'} is not a state file") and err.count("\n") == 1


# -- purge deletes only the folders the stack made --------------------------------------------------------
@pytest.mark.unit
def test_a_state_dir_is_marked_only_when_the_stack_makes_it(tmp_path):
    made = tmp_path / "new" / "state"
    services.make_state_dir(made)
    assert services._not_made_here(made, services.STATE_DIR) is None
    assert oct((made / services.MARKER).stat().st_mode & 0o777) == "0o600"
    assert services._not_made_here(tmp_path / "new", services.STATE_DIR) is not None  # parents are not marked
    (tmp_path / "existing").mkdir()
    services.make_state_dir(tmp_path / "existing")  # there before: not the stack's
    assert not (tmp_path / "existing" / services.MARKER).exists()


@pytest.mark.unit
def test_only_a_real_folder_with_the_stacks_own_marker_counts_as_made_by_it(tmp_path):
    cluster = services.CLUSTER_FOLDER
    marker = services.MARKER
    assert services._not_made_here(tmp_path / "missing", cluster) == "it does not exist"
    (tmp_path / "file").write_text("x")
    assert services._not_made_here(tmp_path / "file", cluster) == "it is not a folder"
    folder = tmp_path / "folder"
    folder.mkdir()
    assert services._not_made_here(folder, cluster) == (
        f"it holds no {marker} file, so `wine-assets services` did not make it"
    )
    (tmp_path / "marked").mkdir()
    services._mark_made(tmp_path / "marked", cluster)
    (folder / marker).symlink_to(tmp_path / "marked" / marker)  # a marker borrowed through a link
    assert services._not_made_here(folder, cluster).startswith(f"its {marker} cannot be read as a plain file (")
    (folder / marker).unlink()
    (folder / marker).mkdir()
    assert services._not_made_here(folder, cluster) == f"its {marker} cannot be read as a plain file (Is a directory)"
    (folder / marker).rmdir()
    os.mkfifo(folder / marker)  # opened without blocking, and never read
    assert services._not_made_here(folder, cluster) == f"its {marker} is not a regular file"
    (folder / marker).unlink()
    (folder / marker).write_text("made by me\n")
    assert services._not_made_here(folder, cluster) == (
        f"its {marker} does not say `wine-assets services` made it as a {cluster}"
    )
    assert services._not_made_here(tmp_path / "marked", services.STATE_DIR) is not None  # marked as the other kind
    (tmp_path / "link").symlink_to(tmp_path / "marked")
    assert services._not_made_here(tmp_path / "link", cluster) == "it is a symbolic link"
    assert services._not_made_here(tmp_path / "marked", cluster) is None
    if os.geteuid() == 0:  # only root can give a file to another user
        os.chown(tmp_path / "marked" / marker, 12345, -1)
        assert (
            services._not_made_here(tmp_path / "marked", cluster) == f"its {marker} belongs to another user (uid 12345)"
        )


@pytest.mark.component
def test_purge_refuses_a_state_dir_it_did_not_make_and_keeps_it_byte_for_byte(tmp_path, capsys):
    folder, env_file = tmp_path / "notes", tmp_path / "services.env"
    folder.mkdir()
    (folder / "thesis.txt").write_text("three years of work\n")
    (folder / "state.json").write_text(json.dumps({"env": {}, "processes": []}))  # it even looks like a state dir
    env_file.write_text("X=1\n")
    before = tree_snapshot(folder)
    assert cli.main(["services", "purge", *where(folder, env_file)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"wine-assets: error: not deleting {folder}: it holds no {services.MARKER} file, so `wine-assets services` "
        "did not make it; nothing was stopped or deleted (delete it by hand if it holds nothing you need)\n"
    )
    assert tree_snapshot(folder) == before and env_file.read_text() == "X=1\n"


@pytest.mark.component
def test_purge_refuses_a_folder_a_hand_edited_postgres_location_names(tmp_path, capsys):
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    record(state, [], {})
    victim = tmp_path / "home"
    (victim / "data").mkdir(parents=True)
    (victim / "data" / "photos.txt").write_text("irreplaceable\n")
    (state / "postgres.location").write_text(str(victim))
    before = (tree_snapshot(state), tree_snapshot(victim))
    assert cli.main(["services", "purge", *where(state, env_file)]) == 1
    assert capsys.readouterr().err == (
        f"wine-assets: error: not deleting {victim} (named by {state / 'postgres.location'}): it holds no "
        f"{services.MARKER} file, so `wine-assets services` did not make it; nothing was stopped or deleted\n"
    )
    assert (tree_snapshot(state), tree_snapshot(victim)) == before
    (state / "postgres.location").write_text(str(tmp_path / "link-to-home"))
    (tmp_path / "link-to-home").symlink_to(victim)
    assert cli.main(["services", "purge", *where(state, env_file)]) == 1
    assert "it is a symbolic link; nothing was stopped or deleted" in capsys.readouterr().err
    assert tree_snapshot(victim) == before[1]


@pytest.mark.component
def test_purge_refuses_a_state_dir_that_is_a_symbolic_link(tmp_path, capsys):
    real, link, env_file = tmp_path / "real", tmp_path / "link", tmp_path / "services.env"
    record(real, [], {})
    link.symlink_to(real)
    before = tree_snapshot(real)
    assert cli.main(["services", "purge", *where(link, env_file)]) == 1
    assert capsys.readouterr().err.startswith(f"wine-assets: error: not deleting {link}: it is a symbolic link;")
    assert link.is_symlink() and tree_snapshot(real) == before


@pytest.mark.component
def test_purge_removes_symbolic_links_inside_as_links_and_keeps_their_targets(tmp_path, capsys):
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    record(state, [], {})
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "keep.txt").write_text("kept\n")
    (outside / "sub" / "deep.txt").write_text("deep\n")
    (state / "redis").mkdir()
    (state / "redis" / "to-folder").symlink_to(outside, target_is_directory=True)
    (state / "to-file").symlink_to(outside / "keep.txt")
    cluster = tmp_path / "cluster"  # a cluster folder outside the state dir, as the stack makes one
    cluster.mkdir()
    services._mark_made(cluster, services.CLUSTER_FOLDER)
    (cluster / "data").mkdir()
    (cluster / "data" / "to-sub").symlink_to(outside / "sub", target_is_directory=True)
    (state / "postgres.location").write_text(str(cluster))
    before = tree_snapshot(outside)
    assert cli.main(["services", "purge", *where(state, env_file)]) == 0
    assert capsys.readouterr().out == f"services stopped; {state} and the PostgreSQL cluster deleted\n"
    assert not os.path.lexists(state) and not os.path.lexists(cluster)
    assert tree_snapshot(outside) == before and (outside / "sub").is_dir()


@pytest.mark.integration
def test_the_module_runs_as_a_command(tmp_path):
    done = subprocess.run(
        [str(BIN / "python"), "-m", "wine_assets.services", "status", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert (done.returncode, done.stdout) == (1, "no services recorded\n")


# -- checking servers that answer, or answer wrongly -------------------------------------------------------
@pytest.mark.unit
def test_a_broker_that_is_not_redis_is_named(capsys, monkeypatch, tmp_path):
    with pytest.raises(services.ServiceError) as caught:
        services.check({"WINE_ASSETS_CELERY_BROKER": "amqp://127.0.0.1:5672//"}, postgres=False, celery=True)
    assert str(caught.value) == "WINE_ASSETS_CELERY_BROKER = 'amqp://127.0.0.1:5672//' is not a redis:// URL"
    monkeypatch.delenv("WINE_ASSETS_CELERY_BROKER", raising=False)
    assert services.run(namespace("check", tmp_path, tmp_path / "env", celery=True)) == 1
    assert capsys.readouterr().err == "wine-assets: error: WINE_ASSETS_CELERY_BROKER = '' is not a redis:// URL\n"


@pytest.fixture
def wrong_redis() -> Iterator[int]:
    """A port on 127.0.0.1 that answers every connection as a password-protected Redis does."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(10)

    def answer() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.recv(64)
            connection.sendall(b"-NOAUTH Authentication required.\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(10)


@pytest.mark.component
def test_a_broker_that_does_not_answer_pong_is_named(wrong_redis):
    broker = f"redis://:secret@127.0.0.1:{wrong_redis}/0"
    with pytest.raises(services.ServiceError) as caught:
        services.check({"WINE_ASSETS_CELERY_BROKER": broker}, postgres=False, celery=True)
    assert str(caught.value) == (
        f"Redis at 127.0.0.1:{wrong_redis} (the Celery broker) does not answer: it did not answer PING with PONG"
    )


@pytest.mark.integration
def test_postgres_alone_is_checked_and_an_existing_database_is_kept(services_env):
    env = {name: services_env[name] for name in services.ENV_NAMES[:5]}
    host, port, password = env["DAGSTER_PG_HOST"], int(env["DAGSTER_PG_PORT"]), env["DAGSTER_PG_PASSWORD"]
    services.create_database(host, port, password, env["DAGSTER_PG_DB"])  # it exists: nothing to do
    assert services.check(env) == [f"PostgreSQL database '{env['DAGSTER_PG_DB']}' at {host}:{port} answers"]


@pytest.mark.integration
def test_a_celery_worker_that_cannot_start_is_reported_with_its_log(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("WINE_ASSETS_CELERY_")}
    with pytest.raises(services.ServiceError) as caught:
        services.start_celery_worker(tmp_path / "worker", env, concurrency=1, timeout=120)
    message = str(caught.value)
    assert message.startswith("the Celery worker did not start:\n")
    assert "WINE_ASSETS_CELERY_BROKER is not set: run `make services`" in message
    assert "WINE_ASSETS_CELERY_BROKER is not set" in (tmp_path / "worker" / "worker.log").read_text()


def _processes_with(text: str) -> list[int]:
    """The live processes (zombies excluded) whose command line contains text."""
    return [
        process.pid
        for process in psutil.process_iter(["cmdline", "status"])
        if process.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(process.info["cmdline"] or [])
    ]


@pytest.mark.integration
def test_a_celery_worker_not_ready_in_time_is_killed(tmp_path):
    env = {**os.environ, "WINE_ASSETS_CELERY_BROKER": "redis://127.0.0.1:1/0"}
    env["WINE_ASSETS_CELERY_BACKEND"] = "redis://127.0.0.1:1/1"
    folder = tmp_path / "slow-worker"
    with pytest.raises(services.ServiceError, match="^the Celery worker did not start:"):
        services.start_celery_worker(folder, env, concurrency=1, timeout=0)
    deadline = time.monotonic() + 10
    while _processes_with(f"--hostname=wine-{folder.name}@"):  # SIGKILL was sent to its group
        assert time.monotonic() < deadline, "the worker's process group outlived SIGKILL"
        time.sleep(0.05)


@pytest.mark.integration
def test_up_stops_the_servers_it_started_when_a_later_one_cannot_start(tmp_path):
    require_programs("postgres")
    state, env_file = tmp_path / "state", tmp_path / "services.env"
    services.make_state_dir(state)
    (state / "redis").write_text("a file where Redis' folder belongs\n")
    try:
        with pytest.raises(FileExistsError) as caught:
            services.up(state, env_file, timeout=60)
        assert caught.value.filename == str(state / "redis")
        cluster = services._fallback_dir(state) or state / "postgres"
        assert (cluster / "data" / "PG_VERSION").is_file()  # PostgreSQL was made and started ...
        assert "database system is shut down" in (state / "postgres.log").read_text()  # ... and stopped again
        assert not (cluster / "data" / "postmaster.pid").exists()
        assert not env_file.exists() and not (state / "state.json").exists()
    finally:
        services.purge(state, env_file)
