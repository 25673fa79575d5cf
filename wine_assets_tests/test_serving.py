"""`wine-assets serve` as real processes: uvicorn with two workers in its own process group on a free
port of 127.0.0.1, for what only real processes show: several workers' metrics merged in
multiprocess mode, a release seen by every worker under load, a killed worker replaced, SIGTERM
draining the request in flight, promtool and a real Prometheus on the live metrics, the
schemathesis CLI over HTTP, and the command's exit codes. Everything else about the API is in
test_serving_app.py, in-process.

One server serves the tests that share the xdist group "serving" (one xdist worker runs them, in
this file's order): the read-only tests first, then the release (v2 becomes production), then the
worker kill, and last SIGTERM, which stops it."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import yaml

from wine_assets.validation import FEATURE_COLUMNS

from .serving_support import FEEDBACK_TOKENS, ROW, Versions, bearer, metric_value, publish
from .support import BIN, free_port, require_programs, run_program, start_in_group, stop_group

pytestmark = pytest.mark.integration

POLL = 0.5
SHARED = pytest.mark.xdist_group("serving")
HEAD_TIMEOUT = 2.0  # serving.header_timeout_seconds of the shared server


# -- a server in a subprocess --------------------------------------------------------------------
@dataclass
class Server:
    process: subprocess.Popen
    url: str
    folder: Path
    log: Path

    @property
    def registry(self) -> Path:
        return self.folder / "registry"

    @property
    def prediction_log(self) -> Path:
        return self.folder / "predictions.sqlite"

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


def start_server(folder: Path, workers: int = 1, wait_ready: bool = True, **serving) -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"reload_interval_seconds": POLL, "log_path": "predictions.sqlite", "tokens": FEEDBACK_TOKENS, **serving}
    (folder / "params.yaml").write_text(yaml.safe_dump({"paths": {"registry_dir": "registry"}, "serving": settings}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    for attempt in range(3):
        # A free port can be taken by another xdist worker's server before ours binds it: then ours
        # exits, or the workers answering are not ours; either way, another port.
        port = free_port()
        argv = [str(BIN / "wine-assets"), "--params", "params.yaml", "serve", "--port", str(port)]
        process = start_in_group([*argv, "--workers", str(workers)], folder / "serve.log", cwd=folder, env=env)
        server = Server(process, f"http://127.0.0.1:{port}", folder, folder / "serve.log")
        try:
            wait_for(server, "/v2/health/ready" if wait_ready else "/v2/health/live", timeout=90)
            deadline = time.monotonic() + 90
            while wait_ready and sum(ready_workers(server.metrics()).values()) < workers:  # every worker, not one
                assert time.monotonic() < deadline, server.log.read_text()[-3000:]
                time.sleep(0.1)
            if _listening_in_group(port, process.pid):
                return server
        except AssertionError:
            if attempt == 2 or "address already in use" not in server.log.read_text():
                stop_group(process)
                raise
        except BaseException:
            stop_group(process)
            raise
        stop_group(process)
    raise AssertionError(f"no free port could be kept for the server:\n{server.log.read_text()[-2000:]}")


def _listening_in_group(port: int, group: int) -> bool:
    """Whether the socket listening on ``port`` is held by a process of ``group`` (ours, not the server
    of another xdist worker; /metrics names workers by index, so it cannot tell)."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return _in_group(connection.pid, group)
    return False


def worker_pids(server: Server) -> set[int]:
    """The uvicorn worker processes of ``server`` (spawned children; not multiprocessing's helpers)."""
    found = set()
    for child in psutil.Process(server.process.pid).children():
        try:  # a worker that just died is a zombie until uvicorn reaps it: not a worker any more
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.Error:
            continue
    return found


def _in_group(pid: int, group: int) -> bool:
    try:
        return os.getpgid(pid) == group
    except ProcessLookupError:
        return False


def wait_for(server: Server, path: str, timeout: float, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"the server exited ({server.process.returncode}):\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + path, timeout=5).status_code == status:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{path} did not answer {status} within {timeout} s:\n{server.log.read_text()[-3000:]}")


def ready_workers(text: str) -> dict[str, float]:
    return {
        re.search(r'worker="(\d+)"', line).group(1): float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("wine_serving_model_ready{")
    }


def worker_versions(text: str, role: str = "production") -> dict[str, float]:
    versions = {}
    for line in text.splitlines():
        if line.startswith("wine_serving_model_version{") and f'role="{role}"' in line:
            worker = re.search(r'worker="(\d+)"', line).group(1)
            versions[worker] = float(line.rsplit(" ", 1)[1])
    return versions


class SharedServer:
    """The server the tests marked SHARED use: started on first use, and again only if a test has
    stopped it (SIGTERM's test does, last). Session-scoped, so an xdist worker that runs some of
    these tests between other modules' tests still starts it once."""

    def __init__(self, factory: pytest.TempPathFactory, versions: Versions):
        self._factory = factory
        self._versions = versions
        self._current: Server | None = None
        self.starts = 0

    def get(self) -> Server:
        if self._current is not None and self._current.process.poll() is None:
            return self._current
        self.stop()
        folder = self._factory.mktemp("serve")
        publish(folder / "registry", self._versions, 1)
        # Two workers serving v1; limits large enough for the request SIGTERM must let finish; a short
        # header timeout, for the test of silent connections.
        self._current = start_server(
            folder, workers=2, max_rows=100_000, max_body_bytes=50_000_000, header_timeout_seconds=HEAD_TIMEOUT
        )
        self.starts += 1
        return self._current

    def stop(self) -> None:
        if self._current is not None:
            stop_group(self._current.process)


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory, versions) -> Iterator[SharedServer]:
    shared = SharedServer(tmp_path_factory, versions)
    yield shared
    shared.stop()


@pytest.fixture
def server(shared_server: SharedServer) -> Server:
    return shared_server.get()


@pytest.fixture
def promtool() -> None:
    """Named before ``server``: a machine without promtool skips before the server starts."""
    require_programs("promtool")


@pytest.fixture
def prometheus() -> None:
    require_programs("prometheus")


# -- metrics of several workers ----------------------------------------------------------------------
@SHARED
def test_metrics_count_requests_predictions_and_workers(server):
    text = server.metrics()
    before = metric_value(text, "wine_serving_predictions_total", version="1", variant="production")
    requests_before = metric_value(text, "wine_serving_requests_total", endpoint="/invocations", status="200")
    for _ in range(10):  # a connection each: uvicorn's workers share the socket, so both answer some
        with server.client() as client:
            assert client.post("/invocations", json={"instances": [ROW] * 5}).status_code == 200
    text = server.metrics()
    # whichever worker answers /metrics, it reports every worker's samples
    assert metric_value(text, "wine_serving_predictions_total", version="1", variant="production") == before + 50
    assert metric_value(text, "wine_serving_requests_total", endpoint="/invocations", status="200") == (
        requests_before + 10
    )
    assert metric_value(text, "wine_serving_request_duration_seconds_count", endpoint="/invocations") >= 10
    assert "wine_serving_requests_in_flight" in text
    assert worker_versions(text) == {"0": 1.0, "1": 1.0}  # both workers, by index
    assert ready_workers(text) == {"0": 1.0, "1": 1.0}
    assert 'pid="' not in text  # process ids are not shown


@SHARED
def test_promtool_accepts_the_live_metrics(promtool, server):
    text = server.metrics()
    assert "wine_serving_model_ready{" in text  # the multiprocess exposition, pid labels and all
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@SHARED
def test_a_real_prometheus_scrapes_the_server_and_answers_a_query(prometheus, server, tmp_path):
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "wine-serving", "static_configs": [{"targets": [server.url.split("//")[1]]}]}
                ],
            }
        )
    )
    process = start_in_group(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        tmp_path / "prometheus.log",
        cwd=tmp_path,
    )
    try:
        with server.client() as client:
            assert client.post("/invocations", json={"instances": [ROW]}).status_code == 200
        query = "sum(wine_serving_predictions_total)"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5).json()
                if answer["status"] == "success" and answer["data"]["result"]:
                    break
            except (httpx.TransportError, ValueError):  # not listening yet, or still starting ("not ready")
                pass
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        assert float(answer["data"]["result"][0]["value"][1]) >= 1
        targets = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5).json()
        assert [t["health"] for t in targets["data"]["activeTargets"]] == ["up"]
    finally:
        stop_group(process)


# -- the schemathesis CLI over HTTP -------------------------------------------------------------------
@SHARED
def test_a_fuzz_of_the_openapi_schema_finds_no_server_error(server, tmp_path):
    """schemathesis generates valid and invalid requests for every operation from /openapi.json."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            str(BIN / "st"),
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "40",
            "--seed",
            "12345",
            "--workers",
            "1",  # hypothesis' strategy set-up is not thread-safe: two workers crashed it once
            "--no-shrink",
            "--phases",
            "examples,coverage,fuzzing",
            "--report",
            "json",
            "--report-json-path",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    outcome = json.loads(report.read_text())
    assert outcome["failures"] == [] and outcome["errors"] == []
    assert outcome["operations"]["tested"] == outcome["operations"]["total"] >= 15
    assert outcome["test_cases"]["generated"] >= 300
    # Generated valid requests reached the models (not only 4xx answers to random data).
    accepted = {
        operation: sum(phase.get("accepted", 0) for phase in rates.values())
        for operation, rates in outcome["valid_rates"].items()
    }
    for operation in ("POST /invocations", "POST /v2/models/{name}/infer", "GET /v2/models/{name}"):
        assert accepted[operation] > 0, (operation, outcome["valid_rates"][operation])


# -- limits on connections, bodies and versions, on the real server -----------------------------------
def _server_rss(server: Server) -> int:
    leader = psutil.Process(server.process.pid)
    return sum(process.memory_info().rss for process in [leader, *leader.children(recursive=True)])


def _response(sock: socket.socket, data: bytes = b"") -> tuple[int, dict]:
    """Status and JSON body of the one response the server sends before it closes the connection."""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:  # the answer came first; the reset after it is the close
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@SHARED
def test_a_huge_head_gets_431_without_growing_the_workers_and_a_silent_connection_is_closed(server):
    """What the review sent: a 150 MB header was read whole (+259 MB) and silent connections stayed open."""
    port = int(server.url.rsplit(":", 1)[1])
    before = _server_rss(server)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        chunk, sent, reply = b"a" * 65536, 0, b""
        try:
            while sent < 64 << 20:
                view = memoryview(chunk)
                while view:
                    view = view[sock.send(view, socket.MSG_NOSIGNAL) :]
                sent += len(chunk)
                if not reply and select.select([sock], [], [], 0)[0]:
                    reply = sock.recv(65536)
        except OSError:  # the server closed after answering
            pass
        status, body = _response(sock, reply)
    grown = _server_rss(server) - before
    assert status == 431 and body["error_code"] == "REQUEST_HEADER_FIELDS_TOO_LARGE"
    assert body["message"] == "the request line and headers exceed 16384 bytes (serving.max_header_bytes)"
    assert grown < 16 << 20, f"the server grew by {grown} bytes"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
        started = time.monotonic()
        try:
            assert silent.recv(1024) == b""
        except ConnectionResetError:
            pass
        waited = time.monotonic() - started
    assert HEAD_TIMEOUT * 0.8 <= waited < HEAD_TIMEOUT + 10
    assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200


@SHARED
def test_a_body_of_empty_lists_is_refused_unparsed_while_ping_answers(server):
    """4 million values where 100,000 rows (serving.max_rows) need 3.9 million at most: 413 before json.loads."""
    body = b'{"inputs": [' + b",".join([b"[]"] * 2_000_000) + b"]}"
    outcome: dict = {}

    def send() -> None:
        with server.client() as client:
            outcome["response"] = client.post(
                "/invocations", content=body, headers={"Content-Type": "application/json"}
            )

    sender = threading.Thread(target=send)
    sender.start()
    pings = []
    with server.client() as client:
        while sender.is_alive():
            pings.append(client.get("/ping").status_code)
    sender.join()
    response = outcome["response"]
    assert response.status_code == 413
    assert "(serving.max_rows) needs at most 3904000" in response.json()["message"]
    assert pings and set(pings) == {200}


@SHARED
def test_a_5000_digit_version_is_a_404_naming_the_limit(server):
    version = "1" * 5000
    with server.client() as client:
        answers = [
            client.get(f"/v2/models/wine-classifier/versions/{version}"),
            client.get(f"/v2/models/wine-classifier/versions/{version}/ready"),
            client.post(f"/v2/models/wine-classifier/versions/{version}/infer", json={"inputs": []}),
        ]
    for answer in answers:
        assert answer.status_code == 404, answer.text[:300]
        assert answer.json()["message"].endswith("is not a version: at most 9 digits")
        assert len(answer.text) < 500  # the 5000 digits are not echoed


# -- feedback from several workers into one log ---------------------------------------------------------
@SHARED
def test_feedback_sent_to_both_workers_at_once_is_recorded_and_counted_once(server, wines):
    """Each worker has its own connection to the SQLite log: a label sent twice, to either worker,
    is stored and counted once (test_serving_app.py has the same in one process)."""
    features = wines[list(FEATURE_COLUMNS)].iloc[:40]
    truth = wines["target"].iloc[:40].tolist()
    with server.client() as client:
        predictions = client.post("/invocations", json={"instances": features.to_numpy().tolist()}).json()
    ids = [p["prediction_id"] for p in predictions["predictions"]]
    before = server.metrics()
    answers: list[httpx.Response] = []

    def send(index: int) -> None:
        for _ in range(2):  # each label twice, each on a connection of its own
            with server.client() as client:
                answers.append(
                    client.post(
                        "/feedback", json={"prediction_id": ids[index], "true_class": truth[index]}, headers=bearer()
                    )
                )

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(ids))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(response.status_code for response in answers) == [200] * 80, [a.text for a in answers][:3]
    after = server.metrics()
    counted = sum(
        metric_value(after, "wine_serving_feedback_total", variant="production", outcome=outcome)
        - metric_value(before, "wine_serving_feedback_total", variant="production", outcome=outcome)
        for outcome in ("correct", "wrong")
    )
    assert counted == 40
    with sqlite3.connect(server.prediction_log) as connection:
        stored = dict(connection.execute("SELECT prediction_id, true_class FROM feedback").fetchall())
    assert [stored[prediction_id] for prediction_id in ids] == truth


# -- a release, a killed worker, SIGTERM: in this order, on the shared server ------------------------------
@SHARED
def test_a_release_under_load_fails_no_request_and_every_worker_moves(server, versions, wines):
    results: list[tuple[float, int, str]] = []
    errors: list[str] = []
    stop = threading.Event()
    body = {"instances": wines[list(FEATURE_COLUMNS)].iloc[:3].to_numpy().tolist()}
    reloads = metric_value(server.metrics(), "wine_serving_model_reloads_total", role="production", outcome="success")

    def client_loop():
        with server.client() as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post("/invocations", json=body)
                    results.append((started, response.status_code, response.headers["x-model-version"]))
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        assert publish(server.registry, versions, 2) == 2
        released_at = time.monotonic()  # the alias moves at the end of publish
        time.sleep(3.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    final = server.metrics()
    assert errors == []
    assert len(results) > 100
    assert Counter(status for _, status, _ in results) == {200: len(results)}
    versions_seen = {version for _, _, version in results}
    assert versions_seen == {"1", "2"}
    last_old = max(started for started, _, version in results if version == "1")
    load_seconds = metric_value(final, "wine_serving_model_load_seconds_sum") / max(
        metric_value(final, "wine_serving_model_load_seconds_count"), 1
    )
    # Every worker polls every POLL seconds, then loads: no request starts on v1 after that (plus
    # scheduling slack: 8 client threads, 2 workers and the test share 2 cores).
    assert last_old - released_at <= POLL + load_seconds + 2.5
    assert sorted(worker_versions(final).values()) == [2.0, 2.0]
    # one load of v2 in each worker
    assert metric_value(final, "wine_serving_model_reloads_total", role="production", outcome="success") == reloads + 2


@SHARED
def test_a_killed_worker_is_replaced_and_its_gauges_go_with_it(server):
    before = ready_workers(server.metrics())
    assert before == {"0": 1.0, "1": 1.0}, before
    workers = worker_pids(server)
    assert len(workers) == 2, workers
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        now, replaced = ready_workers(server.metrics()), worker_pids(server)
        if victim not in replaced and len(replaced) == 2 and now == {"0": 1.0, "1": 1.0}:
            break
        assert time.monotonic() < deadline, (now, replaced, server.log.read_text()[-2000:])
        time.sleep(0.2)
    # the replacement took the dead worker's index; the dead worker's gauges are gone, not doubled
    text = server.metrics()
    assert sorted(worker_versions(text)) == ["0", "1"] and 'pid="' not in text
    assert all(_in_group(pid, server.process.pid) for pid in replaced)  # the replacement is uvicorn's
    with server.client() as client:
        assert client.post("/invocations", json={"instances": [ROW]}).status_code == 200


@SHARED
def test_sigterm_lets_the_request_in_flight_finish(server, wines):
    """Last of the group: it stops the shared server."""
    rows = np.tile(wines[list(FEATURE_COLUMNS)].to_numpy(), (300, 1)).tolist()  # 53,400 rows
    outcome: dict = {}

    def send():
        with server.client() as client:
            outcome["response"] = client.post("/invocations", json={"instances": rows})

    sender = threading.Thread(target=send)
    sender.start()
    try:
        deadline = time.monotonic() + 20
        while metric_value(server.metrics(), "wine_serving_requests_in_flight") < 2:  # the big one and /metrics
            assert time.monotonic() < deadline and sender.is_alive()
            time.sleep(0.01)
        os.killpg(server.process.pid, signal.SIGTERM)
        sender.join(60)
        # uvicorn stops accepting, lets the request finish, then exits by the signal it received
        assert server.process.wait(60) in (0, -signal.SIGTERM)
    finally:
        stop_group(server.process)
        sender.join(60)
    response = outcome["response"]
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == len(rows)


# -- the command line ----------------------------------------------------------------------------------
def test_serve_refuses_bad_arguments_and_params_with_exit_2(tmp_path):
    bad_port = run_program("wine-assets", "serve", "--port", "http", timeout=120)
    assert bad_port.returncode == 2 and "'http' is not a port" in bad_port.stderr
    (tmp_path / "params.yaml").write_text("serving: {experiment: rf-300}\n")
    bad_params = run_program("wine-assets", "serve", cwd=tmp_path, timeout=120)
    assert bad_params.returncode == 2
    assert "experiment and candidate_version go together" in bad_params.stderr
    assert "Traceback" not in bad_params.stderr
    (tmp_path / "a-file").write_text("")
    (tmp_path / "params.yaml").write_text("serving: {log_path: a-file/predictions.sqlite}\n")
    bad_log = run_program("wine-assets", "serve", cwd=tmp_path, timeout=120)
    assert bad_log.returncode == 2 and "serving.log_path: cannot open the prediction log" in bad_log.stderr
    assert "Traceback" not in bad_log.stderr
    (tmp_path / "params.yaml").write_text("serving: {log_path: nothing-here.sqlite}\n")
    missing_log = run_program("wine-assets", "serving", "report", cwd=tmp_path, timeout=120)
    assert missing_log.returncode == 1 and "no prediction log at" in missing_log.stderr
