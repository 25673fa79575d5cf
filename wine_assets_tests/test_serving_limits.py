"""The limits of `wine-assets serve` in-process:

* the HTTP connection (wine_assets.serving.protocol): uvicorn with the guarded httptools protocol,
  started in a thread on a free port of 127.0.0.1, talked to over raw sockets: the head size limit,
  the head and body timeouts, and what they must not cut (slow answers, keep-alive, pipelining);
* the work a body may cause before it is parsed (``bound_work``), per request shape;
* a locked prediction log: /feedback answers 503 with Retry-After within the busy timeout;
* pinned versions: an LRU of loaded versions and a budget of cold loads per minute (429).

The same limits on the real `wine-assets serve` are in test_serving.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import select
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import uvicorn
import yaml

from wine_assets import model_format
from wine_assets.features import fit_scaler, split_frame
from wine_assets.params import ModelParams, load_params
from wine_assets.registry import MODEL_FILE, REFERENCE_FILE, SCALER_FILE, ModelRegistry
from wine_assets.serving import inputs
from wine_assets.serving.app import VALUES_PER_ROW, bound_work, create_app
from wine_assets.serving.protocol import GuardedHttpToolsProtocol, HttpLimits
from wine_assets.serving.state import ServingState, TooManyLoads
from wine_assets.training import train_model
from wine_assets.validation import FEATURE_COLUMNS

from .serving_support import FEEDBACK_TOKENS, MODEL, ROW, TestClient, bearer, publish
from .support import free_port

pytestmark = pytest.mark.component


# -- uvicorn with the guarded protocol, in a thread ------------------------------------------------------
class EchoApp:
    """Reads the whole body, waits ``X-Delay`` seconds, answers its size; notes a client that went away."""

    def __init__(self) -> None:
        self.disconnects = 0

    async def __call__(self, scope, receive, send) -> None:
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await asyncio.sleep(float(dict(scope["headers"]).get(b"x-delay", b"0")))
        body = json.dumps({"bytes": size}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def guarded_server(limits: HttpLimits, app: EchoApp, keep_alive: int = 1) -> Iterator[int]:
    """The port of a uvicorn server with ``GuardedHttpToolsProtocol``, as `wine-assets serve` configures it."""
    for _ in range(3):  # a free port can be taken by another process before uvicorn binds it
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=free_port(),
            http=functools.partial(GuardedHttpToolsProtocol, limits=limits),
            lifespan="off",
            timeout_keep_alive=keep_alive,
            log_level="error",
            access_log=False,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if server.started:
            break
        server.should_exit = True
        thread.join(10)
    else:
        raise AssertionError("uvicorn did not start on a free port in three tries")
    try:
        yield config.port
    finally:
        server.should_exit = True
        thread.join(20)


def open_socket(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def send_all(sock: socket.socket, data: bytes) -> int:
    """``sendall`` without SIGPIPE (an xdist worker does not ignore it): a closed peer raises instead."""
    view = memoryview(data)
    while view:
        view = view[sock.send(view, socket.MSG_NOSIGNAL) :]
    return len(data)


class Responses:
    """HTTP/1.1 responses with a content-length, read one by one from a socket (two can come in one read)."""

    def __init__(self, sock: socket.socket, data: bytes = b""):
        self.sock = sock
        self.data = data

    def next(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.data:
            self._more("before a response")
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        size = int(headers["content-length"])
        while len(self.data) < size:
            self._more("inside a response body")
        body, self.data = self.data[:size], self.data[size:]
        return int(lines[0].split()[1]), headers, body

    def _more(self, where: str) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"the connection closed {where}: {self.data[:200]!r}"
        self.data += chunk


def read_response(sock: socket.socket, first: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """The one response a test waits for on this socket."""
    return Responses(sock, first).next()


def seconds_until_closed(sock: socket.socket, limit: float) -> float:
    """How long until the server closes the connection (it must send nothing first)."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        assert sock.recv(1024) == b""
    except ConnectionResetError:
        pass
    return time.monotonic() - started


LIMITS = HttpLimits(max_header_bytes=4096, header_timeout_seconds=0.5, body_timeout_seconds=0.5)
# For the tests of something else: timeouts no stall of a busy test machine reaches.
PATIENT = HttpLimits(max_header_bytes=4096, header_timeout_seconds=10.0, body_timeout_seconds=10.0)


def get(path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


def test_a_head_over_the_limit_is_refused_with_431_and_never_held_in_memory():
    app = EchoApp()
    with guarded_server(PATIENT, app) as port:
        process = psutil.Process()
        before = process.memory_info().rss
        sock = open_socket(port)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent, reply, chunk = 0, b"", b"a" * 65536
        try:  # 32 MiB of one header; the server answers early and discards the rest (a server without the
            # limit would read and keep all of it)
            while sent < 32 << 20:
                sent += send_all(sock, chunk)
                if not reply and select.select([sock], [], [], 0)[0]:
                    reply = sock.recv(65536)
        except OSError:  # the server closed after answering
            pass
        grown = process.memory_info().rss - before
        status, headers, body = read_response(sock, reply)
        sock.close()
    assert status == 431 and headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert json.loads(body) == {
        "error_code": "REQUEST_HEADER_FIELDS_TOO_LARGE",
        "message": "the request line and headers exceed 4096 bytes (serving.max_header_bytes)",
        "error": "the request line and headers exceed 4096 bytes (serving.max_header_bytes)",
    }
    assert grown < 8 << 20, f"the process grew by {grown} bytes while {sent} bytes of header were sent"


def test_a_head_below_the_limit_is_served_and_one_above_it_in_the_same_read_is_not():
    app = EchoApp()
    with guarded_server(PATIENT, app) as port:
        answers = {}
        for name, padding in (("below", PATIENT.max_header_bytes - 200), ("above", PATIENT.max_header_bytes + 1)):
            with open_socket(port) as sock:
                request = get(extra=f"X-Pad: {'p' * padding}\r\n")
                sock.sendall(request)
                answers[name] = (len(request), read_response(sock)[0])
    assert answers["below"][0] < PATIENT.max_header_bytes < answers["above"][0]
    assert answers["below"][1] == 200 and answers["above"][1] == 431


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout():
    with guarded_server(LIMITS, EchoApp()) as port:
        started = time.monotonic()  # before the connection: the server's clock starts after this
        with open_socket(port) as sock:
            seconds_until_closed(sock, limit=10)
        waited = time.monotonic() - started
    assert LIMITS.header_timeout_seconds <= waited < 5


def test_a_head_that_stops_arriving_gets_408_and_the_connection_closes():
    with guarded_server(LIMITS, EchoApp()) as port:
        started = time.monotonic()  # before the connection: the server's clock starts after this
        sock = open_socket(port)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the head never ends
        status, headers, body = read_response(sock)
        waited = time.monotonic() - started
        closed_after = seconds_until_closed(sock, limit=5)
        sock.close()
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["message"] == (
        "the request headers did not arrive within 0.5 s (serving.header_timeout_seconds)"
    )
    assert LIMITS.header_timeout_seconds <= waited < 5 and closed_after < 5


def test_a_body_that_stops_arriving_closes_the_connection_and_the_app_sees_the_client_go():
    app = EchoApp()
    with guarded_server(LIMITS, app) as port, open_socket(port) as sock:
        started = time.monotonic()  # before the head is sent: the body's clock starts after this
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        seconds_until_closed(sock, limit=10)
        waited = time.monotonic() - started
        deadline = time.monotonic() + 5
        while app.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert LIMITS.body_timeout_seconds <= waited < 5
    assert app.disconnects == 1


def test_slow_answers_keep_alive_and_pipelining_are_not_cut_by_the_timeouts():
    app = EchoApp()
    limits = HttpLimits(max_header_bytes=4096, header_timeout_seconds=1.0, body_timeout_seconds=1.0)
    with guarded_server(limits, app, keep_alive=4) as port, open_socket(port) as sock:
        # an answer that takes longer than both timeouts, then a second request on the same connection
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Delay: 2.0\r\nContent-Length: 5\r\n\r\nhello")
        slow = read_response(sock)
        time.sleep(limits.header_timeout_seconds * 1.5)  # idle between requests: keep-alive's time, not the head's
        sock.sendall(get() + get())  # two requests in one write
        responses = Responses(sock)
        first, second = responses.next(), responses.next()
    assert slow[0] == 200 and json.loads(slow[2]) == {"bytes": 5}
    assert first[0] == second[0] == 200 and app.disconnects == 0


def test_a_blank_line_after_a_response_does_not_hold_the_connection_open():
    # uvicorn's keep-alive timer stops at any byte; the head timer takes over from there
    limits = HttpLimits(max_header_bytes=4096, header_timeout_seconds=2.0, body_timeout_seconds=2.0)
    with guarded_server(limits, EchoApp(), keep_alive=30) as port, open_socket(port) as sock:
        sock.sendall(get())
        assert read_response(sock)[0] == 200
        sock.sendall(b"\r\n")
        waited = seconds_until_closed(sock, limit=20)
    assert limits.header_timeout_seconds * 0.8 <= waited < limits.header_timeout_seconds + 5


def test_a_request_that_is_not_http_gets_the_json_error_body():
    with guarded_server(PATIENT, EchoApp()) as port, open_socket(port) as sock:
        sock.sendall(b"HELLO THERE\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error_code"] == "BAD_REQUEST"


# -- the work a body may cause (bound_work) ------------------------------------------------------------
def _bodies(rows: int) -> dict[str, tuple[bytes, str]]:
    """Every request shape with ``rows`` rows, as JSON or CSV bytes."""
    row = ROW
    records = [dict(zip(FEATURE_COLUMNS, row, strict=True))] * rows
    per_feature_nested = [
        {"name": name, "shape": [rows, 1], "datatype": "FP64", "data": [[value]] * rows}
        for name, value in zip(FEATURE_COLUMNS, row, strict=True)
    ]
    documents = {
        "inputs lists": {"inputs": [row] * rows},
        "dataframe_split": {"dataframe_split": {"columns": list(FEATURE_COLUMNS), "data": [row] * rows}},
        "dataframe_records": {"dataframe_records": records},
        "inputs columns": {"inputs": {name: [value] * rows for name, value in zip(FEATURE_COLUMNS, row, strict=True)}},
        "v2 nested tensor": {
            "id": "a",
            "inputs": [{"name": "x", "shape": [rows, 13], "datatype": "FP64", "data": [row] * rows}],
        },
        "v2 per feature [N, 1]": {"inputs": per_feature_nested},
    }
    bodies = {name: (json.dumps(document).encode(), "application/json") for name, document in documents.items()}
    csv_text = ",".join(FEATURE_COLUMNS) + "\n" + (",".join(map(str, row)) + "\n") * rows
    bodies["csv"] = (csv_text.encode(), "text/csv")
    return bodies


def test_every_request_shape_at_max_rows_passes_the_bound_and_parses():
    max_rows = 300
    for name, (body, content_type) in _bodies(max_rows).items():
        bound_work(body, content_type, max_rows)
        if name.startswith("v2"):
            features = inputs.parse_infer(inputs.decode_json(body), max_rows, ("predicted_class",)).features
        else:
            features = inputs.parse_invocations(body, content_type, max_rows)
        assert features.rows == max_rows, name


def test_bodies_of_more_values_or_lines_than_max_rows_need_are_refused_before_parsing():
    max_rows = 300
    allowed = VALUES_PER_ROW * max_rows + 4 * inputs.MAX_COLUMNS
    empty_lists = b'{"inputs": [' + b",".join([b"[]"] * allowed) + b"]}"
    flat = b'{"inputs": [[' + b",".join([b"0"] * (allowed + 2)) + b"]]}"
    for body in (empty_lists, flat):
        with pytest.raises(inputs.RequestError) as refused:
            bound_work(body, "application/json", max_rows)
        assert refused.value.status == 413 and refused.value.error_code == "REQUEST_TOO_LARGE"
        assert f"a request of at most {max_rows} rows (serving.max_rows) needs at most {allowed}" in str(refused.value)
    lines = b"alcohol\n" + b"1\n" * (max_rows + 5)
    with pytest.raises(inputs.RequestError, match=rf"^the CSV has {max_rows + 6} lines; at most {max_rows} rows"):
        bound_work(lines, "text/csv; charset=utf-8", max_rows)


# -- the app in-process: bodies, a locked log, pinned versions -------------------------------------------
@contextlib.contextmanager
def running_app(folder: Path, **serving) -> Iterator[TestClient]:
    """``create_app`` for a params.yaml in ``folder`` with its lifespan running, ready to answer."""
    settings = {"reload_interval_seconds": 0.1, "log_path": "predictions.sqlite", **serving}
    (folder / "params.yaml").write_text(yaml.safe_dump({"paths": {"registry_dir": "registry"}, "serving": settings}))
    package_logger = logging.getLogger("wine_assets")
    saved = (list(package_logger.handlers), package_logger.propagate, package_logger.level)
    try:
        with TestClient(create_app(load_params(folder / "params.yaml"))) as client:
            deadline = time.monotonic() + 30
            while client.get("/ping").status_code != 200:
                assert time.monotonic() < deadline, "no model ready within 30 s"
                time.sleep(0.05)
            yield client
    finally:  # create_app sets up the package's logger for a worker process; the tests' process gets it back
        package_logger.handlers[:] = saved[0]
        package_logger.propagate, package_logger.level = saved[1], saved[2]


def test_a_body_of_empty_lists_is_a_413_naming_max_rows_and_scores_nothing(tmp_path, versions):
    publish(tmp_path / "registry", versions, 1)
    body = b'{"inputs": [' + b",".join([b"[]"] * 1_600_000) + b"]}"  # 4.8 MB, as the review sent
    with running_app(tmp_path, max_body_bytes=5_000_000) as client:
        refused = client.post("/invocations", content=body, headers={"Content-Type": "application/json"})
        ping = client.get("/ping")
    assert refused.status_code == 413 and "(serving.max_rows) needs at most" in refused.json()["message"]
    # refused by the count, before json.loads built 1.6 million lists (which would say "1600000 rows")
    assert "1600000 rows" not in refused.json()["message"] and ping.status_code == 200


def test_a_locked_log_makes_feedback_answer_503_with_retry_after_within_the_busy_timeout(tmp_path, versions):
    publish(tmp_path / "registry", versions, 1)
    with running_app(tmp_path, log_busy_timeout_seconds=0.5, tokens=FEEDBACK_TOKENS) as client:
        prediction_id = client.post("/invocations", json={"inputs": [ROW]}).json()["predictions"][0]["prediction_id"]
        holder = sqlite3.connect(tmp_path / "predictions.sqlite", isolation_level=None)
        deadline = time.monotonic() + 10
        while holder.execute("SELECT count(*) FROM predictions").fetchone()[0] == 0:  # written by the log's thread
            assert time.monotonic() < deadline
            time.sleep(0.02)
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the log
        try:
            started = time.monotonic()
            busy = client.post("/feedback", json={"prediction_id": prediction_id, "true_class": 0}, headers=bearer())
            waited = time.monotonic() - started
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        after = client.post("/feedback", json={"prediction_id": prediction_id, "true_class": 0}, headers=bearer())
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error_code"] == "LOG_BUSY"
    assert "serving.log_busy_timeout_seconds" in busy.json()["message"]
    assert 0.5 <= waited < 5
    assert after.status_code == 200 and after.json()["true_class"] == 0  # the label was not lost: sent again, kept


@pytest.fixture(scope="module")
def small_versions(wines) -> list[dict[str, bytes]]:
    """Three more bundles, small forests of different seeds: versions to pin."""
    train, _ = split_frame(wines, 0.2, 42)
    scaler = fit_scaler(train)
    reference = train.drop(columns="target").to_csv(index=False).encode()
    bundles = []
    for seed in (11, 12, 13):
        model = train_model(train, scaler, ModelParams(n_estimators=2, max_depth=2, random_state=seed)).model
        bundles.append(
            {MODEL_FILE: model_format.dumps(model), SCALER_FILE: model_format.dumps(scaler), REFERENCE_FILE: reference}
        )
    return bundles


def publish_small(registry_dir: Path, versions, small_versions) -> None:
    """v1 the production forest, v2 to v4 the small ones (published, not production)."""
    publish(registry_dir, versions, 1)
    for files in small_versions:
        ModelRegistry(registry_dir).publish(files, versions.fields, set_production=False)


def test_pinned_versions_past_the_cache_are_limited_to_the_minutes_loads_then_429(tmp_path, versions, small_versions):
    publish_small(tmp_path / "registry", versions, small_versions)
    with running_app(tmp_path, pinned_cache_size=1, pinned_loads_per_minute=2) as client:
        answers = {}
        for version in ("2", "3", "2", "3", "99", "1"):  # 2 and 3 load (2 then leaves the cache), 2 again: refused
            answers.setdefault(version, []).append(client.get(f"{MODEL}/versions/{version}/ready"))
        infer = client.post(
            f"{MODEL}/versions/4/infer",
            json={"inputs": [{"name": "x", "shape": [1, 13], "datatype": "FP64", "data": ROW}]},
        )
    assert [response.status_code for response in answers["2"]] == [200, 429]
    assert [response.status_code for response in answers["3"]] == [200, 200]  # the cached one is served
    assert answers["99"][0].status_code == 404  # not in the registry: refused before the budget
    assert answers["1"][0].status_code == 200  # production needs no load
    refused = answers["2"][1]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error_code"] == "TOO_MANY_REQUESTS"
    message = refused.json()["message"]
    assert "loaded 2 pinned versions in the last minute (serving.pinned_loads_per_minute)" in message
    assert "(serving.pinned_cache_size)" in message
    assert infer.status_code == 429 and infer.json()["error_code"] == "TOO_MANY_REQUESTS"


def test_a_cached_pinned_version_is_served_while_another_one_loads(tmp_path, versions, small_versions):
    registry = tmp_path / "registry"
    ModelRegistry(registry).publish(small_versions[0], versions.fields)  # v1, production: small
    ModelRegistry(registry).publish(small_versions[1], versions.fields, set_production=False)  # v2: small
    publish(registry, versions, 1, production=False)  # v3: the 100-tree forest, slower to load
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"serving": {"pinned_cache_size": 4}}))
    state = ServingState(registry, load_params(tmp_path / "params.yaml").serving)
    assert state.pinned("2").version == 2  # cached
    loader = threading.Thread(target=state.pinned, args=("3",))
    loader.start()
    deadline = time.monotonic() + 10
    while not state._load_lock.locked():
        assert time.monotonic() < deadline and loader.is_alive()
        time.sleep(0.001)
    served = state.pinned("2")
    still_loading = loader.is_alive()
    loader.join(30)
    assert served.version == 2 and still_loading
    assert state.pinned("3").version == 3  # loaded once, now cached


def test_the_load_budget_frees_up_as_the_minute_passes(tmp_path, versions, small_versions):
    publish_small(tmp_path / "registry", versions, small_versions)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"serving": {"pinned_cache_size": 1, "pinned_loads_per_minute": 1}})
    )
    state = ServingState(tmp_path / "registry", load_params(tmp_path / "params.yaml").serving)
    assert state.pinned("2").version == 2
    with pytest.raises(TooManyLoads) as refused:
        state.pinned("3")
    assert 59 <= refused.value.retry_after <= 60
    state._loads[0] -= 60  # the load a minute ago
    assert state.pinned("3").version == 3
