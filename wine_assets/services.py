"""Local servers for scaling out: PostgreSQL, Redis and a Dask cluster on 127.0.0.1.

``make services`` (``wine-assets services up``) starts each on a free port, waits until it
answers, records each process's pid and start time (psutil's create time) in
``<state dir>/state.json`` and writes the addresses to ``.services.env`` as shell assignments.
``make services-down`` stops exactly the recorded processes, each with its process group, and
only while psutil reports the same pid with the same start time: a pid that another process has
taken is reported "not ours" and never signalled. Both are idempotent. ``purge`` deletes only the
folders the stack made (each holds its marker file) and follows no symbolic link. The test
fixtures start and stop the servers through these same functions.

These are development servers: PostgreSQL runs with ``fsync=off``, Redis keeps nothing on disk,
and none of them asks local users for credentials but PostgreSQL. The PostgreSQL password is
made up at first start and kept in the state dir and the env file (both git-ignored, mode 0600).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".services")
DEFAULT_ENV_FILE = Path(".services.env")
PG_USER = "wine_assets"
PG_DB = "dagster"
DASK_WORKERS = 2
ENV_NAMES = (
    "DAGSTER_PG_HOST",
    "DAGSTER_PG_PORT",
    "DAGSTER_PG_USER",
    "DAGSTER_PG_PASSWORD",
    "DAGSTER_PG_DB",
    "WINE_ASSETS_CELERY_BROKER",
    "WINE_ASSETS_CELERY_BACKEND",
    "WINE_ASSETS_DASK_SCHEDULER",
)
HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A server that could not be started or found; the message says which and where its log is."""


# -- processes: started in their own session, identified by pid and start time --
# Start times are compared with this much slack, in seconds. psutil's create_time is the kernel's
# clock ticks since boot plus the boot time, and the boot time (/proc/stat's btime) is a whole number
# of seconds derived from the wall clock, read again on each call: the `up` that recorded a server
# and a later `down` can see it one second apart once NTP has adjusted the clock. A process that took
# over a recorded pid would have had to start within that window, after the pid counter wrapped. A
# larger clock step errs on the safe side: the servers are then reported "not ours" and left running.
START_TIME_TOLERANCE = 1.5
OURS, GONE, NOT_OURS = "ours", "gone", "not ours"


def _start_time(pid: int) -> float | None:
    """psutil's create time of a live process (a zombie counts as gone), or None if there is none."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except (psutil.NoSuchProcess, ValueError):  # ValueError: a negative pid
        return None


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) + f".{int(timestamp * 100) % 100:02d}"


@dataclass(frozen=True)
class Process:
    """A server as the state file records it: its pid and psutil's create time of that pid."""

    name: str
    pid: int
    started: float
    log: str
    stop_signal: int = signal.SIGTERM

    def identify(self) -> tuple[str, str]:
        """OURS while the pid is the recorded process (same pid, same start time), GONE when no
        process has the pid, NOT_OURS when another one has it; with a sentence saying why."""
        if self.pid <= 1:  # 0 would signal our own process group, 1 is init
            return NOT_OURS, f"pid {self.pid} is never a server's"
        try:
            process = psutil.Process(self.pid)
            with process.oneshot():
                zombie = process.status() == psutil.STATUS_ZOMBIE
                created, command = process.create_time(), process.name()
        except psutil.NoSuchProcess:
            return GONE, f"pid {self.pid} is gone"
        except psutil.AccessDenied:
            return NOT_OURS, f"pid {self.pid} cannot be inspected by this user"
        if zombie:
            return GONE, f"pid {self.pid} has exited"
        if abs(created - self.started) > START_TIME_TOLERANCE:
            return NOT_OURS, (
                f"pid {self.pid} is now '{command}', started {_when(created)}, "
                f"not at the recorded {_when(self.started)}"
            )
        return OURS, f"pid {self.pid} is the '{command}' started {_when(created)}"

    def alive(self) -> bool:
        return self.identify()[0] == OURS

    def stop(self, timeout: float = 20.0) -> bool:
        """Signal the process and its process group, then kill what is left; only while the pid is
        the recorded process. Returns whether it was (False: gone, or another's and left alone).

        Every server is started as the leader of its own group, so the group's id is its pid. The
        kernel hands a pid out again only once no process has it as its pid or its group id, so
        once the leader is verified here, the group stays this server's while any member is left.
        """
        if not self.alive():
            return False
        group = _process_group(self.pid) == self.pid
        self._signal(self.stop_signal, group)
        if self._wait_gone(timeout):
            return True
        log.warning("%s (pid %d) did not stop in %.0f s: killing its process group", self.name, self.pid, timeout)
        self._signal(signal.SIGKILL, group)
        if not self._wait_gone(10):
            raise ServiceError(f"{self.name} (process group {self.pid}) is still running after SIGKILL")
        return True

    def _signal(self, signum: int, group: bool) -> None:
        if group:
            _signal_group(self.pid, signum)
            return
        try:  # a recorded process that left its group (none of the servers does): itself only
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap(self.pid)
            if not self.alive() and not group_members(self.pid):
                return True
            time.sleep(0.1)
        return False


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _reap(pid: int) -> None:
    """Collect the exit status if this process started the server (else it is init's to reap)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise ServiceError(
            f"not allowed to signal process group {pgid}: stop the services as the user who started them"
        ) from None


def group_members(pgid: int) -> set[int]:
    """The processes of a process group that have not exited (zombies excluded)."""
    members = set()
    for process in psutil.process_iter(["status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and _process_group(process.pid) == pgid:
            members.add(process.pid)
    return members


def _spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    user: str | None = None,
    stop_signal=signal.SIGTERM,
    env: dict[str, str] | None = None,
) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
            env=env,
            cwd=log_path.parent,
        )
    started = _start_time(proc.pid)  # Popen returns once the program is executing
    if started is None:
        raise ServiceError(f"{name} exited at once; see {log_path}")
    # Popen's handle is dropped on purpose: the server outlives this process. It is stopped by
    # pid and start time from the state file (and reaped by init once this process has exited).
    return Process(name, proc.pid, started, str(log_path), int(stop_signal))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait(name: str, process: Process, ready, timeout: float) -> None:
    """Poll ready() until it is true; fail early, with the log's tail, if the process died."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if not process.alive():
            raise ServiceError(f"{name} exited while starting:\n{_tail(process.log)}")
        try:
            if ready():
                return
        except Exception as exc:  # noqa: BLE001 - not ready yet; the last error is reported on timeout
            last_error = exc
        time.sleep(0.2)
    raise ServiceError(
        f"{name} did not answer within {timeout:.0f} s ({last_error}); log {process.log}:\n{_tail(process.log)}"
    )


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- PostgreSQL --
def _pg_bin(program: str) -> str:
    """A PostgreSQL server program: Debian keeps them in /usr/lib/postgresql/<major>/bin, off PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"), key=lambda p: int(p.parts[-3]))
    if candidates:
        return str(candidates[-1])
    found = shutil.which(program)
    if found:
        return found
    raise ServiceError(f"PostgreSQL's {program} was not found: install the server (apt-get install postgresql)")


def _server_user() -> str | None:
    """initdb and postgres refuse to run as root: as root they run as the 'postgres' user."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError("running as root, and there is no 'postgres' user to run PostgreSQL as") from None
    return "postgres"


def _reachable_by(user: str | None, path: Path) -> bool:
    if user is None:
        return True
    probe = ["test", "-w", str(path), "-a", "-x", str(path)]
    return subprocess.run(probe, user=user, group=user, extra_groups=[], check=False).returncode == 0


def _pg_dirs(state_dir: Path, user: str | None) -> Path:
    """The folder for the cluster: under the state dir, unless the server's user cannot reach it
    (a project under /root, say); then a private folder made by mkdtemp under /var/tmp, whose
    path is recorded in <state dir>/postgres.location so that the next start finds it."""
    make_state_dir(state_dir)
    wanted = state_dir / "postgres"
    wanted.mkdir(parents=True, exist_ok=True)
    if user is not None:
        shutil.chown(wanted, user, user)
    if _reachable_by(user, wanted):
        return wanted
    recorded = _fallback_dir(state_dir)
    if recorded is not None:
        return recorded
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())
    fallback = Path(tempfile.mkdtemp(prefix="wine-assets-postgres-", dir=base))
    _mark_made(fallback, CLUSTER_FOLDER)
    shutil.chown(fallback, user, user)  # type: ignore[arg-type]
    if not _reachable_by(user, fallback):
        raise ServiceError(f"the '{user}' user can reach neither {wanted} nor {fallback}")
    _write_private(state_dir / "postgres.location", str(fallback))
    log.warning("the '%s' user cannot reach %s: the cluster lives in %s", user, wanted, fallback)
    return fallback


def _fallback_dir(state_dir: Path) -> Path | None:
    """The recorded folder of a cluster outside the state dir, while it is a real folder that the
    services stack made (a folder named by a hand-edited postgres.location is never used)."""
    location = state_dir / "postgres.location"
    if not location.exists():
        return None
    path = Path(location.read_text().strip())
    if not path.is_absolute() or _not_made_here(path, CLUSTER_FOLDER) is not None:
        return None
    return path


# -- the folders the services stack makes, and purge, which deletes only those --
MARKER = ".made-by-wine-assets-services"
STATE_DIR, CLUSTER_FOLDER = "state dir", "PostgreSQL cluster folder"


def _marker_text(kind: str) -> str:
    return f"This {kind} was made by `wine-assets services`; `wine-assets services purge` deletes it.\n"


def _mark_made(folder: Path, kind: str) -> None:
    """Write the marker that lets purge delete folder (O_EXCL, O_NOFOLLOW: never through a link)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with os.fdopen(os.open(folder / MARKER, flags, 0o600), "w") as out:
        out.write(_marker_text(kind))


def make_state_dir(state_dir: Path) -> None:
    """Make the state dir, marked as the services stack's, unless it exists (then it is left as it is:
    a folder that was there before is not marked, and purge will not delete it)."""
    try:
        state_dir.mkdir(parents=True)
    except FileExistsError:
        return
    _mark_made(state_dir, STATE_DIR)


def _not_made_here(folder: Path, kind: str) -> str | None:
    """None if folder is a real folder holding the marker the services stack wrote when it made it
    as a `kind`; else why not."""
    try:
        found = os.lstat(folder)
    except FileNotFoundError:
        return "it does not exist"
    if stat.S_ISLNK(found.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(found.st_mode):
        return "it is not a folder"
    marker = folder / MARKER
    try:
        with os.fdopen(os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as source:
            opened = os.fstat(source.fileno())
            owner, regular = opened.st_uid, stat.S_ISREG(opened.st_mode)
            text = source.read(1024) if regular else b""
    except FileNotFoundError:
        return f"it holds no {MARKER} file, so `wine-assets services` did not make it"
    except OSError as exc:  # ELOOP: the marker is a symbolic link
        return f"its {MARKER} cannot be read as a plain file ({exc.strerror})"
    if not regular:
        return f"its {MARKER} is not a regular file"
    if owner != os.geteuid():
        return f"its {MARKER} belongs to another user (uid {owner})"
    if text != _marker_text(kind).encode():
        return f"its {MARKER} does not say `wine-assets services` made it as a {kind}"
    return None


def _folders_to_purge(state_dir: Path) -> list[Path]:
    """The PostgreSQL cluster's folder outside the state dir (if one is recorded) and the state dir,
    each checked to be one the services stack made; ServiceError naming the first that is not."""
    if not os.path.lexists(state_dir):
        return []
    reason = _not_made_here(state_dir, STATE_DIR)
    if reason is not None:
        raise ServiceError(
            f"not deleting {state_dir}: {reason}; nothing was stopped or deleted (delete it by hand if it holds "
            "nothing you need)"
        )
    folders = [state_dir]
    location = state_dir / "postgres.location"
    if location.is_file():
        cluster = Path(location.read_text().strip())
        if not cluster.is_absolute():
            raise ServiceError(f"not deleting {cluster!s} (named by {location}): it is not an absolute path")
        if os.path.lexists(cluster):
            reason = _not_made_here(cluster, CLUSTER_FOLDER)
            if reason is not None:
                raise ServiceError(
                    f"not deleting {cluster} (named by {location}): {reason}; nothing was stopped or deleted"
                )
            folders.insert(0, cluster)
    return folders


def _delete_tree(folder: Path) -> None:
    """Delete folder and what is in it without following a symbolic link: a link inside is removed
    as a link, its target kept."""
    # shutil.rmtree works on file descriptors where the platform allows it (Linux does): it opens each
    # folder with O_NOFOLLOW and checks it is the one it listed, so a link is never entered, even one
    # swapped in while it runs. Elsewhere it could follow one: refuse there.
    if not shutil.rmtree.avoids_symlink_attacks:
        raise ServiceError(f"not deleting {folder}: shutil.rmtree could follow symbolic links on this platform")
    failures: list[str] = []

    def failed(function, path, error) -> None:  # noqa: ANN001 - shutil's callback
        failures.append(f"{path}: {error[1] if isinstance(error, tuple) else error}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=failed)
    else:
        shutil.rmtree(folder, onerror=failed)
    if failures:
        raise ServiceError(f"could not delete all of {folder}: {failures[0]}")


def purge(state_dir: Path = DEFAULT_STATE_DIR, env_file: Path = DEFAULT_ENV_FILE) -> DownReport:
    """down(), then delete the servers' data: the state dir and the PostgreSQL cluster's folder,
    only if the services stack made them (its marker file is inside); otherwise ServiceError, naming
    the folder and why, before anything is stopped or deleted."""
    state_dir = Path(os.path.abspath(state_dir))  # not resolved: a state dir that is a link is refused
    folders = _folders_to_purge(state_dir)
    report = down(state_dir, env_file)
    for folder in folders:
        _delete_tree(folder)
    return report


def _pg_connect(host: str, port: int, password: str, dbname: str):
    import psycopg2

    return psycopg2.connect(host=host, port=port, user=PG_USER, password=password, dbname=dbname, connect_timeout=3)


def start_postgres(state_dir: Path, timeout: float) -> tuple[Process, dict[str, str]]:
    user = _server_user()
    root = _pg_dirs(state_dir, user)
    data = root / "data"
    secret_file = state_dir / "postgres.password"
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)
        password = secrets.token_urlsafe(24)
        pwfile = root / "initdb.pw"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if user is not None:
            shutil.chown(pwfile, user, user)
        try:
            done = subprocess.run(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(data),
                    "-U",
                    PG_USER,
                    "--pwfile",
                    str(pwfile),
                    "--auth",
                    "scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ],
                user=user,
                group=user,
                extra_groups=[] if user else None,
                capture_output=True,
                text=True,
                check=False,
                cwd=root,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise ServiceError(f"initdb failed for {data}:\n{done.stderr.strip()}")
        _write_private(secret_file, password)
    if not secret_file.exists():
        raise ServiceError(
            f"{data} exists but its password file {secret_file} is gone: `make services-down` "
            f"and remove {data} to start afresh"
        )
    password = secret_file.read_text().strip()
    port = free_port()
    sockets = root / "sockets"
    sockets.mkdir(exist_ok=True)
    if user is not None:
        shutil.chown(sockets, user, user)
    process = _spawn(
        "postgres",
        [
            _pg_bin("postgres"),
            "-D",
            str(data),
            "-h",
            HOST,
            "-p",
            str(port),
            "-k",
            str(sockets),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ],
        state_dir / "postgres.log",
        user=user,
        stop_signal=signal.SIGINT,  # SIGINT: PostgreSQL's fast shutdown
    )

    def ready() -> bool:
        _pg_connect(HOST, port, password, "postgres").close()
        return True

    _wait(f"PostgreSQL on {HOST}:{port}", process, ready, timeout)
    create_database(HOST, port, password, PG_DB)
    env = {
        "DAGSTER_PG_HOST": HOST,
        "DAGSTER_PG_PORT": str(port),
        "DAGSTER_PG_USER": PG_USER,
        "DAGSTER_PG_PASSWORD": password,
        "DAGSTER_PG_DB": PG_DB,
    }
    return process, env


def create_database(host: str, port: int, password: str, name: str) -> None:
    """CREATE DATABASE name, unless it exists (a test gives each Dagster instance its own)."""
    connection = _pg_connect(host, port, password, "postgres")
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


# -- Redis --
def _redis_ping(port: int, host: str = HOST) -> bool:
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def start_redis(state_dir: Path, timeout: float) -> tuple[Process, dict[str, str]]:
    server = shutil.which("redis-server")
    if server is None:
        raise ServiceError("redis-server was not found: install it (apt-get install redis-server)")
    port = free_port()
    folder = state_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    process = _spawn(
        "redis",
        [
            server,
            "--bind",
            HOST,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
            "--databases",
            "256",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ],
        state_dir / "redis.log",
    )
    _wait(f"Redis on {HOST}:{port}", process, lambda: _redis_ping(port), timeout)
    # Database 0 carries the Celery queue, 1 the results: a flush of one leaves the other.
    return process, {
        "WINE_ASSETS_CELERY_BROKER": f"redis://{HOST}:{port}/0",
        "WINE_ASSETS_CELERY_BACKEND": f"redis://{HOST}:{port}/1",
    }


# -- Dask --
def start_dask(state_dir: Path, timeout: float) -> tuple[list[Process], dict[str, str]]:
    port = free_port()
    address = f"tcp://{HOST}:{port}"
    python = sys.executable
    scheduler = _spawn(
        "dask-scheduler",
        [python, "-m", "distributed.cli.dask_scheduler", "--host", HOST, "--port", str(port), "--no-dashboard"],
        state_dir / "dask-scheduler.log",
    )
    _wait(f"the Dask scheduler at {address}", scheduler, lambda: _redis_like_open(port), timeout)
    workers = [
        _spawn(
            f"dask-worker-{index}",
            [
                python,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--host",
                HOST,
                "--nthreads",
                "1",
                "--no-dashboard",
                "--name",
                f"wine-assets-{index}",
                "--local-directory",
                str(state_dir / "dask"),
            ],
            state_dir / f"dask-worker-{index}.log",
        )
        for index in range(1, DASK_WORKERS + 1)
    ]

    def all_workers() -> bool:
        from distributed import Client

        with Client(address, timeout=5) as client:
            client.wait_for_workers(DASK_WORKERS, timeout=5)
        return True

    _wait(f"{DASK_WORKERS} Dask workers at {address}", workers[0], all_workers, timeout)
    return [scheduler, *workers], {"WINE_ASSETS_DASK_SCHEDULER": address}


def _redis_like_open(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=2):
        return True


# -- Celery workers (make worker starts one in the foreground; tests and benchmarks in the background) --
CELERY_WORKER = [
    "-m",
    "celery",
    "-A",
    "wine_assets.pipeline.celery_app",
    "worker",
    "-Q",
    "dagster",
    "--prefetch-multiplier=1",
    "--loglevel=INFO",
]


def start_celery_worker(
    folder: Path, env: Mapping[str, str], concurrency: int = 2, timeout: float = 90
) -> subprocess.Popen:
    """`make worker`'s command in its own process group, started in `folder`, its log in
    folder/worker.log; returns once the worker says it is ready."""
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "worker.log"
    with open(log_path, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, *CELERY_WORKER, f"--concurrency={concurrency}", f"--hostname=wine-{folder.name}@%h"],
            cwd=folder,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while " ready." not in log_path.read_text(errors="replace"):
        if worker.poll() is not None or time.monotonic() > deadline:
            if worker.poll() is None:
                _signal_group(worker.pid, signal.SIGKILL)
            raise ServiceError(f"the Celery worker did not start:\n{_tail(str(log_path))}")
        time.sleep(0.3)
    return worker


# -- the state file and the env file --
def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def env_file_text(env: dict[str, str]) -> str:
    lines = ["# Written by `make services` (wine_assets.services); `make services-down` removes it."]
    lines += [f"{name}={shlex.quote(env[name])}" for name in ENV_NAMES]
    return "\n".join(lines) + "\n"


def read_env_file(path: Path) -> dict[str, str]:
    """The assignments of an env file written by up(), as a mapping."""
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = shlex.split(value)[0] if value else ""
    return env


def _load_state(state_dir: Path) -> dict:
    path = state_dir / "state.json"
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(f"{path} is not a state file `wine-assets services up` wrote ({exc})") from None


def _processes(state: dict, path: Path) -> list[Process]:
    """The records of a state file (path, for messages), each checked to be what up() writes."""
    records = state.get("processes", [])
    if not isinstance(records, list):
        raise ServiceError(f"{path}: 'processes' is not a list of records: nothing was signalled")
    processes = []
    for index, item in enumerate(records):
        try:
            processes.append(
                Process(
                    name=str(item["name"]),
                    pid=int(item["pid"]),
                    started=float(item["started"]),
                    log=str(item["log"]),
                    stop_signal=int(signal.Signals(item.get("stop_signal", signal.SIGTERM))),
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ServiceError(
                f"process {index + 1} of {path} is not a record `wine-assets services up` wrote "
                f"({type(exc).__name__}: {exc}): nothing was signalled"
            ) from None
    return processes


@dataclass
class DownReport:
    """What down() did with the recorded processes: 'name (pid N)' for each one stopped, and a
    sentence for each left alone (its pid is another process's now, or its leftover group cannot
    be verified)."""

    stopped: list[str] = field(default_factory=list)
    left_running: list[str] = field(default_factory=list)


def running(state_dir: Path = DEFAULT_STATE_DIR, env_file: Path = DEFAULT_ENV_FILE) -> dict[str, str] | None:
    """The env of the servers up() started, if every one of them is still running; else None."""
    state_dir = state_dir.resolve()
    state = _load_state(state_dir)
    processes = _processes(state, state_dir / "state.json")
    env = state.get("env")
    if processes and all(process.alive() for process in processes) and env_file.exists() and isinstance(env, dict):
        return env
    return None


@contextlib.contextmanager
def _locked(state_dir: Path):
    """One up() or down() at a time per state dir (two `make services` at once start one set)."""
    make_state_dir(state_dir)
    with open(state_dir / "lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


def _start_with_retry(starter, state_dir: Path, timeout: float, attempts: int = 3):  # noqa: ANN001, ANN202
    """A free port is only free until someone else binds it: a server that could not start is
    tried again on another port."""
    for attempt in range(1, attempts + 1):
        try:
            return starter(state_dir, timeout)
        except ServiceError as exc:
            if attempt == attempts or "not found" in str(exc):
                raise
            log.warning("%s; trying again on another port", str(exc).splitlines()[0])
    raise AssertionError("unreachable")


def up(state_dir: Path = DEFAULT_STATE_DIR, env_file: Path = DEFAULT_ENV_FILE, timeout: float = 60.0) -> dict[str, str]:
    """Start the servers (or keep the ones already running), wait for each, write the env file."""
    state_dir = state_dir.resolve()
    with _locked(state_dir):
        already = running(state_dir, env_file)
        if already is not None:
            return already
        for line in _down(state_dir, env_file).left_running:  # whatever is half up goes first
            log.warning("%s", line)
        started: list[Process] = []
        env: dict[str, str] = {}
        try:
            for starter in (start_postgres, start_redis):
                process, values = _start_with_retry(starter, state_dir, timeout)
                started.append(process)
                env.update(values)
            processes, values = _start_with_retry(start_dask, state_dir, timeout)
            started.extend(processes)
            env.update(values)
        except BaseException:
            for process in reversed(started):
                process.stop()
            raise
        _write_private(
            state_dir / "state.json", json.dumps({"env": env, "processes": [vars(p) for p in started]}, indent=2)
        )
        _write_private(env_file, env_file_text(env))
        return env


def down(state_dir: Path = DEFAULT_STATE_DIR, env_file: Path = DEFAULT_ENV_FILE) -> DownReport:
    """Stop exactly the processes up() recorded, each only while its pid and start time match the
    record; forget the records; remove the env file."""
    state_dir = state_dir.resolve()
    if not state_dir.exists():
        env_file.unlink(missing_ok=True)
        return DownReport()
    with _locked(state_dir):
        return _down(state_dir, env_file)


def _down(state_dir: Path, env_file: Path) -> DownReport:
    report = DownReport()
    for process in reversed(_processes(_load_state(state_dir), state_dir / "state.json")):
        identity, why = process.identify()
        if identity == OURS and process.stop():
            report.stopped.append(f"{process.name} (pid {process.pid})")
        elif identity == NOT_OURS:
            report.left_running.append(f"{process.name} (pid {process.pid}) is not ours, left running: {why}")
        elif identity == GONE and group_members(process.pid):
            # The leader is gone: a group with its id may be the rest of the server, or the group of a
            # process that had the pid since and has exited too. Nothing tells them apart: not signalled.
            members = ", ".join(str(pid) for pid in sorted(group_members(process.pid)))
            report.left_running.append(
                f"{process.name} (pid {process.pid}) is gone; processes {members} of its process group are "
                "left running: they cannot be verified as its own"
            )
    (state_dir / "state.json").unlink(missing_ok=True)
    env_file.unlink(missing_ok=True)
    return report


def status(state_dir: Path = DEFAULT_STATE_DIR) -> list[tuple[str, int, bool]]:
    """(name, pid, running) for each recorded process; running only while it is the recorded process."""
    state_dir = state_dir.resolve()
    return [(p.name, p.pid, p.alive()) for p in _processes(_load_state(state_dir), state_dir / "state.json")]


def _status_lines(state_dir: Path) -> list[tuple[str, bool]]:
    lines, state_dir = [], state_dir.resolve()
    for process in _processes(_load_state(state_dir), state_dir / "state.json"):
        identity, why = process.identify()
        word = {OURS: "running", GONE: "stopped"}.get(identity, f"not ours, left running: {why}")
        lines.append((f"{process.name:16} pid {process.pid:<8} {word}", identity == OURS))
    return lines


def check(env: Mapping[str, str], *, postgres: bool = True, celery: bool = False) -> list[str]:
    """Whether the servers a run needs answer: the PostgreSQL database of the DAGSTER_PG_*
    variables, and for Celery the Redis broker and at least one worker. A line per server;
    raises ServiceError naming the first that does not answer."""
    lines = []
    if postgres:
        missing = [name for name in ENV_NAMES[:5] if not env.get(name)]
        if missing:
            raise ServiceError(f"{', '.join(missing)} not set (the PostgreSQL instance reads them)")
        where = f"PostgreSQL database '{env['DAGSTER_PG_DB']}' at {env['DAGSTER_PG_HOST']}:{env['DAGSTER_PG_PORT']}"
        import psycopg2

        try:
            psycopg2.connect(
                host=env["DAGSTER_PG_HOST"],
                port=int(env["DAGSTER_PG_PORT"]),
                user=env["DAGSTER_PG_USER"],
                password=env["DAGSTER_PG_PASSWORD"],
                dbname=env["DAGSTER_PG_DB"],
                connect_timeout=5,
            ).close()
        except (psycopg2.Error, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ServiceError(f"{where} does not answer: {first} (start it with make services)") from None
        lines.append(f"{where} answers")
    if celery:
        broker = env.get("WINE_ASSETS_CELERY_BROKER", "")
        if not broker.startswith("redis://"):
            raise ServiceError(f"WINE_ASSETS_CELERY_BROKER = {broker!r} is not a redis:// URL")
        host_port = broker.removeprefix("redis://").split("@")[-1].split("/")[0]
        host, _, port = host_port.partition(":")
        try:
            if not _redis_ping(int(port or 6379), host):
                raise OSError("it did not answer PING with PONG")
        except (OSError, ValueError) as exc:
            raise ServiceError(f"Redis at {host_port} (the Celery broker) does not answer: {exc}") from None
        lines.append(f"Redis at {host_port} (the Celery broker) answers")
        # A run with no worker on its queue would wait for ever: ask the workers to answer.
        from celery import Celery

        app = Celery("wine_assets_check", broker=broker, backend=env.get("WINE_ASSETS_CELERY_BACKEND") or None)
        replies = app.control.ping(timeout=3.0)
        if not replies:
            raise ServiceError(f"no Celery worker answers on {host_port}: start one with make worker")
        lines.append(f"{len(replies)} Celery worker(s) answer: {', '.join(sorted(k for r in replies for k in r))}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=("up", "down", "status", "purge", "check"),
        help="start, stop, list, stop and delete their data, or check that the servers in the environment answer",
    )
    parser.add_argument("--postgres", action="store_true", help="check: the PostgreSQL database of DAGSTER_PG_*")
    parser.add_argument("--celery", action="store_true", help="check: the Celery broker and a worker")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="default: .services")
    parser.add_argument("--env-file", type=Path, default=DEFAULT_ENV_FILE, help="default: .services.env")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each server (default 60)")


def _print_down(report: DownReport) -> None:
    print("stopped " + ", ".join(report.stopped) if report.stopped else "no services were running")
    for line in report.left_running:
        print(line)


def run(args: argparse.Namespace) -> int:
    """The `wine-assets services` command: 0 on success, 1 with a message on stderr otherwise."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.action == "up":
            already = running(args.state_dir, args.env_file) is not None
            env = up(args.state_dir, args.env_file, args.timeout)
            print(f"services {'already running' if already else 'up'}; addresses in {args.env_file}:")
            for name in ENV_NAMES:
                print(f"  {name}={'***' if 'PASSWORD' in name else env[name]}")
        elif args.action == "down":
            _print_down(down(args.state_dir, args.env_file))
        elif args.action == "check":
            both = not (args.postgres or args.celery)
            for line in check(os.environ, postgres=args.postgres or both, celery=args.celery or both):
                print(line)
        elif args.action == "purge":
            for line in purge(args.state_dir, args.env_file).left_running:
                print(line)
            print(f"services stopped; {args.state_dir} and the PostgreSQL cluster deleted")
        else:
            rows = _status_lines(args.state_dir)
            if not rows:
                print("no services recorded")
            for line, _ in rows:
                print(line)
            return 0 if rows and all(ours for _, ours in rows) else 1
    except ServiceError as exc:
        print(f"wine-assets: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m wine_assets.services", description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
