"""The serving API in-process: the app `wine-assets serve` runs (``create_app``) over a real registry
in a temporary folder, driven through Starlette's TestClient with its lifespan run, so the
production-alias watcher and the prediction log work as in a worker. Every answer is compared
with `wine_assets.predict.predict`. What needs real processes (several uvicorn workers, signals,
promtool, Prometheus, the schemathesis CLI) is in test_serving.py."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from wine_assets.params import load_params
from wine_assets.registry import ModelRegistry
from wine_assets.serving.app import create_app
from wine_assets.serving.state import assign
from wine_assets.validation import FEATURE_COLUMNS

from .serving_support import (
    FEEDBACK_TOKENS,
    MODEL,
    PROBABILITIES,
    RECORD,
    ROW,
    TestClient,
    bearer,
    check_headers,
    expected_predictions,
    metric_value,
    publish,
)

pytestmark = pytest.mark.component

POLL = 0.1  # the watcher's interval here: in-process, a release is seen within a tenth of a second


# -- the app in-process ---------------------------------------------------------------------------------
class _Messages(logging.Handler):
    """What the app logs (its own handler writes to stderr; this keeps the messages for the tests)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class App:
    """One app with its lifespan running: ``client`` talks to it, ``log`` is what it logged."""

    client: TestClient
    folder: Path
    log: list[str]

    @property
    def registry(self) -> Path:
        return self.folder / "registry"

    @property
    def prediction_log(self) -> Path:
        return self.folder / "predictions.sqlite"

    @property
    def params_file(self) -> Path:
        return self.folder / "params.yaml"

    def metrics(self) -> str:
        return self.client.get("/metrics").text


@contextlib.contextmanager
def serving_app(folder: Path, **serving) -> Iterator[App]:
    """``create_app`` for a params.yaml in ``folder`` (registry/ and predictions.sqlite beside it), as a
    worker of `wine-assets serve` builds it, with the lifespan (watcher, log) running until exit."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"reload_interval_seconds": POLL, "log_path": "predictions.sqlite", "tokens": FEEDBACK_TOKENS, **serving}
    (folder / "params.yaml").write_text(yaml.safe_dump({"paths": {"registry_dir": "registry"}, "serving": settings}))
    package_logger = logging.getLogger("wine_assets")
    saved = (list(package_logger.handlers), package_logger.propagate, package_logger.level)
    messages = _Messages()
    try:
        app = create_app(load_params(folder / "params.yaml"))
        package_logger.addHandler(messages)
        with TestClient(app) as client:
            yield App(client, folder, messages.messages)
    finally:
        # create_app sets up the package's logger for a worker process; the tests' process gets it back
        package_logger.handlers[:] = saved[0]
        package_logger.propagate, package_logger.level = saved[1], saved[2]


def wait_until(condition: Callable[[], bool], app: App, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s; the app logged: {app.log[-10:]}"
        time.sleep(0.02)


def wait_for_version(app: App, version: str) -> None:
    wait_until(lambda: app.client.get("/ping").headers["x-model-version"] == version, app, f"v{version} served")


@pytest.fixture(scope="module")
def app(tmp_path_factory, versions) -> Iterator[App]:
    """v1 in production; small limits so the 413 cases stay small."""
    folder = tmp_path_factory.mktemp("app")
    publish(folder / "registry", versions, 1)
    with serving_app(folder, max_rows=500, max_body_bytes=200_000) as running:
        wait_for_version(running, "1")
        yield running


# -- every protocol and format gives exactly the batch path's probabilities -----------------------
def _bodies(features: pd.DataFrame) -> dict[str, tuple[str, dict | None, str | None]]:
    rows = features.to_numpy().tolist()
    records = features.to_dict("records")
    columns = {name: features[name].tolist() for name in FEATURE_COLUMNS}
    tensor = [{"name": "features", "shape": [len(rows), 13], "datatype": "FP64", "data": rows}]
    flat = [{"name": "features", "shape": [len(rows), 13], "datatype": "FP64", "data": sum(rows, [])}]
    per_feature = [{"name": name, "shape": [len(rows)], "datatype": "FP64", "data": columns[name]} for name in columns]
    return {
        "dataframe_split": ("/invocations", {"dataframe_split": {"columns": list(features), "data": rows}}, None),
        "dataframe_records": ("/invocations", {"dataframe_records": records}, None),
        "instances records": ("/invocations", {"instances": records}, None),
        "instances lists": ("/invocations", {"instances": rows}, None),
        "inputs columns": ("/invocations", {"inputs": columns}, None),
        "inputs lists": ("/invocations", {"inputs": rows}, None),
        "csv": ("/invocations", None, features.to_csv(index=False)),
        "v2 tensor": (f"{MODEL}/infer", {"id": "all-178", "inputs": tensor}, None),
        "v2 flat tensor": (f"{MODEL}/infer", {"inputs": flat}, None),
        "v2 per feature": (f"{MODEL}/infer", {"inputs": per_feature}, None),
        "v2 pinned version": (f"{MODEL}/versions/1/infer", {"inputs": tensor}, None),
    }


def probabilities_of(response: httpx.Response) -> tuple[np.ndarray, np.ndarray]:
    body = response.json()
    if "predictions" in body:
        frame = pd.DataFrame(body["predictions"])
        return frame["predicted_class"].to_numpy(), frame[PROBABILITIES].to_numpy()
    outputs = {output["name"]: output for output in body["outputs"]}
    shape = outputs["probabilities"]["shape"]
    return np.array(outputs["predicted_class"]["data"]), np.array(outputs["probabilities"]["data"]).reshape(shape)


def test_every_protocol_and_format_returns_exactly_the_batch_probabilities(app, wines):
    features = wines[list(FEATURE_COLUMNS)]
    expected = expected_predictions(app.registry, features)
    for name, (path, document, csv_text) in _bodies(features).items():
        if csv_text is None:
            response = app.client.post(path, json=document)
        else:
            response = app.client.post(path, content=csv_text, headers={"Content-Type": "text/csv"})
        assert response.status_code == 200, (name, response.text[:500])
        check_headers(response)
        assert response.headers["x-model-version"] == "1"
        classes, probabilities = probabilities_of(response)
        assert (classes == expected["predicted_class"].to_numpy()).all(), name
        assert np.array_equal(probabilities, expected[PROBABILITIES].to_numpy()), name
    assert response.json()["model_version"] == "1"


def test_the_response_names_version_variant_and_echoes_ids(app, wines):
    row = wines[list(FEATURE_COLUMNS)].iloc[:2]
    mlflow = app.client.post(
        "/invocations",
        json={"dataframe_records": row.to_dict("records")},
        headers={"X-Request-ID": "client-chosen.1"},
    )
    v2 = app.client.post(
        f"{MODEL}/infer",
        json={
            "id": "req-7",
            "inputs": [{"name": "x", "shape": [2, 13], "datatype": "FP32", "data": row.to_numpy().tolist()}],
        },
    )
    body = mlflow.json()
    assert mlflow.headers["x-request-id"] == "client-chosen.1" == body["request_id"]
    assert body["model_version"] == 1 and body["variant"] == "production"
    assert [set(p) for p in body["predictions"]] == [
        {"predicted_class", "predicted_label", *PROBABILITIES, "prediction_id"}
    ] * 2
    assert v2.json()["id"] == "req-7" and v2.json()["parameters"]["variant"] == "production"
    assert [o["name"] for o in v2.json()["outputs"]] == ["predicted_class", "predicted_label", "probabilities"]


def test_health_version_and_metadata(app):
    for path in (
        "/ping",
        "/health",
        "/v2/health/live",
        "/v2/health/ready",
        f"{MODEL}/ready",
        f"{MODEL}/versions/1/ready",
        "/v2",
        "/version",
    ):
        response = app.client.get(path)
        assert response.status_code == 200, path
        check_headers(response)
    metadata = app.client.get(MODEL).json()
    assert [item["name"] for item in metadata["inputs"]] == list(FEATURE_COLUMNS)
    assert {item["datatype"] for item in metadata["inputs"]} == {"FP64"}
    assert metadata["versions"] == ["1"] and metadata["parameters"]["production_version"] == "1"
    assert app.client.get("/version").json()["model_version"] == 1


# -- bad input: a JSON error, never a crash -----------------------------------------------------------
def _with(position: int, value) -> list:
    row = list(ROW)
    row[position] = value
    return row


def _tensor(data, shape=(1, 13), datatype="FP64", name="x"):
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}


JSON_TYPE = {"Content-Type": "application/json"}
BAD_REQUESTS = [
    # (id, method, path, headers, body, status, error_code, words in the message)
    ("malformed json", "POST", "/invocations", JSON_TYPE, b'{"inputs": [', 400, "MALFORMED_REQUEST", "not valid JSON"),
    ("empty body", "POST", "/invocations", JSON_TYPE, b"", 400, "MALFORMED_REQUEST", "empty"),
    ("not utf-8", "POST", "/invocations", JSON_TYPE, b'{"inputs": "\xff"}', 400, "MALFORMED_REQUEST", "UTF-8"),
    ("not an object", "POST", "/invocations", JSON_TYPE, [ROW], 400, "BAD_REQUEST", "JSON object"),
    (
        "two shapes",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"inputs": [ROW], "instances": [ROW]},
        400,
        "BAD_REQUEST",
        "exactly one",
    ),
    ("unknown key", "POST", "/invocations", JSON_TYPE, {"rows": [ROW]}, 400, "BAD_REQUEST", "unknown key(s) rows"),
    (
        "string number",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"inputs": [_with(0, "13.2")]},
        400,
        "BAD_REQUEST",
        "column 'alcohol', row 0: '13.2' is text",
    ),
    (
        "boolean",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"inputs": [ROW, _with(4, True)]},
        400,
        "BAD_REQUEST",
        "column 'magnesium', row 1: true is a true/false value",
    ),
    (
        "null",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"dataframe_records": [{**RECORD, "hue": None}]},
        400,
        "BAD_REQUEST",
        "column 'hue', row 0: the value is missing",
    ),
    ("nan literal", "POST", "/invocations", JSON_TYPE, b'{"inputs": [[NaN]]}', 400, "BAD_REQUEST", "NaN"),
    (
        "out of bounds",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"inputs": [ROW, ROW, _with(12, 99999.0)]},
        400,
        "BAD_REQUEST",
        "column 'proline', check less_than_or_equal_to(3360.0), row 2: 99999.0",
    ),
    (
        "negative",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"inputs": {**{k: [v] for k, v in RECORD.items()}, "ash": [-1]}},
        400,
        "BAD_REQUEST",
        "column 'ash', check greater_than_or_equal_to",
    ),
    (
        "huge integer",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"inputs": [_with(1, 10**400)]},
        400,
        "BAD_REQUEST",
        "column 'malic_acid', row 0",
    ),
    (
        "missing column",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"dataframe_records": [{k: v for k, v in RECORD.items() if k != "proline"}]},
        400,
        "BAD_REQUEST",
        "row 0 lacks column(s) proline",
    ),
    (
        "duplicated column",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"dataframe_split": {"columns": [*FEATURE_COLUMNS, "ash"], "data": [[*ROW, 2.0]]}},
        400,
        "BAD_REQUEST",
        "ash appear more than once",
    ),
    (
        "duplicated key",
        "POST",
        "/invocations",
        JSON_TYPE,
        ('{"dataframe_records": [{' + ", ".join(f'"{k}": {v}' for k, v in RECORD.items()) + ', "hue": 1.0}]}').encode(),
        400,
        "BAD_REQUEST",
        "key 'hue' more than once",
    ),
    (
        "short row",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"instances": [ROW[:12]]},
        400,
        "BAD_REQUEST",
        "row 0 has 12 values; every row needs 13",
    ),
    ("no rows", "POST", "/invocations", JSON_TYPE, {"instances": []}, 400, "BAD_REQUEST", "no rows"),
    (
        "csv text",
        "POST",
        "/invocations",
        {"Content-Type": "text/csv"},
        (",".join(FEATURE_COLUMNS) + "\n" + ",".join(map(str, _with(3, "abc")))).encode(),
        400,
        "BAD_REQUEST",
        "column 'alcalinity_of_ash', row 0: 'abc' is not a number",
    ),
    (
        "csv empty cell",
        "POST",
        "/invocations",
        {"Content-Type": "text/csv"},
        (",".join(FEATURE_COLUMNS) + "\n" + ",".join(map(str, _with(5, "")))).encode(),
        400,
        "BAD_REQUEST",
        "column 'total_phenols', row 0: the value is missing",
    ),
    (
        "csv repeated header",
        "POST",
        "/invocations",
        {"Content-Type": "text/csv"},
        (",".join([*FEATURE_COLUMNS, "hue"]) + "\n" + ",".join(map(str, [*ROW, 1]))).encode(),
        400,
        "BAD_REQUEST",
        "hue appear more than once",
    ),
    (
        "text/plain",
        "POST",
        "/invocations",
        {"Content-Type": "text/plain"},
        b"1,2",
        415,
        "UNSUPPORTED_MEDIA_TYPE",
        "'text/plain' is not accepted",
    ),
    ("no content type", "POST", "/invocations", {}, b"{}", 415, "UNSUPPORTED_MEDIA_TYPE", "no Content-Type"),
    (
        "too many rows",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"instances": [ROW] * 501},
        413,
        "REQUEST_TOO_LARGE",
        "501 rows; at most 500",
    ),
    (
        "too many bytes",
        "POST",
        "/invocations",
        JSON_TYPE,
        {"instances": [ROW] * 400, "pad": "x" * 200_000},
        413,
        "REQUEST_TOO_LARGE",
        "exceeds 200000 bytes",
    ),
    (
        "v2 wrong shape",
        "POST",
        f"{MODEL}/infer",
        JSON_TYPE,
        _tensor(ROW[:12], (1, 12)),
        400,
        "BAD_REQUEST",
        "shape [1, 12] is not [N, 13]",
    ),
    (
        "v2 data length",
        "POST",
        f"{MODEL}/infer",
        JSON_TYPE,
        _tensor(ROW, (2, 13)),
        400,
        "BAD_REQUEST",
        "needs 26 values, 'data' has 13",
    ),
    (
        "v2 bytes",
        "POST",
        f"{MODEL}/infer",
        JSON_TYPE,
        _tensor(ROW, datatype="BYTES"),
        400,
        "BAD_REQUEST",
        'datatype "BYTES" is not numeric',
    ),
    (
        "v2 float in int tensor",
        "POST",
        f"{MODEL}/infer",
        JSON_TYPE,
        _tensor(ROW, datatype="INT64"),
        400,
        "BAD_REQUEST",
        "column 'alcohol', row 0: 13.2 is not an integer",
    ),
    (
        "v2 string",
        "POST",
        f"{MODEL}/infer",
        JSON_TYPE,
        _tensor(_with(2, "2.1")),
        400,
        "BAD_REQUEST",
        "column 'ash', row 0: '2.1' is text",
    ),
    (
        "v2 unknown input",
        "POST",
        f"{MODEL}/infer",
        JSON_TYPE,
        {
            "inputs": [
                {"name": n, "shape": [1], "datatype": "FP64", "data": [v]} for n, v in {**RECORD, "colour": 1.0}.items()
            ]
        },
        400,
        "BAD_REQUEST",
        "colour are not features",
    ),
    (
        "v2 missing input",
        "POST",
        f"{MODEL}/infer",
        JSON_TYPE,
        {"inputs": [{"name": n, "shape": [1], "datatype": "FP64", "data": [v]} for n, v in list(RECORD.items())[:12]]},
        400,
        "BAD_REQUEST",
        "missing input(s) proline",
    ),
    (
        "v2 unknown output",
        "POST",
        f"{MODEL}/infer",
        JSON_TYPE,
        {**_tensor(ROW), "outputs": [{"name": "logits"}]},
        400,
        "BAD_REQUEST",
        "unknown output(s) logits",
    ),
    (
        "v2 id not a string",
        "POST",
        f"{MODEL}/infer",
        JSON_TYPE,
        {**_tensor(ROW), "id": 7},
        400,
        "BAD_REQUEST",
        "'id' must be a string",
    ),
    (
        "unknown model",
        "POST",
        "/v2/models/iris/infer",
        JSON_TYPE,
        _tensor(ROW),
        404,
        "RESOURCE_DOES_NOT_EXIST",
        "no model named 'iris'",
    ),
    (
        "unknown version",
        "POST",
        f"{MODEL}/versions/9/infer",
        JSON_TYPE,
        _tensor(ROW),
        404,
        "RESOURCE_DOES_NOT_EXIST",
        "v9 is not in the registry",
    ),
    ("not a version", "GET", f"{MODEL}/versions/latest", {}, None, 404, "RESOURCE_DOES_NOT_EXIST", "latest"),
    ("unknown path", "GET", "/predict", {}, None, 404, "RESOURCE_DOES_NOT_EXIST", "no such endpoint"),
    ("wrong method", "GET", "/invocations", {}, None, 405, "METHOD_NOT_ALLOWED", "Method Not Allowed"),
    (
        "feedback unknown id",
        "POST",
        "/feedback",
        {**JSON_TYPE, **bearer()},
        {"prediction_id": "nope-0", "true_class": 1},
        404,
        "RESOURCE_DOES_NOT_EXIST",
        "no prediction with id 'nope-0'",
    ),
    (
        "4301-digit integer",
        "POST",
        "/invocations",
        JSON_TYPE,
        b'{"inputs": [[' + b"9" * 4301 + b"]]}",
        400,
        "MALFORMED_REQUEST",
        "not valid JSON",
    ),
    (
        "5000 columns",
        "POST",
        "/invocations",
        {"Content-Type": "text/csv"},
        (",".join(["a"] * 5000) + "\n").encode(),
        400,
        "BAD_REQUEST",
        "5000 columns; the model has 13",
    ),
    (
        "csv underscore number",
        "POST",
        "/invocations",
        {"Content-Type": "text/csv"},
        (",".join(FEATURE_COLUMNS) + "\n" + ",".join(map(str, _with(12, "1_050")))).encode(),
        400,
        "BAD_REQUEST",
        "column 'proline', row 0: '1_050' is not a number",
    ),
    (
        "v2 three dimensions",
        "POST",
        f"{MODEL}/infer",
        JSON_TYPE,
        _tensor([[ROW]], (1, 1, 13)),
        400,
        "BAD_REQUEST",
        "more than two dimensions",
    ),
    (
        "feedback shape",
        "POST",
        "/feedback",
        {**JSON_TYPE, **bearer()},
        {"id": "x"},
        400,
        "BAD_REQUEST",
        "prediction_id",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_requests_get_a_json_error_with_status_code_and_message(
    app, method, path, headers, body, status, code, words
):
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    response = app.client.request(method, path, content=content, headers=headers)
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    check_headers(response)
    error = response.json()
    assert error["error_code"] == code
    assert words in error["message"], error["message"]
    assert error["error"] == error["message"]


def test_concurrent_and_repeated_feedback_is_recorded_and_counted_once(app, wines):
    features = wines[list(FEATURE_COLUMNS)].iloc[:40]
    truth = wines["target"].iloc[:40].tolist()
    predictions = app.client.post("/invocations", json={"instances": features.to_numpy().tolist()}).json()
    ids = [p["prediction_id"] for p in predictions["predictions"]]
    before = app.metrics()
    answers: list[httpx.Response] = []

    def send(index: int) -> None:
        for _ in range(2):  # each label twice: the second is answered, not counted again
            answers.append(
                app.client.post(
                    "/feedback", json={"prediction_id": ids[index], "true_class": truth[index]}, headers=bearer()
                )
            )

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(ids))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(response.status_code for response in answers) == [200] * 80, [a.text for a in answers][:3]
    assert {answer.json()["correct"] for answer in answers} <= {True, False}
    after = app.metrics()
    counted = sum(
        metric_value(after, "wine_serving_feedback_total", variant="production", outcome=outcome)
        - metric_value(before, "wine_serving_feedback_total", variant="production", outcome=outcome)
        for outcome in ("correct", "wrong")
    )
    assert counted == 40
    with sqlite3.connect(app.prediction_log) as connection:
        stored = dict(connection.execute("SELECT prediction_id, true_class FROM feedback").fetchall())
    assert [stored[prediction_id] for prediction_id in ids] == truth


def test_a_bad_feedback_class_names_the_classes(app):
    prediction = app.client.post("/invocations", json={"instances": [ROW]}).json()["predictions"][0]
    response = app.client.post(
        "/feedback", json={"prediction_id": prediction["prediction_id"], "true_class": 7}, headers=bearer()
    )
    assert response.status_code == 400
    assert "true_class 7 is not a class of this model: use one of [0, 1, 2]" in response.json()["message"]


def test_rejected_rows_are_counted_by_reason(app):
    before = metric_value(app.metrics(), "wine_serving_rejected_rows_total", reason="out_of_bounds")
    refused = app.client.post("/invocations", json={"instances": [ROW, _with(0, 1000.0), _with(1, 1000.0)]})
    assert refused.status_code == 400
    assert metric_value(app.metrics(), "wine_serving_rejected_rows_total", reason="out_of_bounds") == before + 3


def test_metrics_count_requests_predictions_and_latency(app):
    """In-process the default registry answers /metrics; several workers' files are test_serving.py's."""
    text = app.metrics()
    before = metric_value(text, "wine_serving_predictions_total", version="1", variant="production")
    requests_before = metric_value(text, "wine_serving_requests_total", endpoint="/invocations", status="200")
    latency_before = metric_value(text, "wine_serving_request_duration_seconds_count", endpoint="/invocations")
    assert app.client.post("/invocations", json={"instances": [ROW] * 5}).status_code == 200
    response = app.client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric_value(text, "wine_serving_predictions_total", version="1", variant="production") == before + 5
    assert (
        metric_value(text, "wine_serving_requests_total", endpoint="/invocations", status="200") == requests_before + 1
    )
    assert (
        metric_value(text, "wine_serving_request_duration_seconds_count", endpoint="/invocations") == latency_before + 1
    )
    assert metric_value(text, "wine_serving_requests_in_flight") >= 1  # this /metrics request itself
    assert metric_value(text, "wine_serving_model_version", role="production") == 1


# -- readiness, hot reload, rollback, tampering ------------------------------------------------------------
def test_503_with_retry_after_until_the_first_release(tmp_path, versions):
    with serving_app(tmp_path / "empty") as app:
        for path in ("/ping", "/health", "/v2/health/ready", f"{MODEL}/ready"):
            response = app.client.get(path)
            assert response.status_code == 503, path
            assert response.headers["retry-after"] == "1"
            assert response.json()["error_code"] == "MODEL_NOT_READY"
        refused = app.client.post("/invocations", json={"instances": [ROW]})
        assert refused.status_code == 503 and refused.headers["x-model-version"] == "none"
        assert app.client.get("/v2/health/live").status_code == 200
        publish(app.registry, versions, 1)
        wait_until(lambda: app.client.get("/ping").status_code == 200, app, "/ping answered 200")
        answer = app.client.post("/invocations", json={"instances": [ROW]})
    assert answer.status_code == 200 and answer.headers["x-model-version"] == "1"


def test_a_rollback_is_followed_and_a_tampered_version_is_never_served(tmp_path, versions):
    publish(tmp_path / "registry", versions, 1)
    publish(tmp_path / "registry", versions, 2, production=False)
    with serving_app(tmp_path) as app:
        registry = ModelRegistry(app.registry)
        wait_for_version(app, "1")
        registry.set_production(2)  # what `wine-assets registry rollback 2` does
        wait_for_version(app, "2")
        registry.set_production(1)
        wait_for_version(app, "1")
        failures = metric_value(app.metrics(), "wine_serving_model_reloads_total", outcome="failure")
        # v2's model bytes change after release; the alias is then pointed at it by hand.
        model_file = registry.version_dir(2) / "model.skops"
        content = model_file.read_bytes()
        model_file.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))  # one bit of the last byte
        registry.alias_path.write_text("v2\n")
        wait_until(
            lambda: metric_value(app.metrics(), "wine_serving_model_reloads_total", outcome="failure") > failures,
            app,
            "the failed load counted",
        )
        assert app.client.get("/ping").status_code == 200
        answer = app.client.post("/invocations", json={"instances": [ROW]})
        pinned = app.client.post(f"{MODEL}/versions/2/infer", json=_tensor(ROW))
        time.sleep(3 * POLL)  # more polls: v2 is not tried again (retry_seconds) and v1 keeps serving
        assert app.client.get("/ping").headers["x-model-version"] == "1"
    assert answer.status_code == 200 and answer.json()["model_version"] == 1
    assert pinned.status_code == 503 and "does not match its sha256" in pinned.json()["message"]
    assert "wine-classifier/v2: model.skops does not match its sha256" in pinned.json()["message"]
    assert str(app.registry) not in pinned.json()["message"]  # no path of the machine's
    assert any("does not match its sha256" in message for message in app.log), app.log


# -- A/B testing -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split_app(tmp_path_factory, versions) -> Iterator[App]:
    folder = tmp_path_factory.mktemp("split")
    publish(folder / "registry", versions, 1)
    publish(folder / "registry", versions, 2, production=False)
    with serving_app(folder, experiment="small-forest", candidate_version=2, candidate_weight=0.3) as running:
        wait_until(
            lambda: (
                running.client.get("/ping").status_code == 200
                and running.client.get("/version").json()["candidate_version"] == 2
            ),
            running,
            "production and candidate loaded",
        )
        yield running


def test_the_split_is_sticky_and_close_to_the_weight(split_app):
    """The assignment is the same in every process (test_serving_parts.py runs it under other hash
    seeds): what the app answers is exactly that assignment."""
    before = metric_value(split_app.metrics(), "wine_serving_predictions_total", variant="candidate")
    keys = [f"customer-{number}" for number in range(2000)]
    variants = {}
    for key in keys:
        response = split_app.client.post("/invocations", json={"instances": [ROW]}, headers={"X-Routing-Key": key})
        assert response.status_code == 200
        variants[key] = response.json()["variant"]
        assert response.json()["model_version"] == (2 if variants[key] == "candidate" else 1)
        assert response.headers["x-model-version"] == str(response.json()["model_version"])
    assert variants == {key: assign("small-forest", 0.3, key) for key in keys}
    share = sum(variant == "candidate" for variant in variants.values()) / len(keys)
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / len(keys)) ** 0.5  # within four standard errors
    again = [
        split_app.client.post("/invocations", json={"instances": [ROW]}, headers={"X-Routing-Key": key}).json()
        for key in keys[:200]
    ]
    assert [body["variant"] for body in again] == [variants[key] for key in keys[:200]]
    served_by = metric_value(split_app.metrics(), "wine_serving_predictions_total", variant="candidate") - before
    candidates = sum(variant == "candidate" for variant in variants.values())
    assert served_by == candidates + sum(body["variant"] == "candidate" for body in again)


def test_feedback_moves_the_metrics_and_the_report(split_app, wines, wine_assets_cli):
    features = wines[list(FEATURE_COLUMNS)]
    truth = dict(enumerate(wines["target"].tolist()))
    client = split_app.client
    before = split_app.metrics()
    answered = []
    for row in range(len(features)):
        body = {"instances": [features.iloc[row].tolist()]}
        response = client.post("/invocations", json=body, headers={"X-Routing-Key": f"wine-{row}"}).json()
        answered.append((row, response["variant"], response["predictions"][0]))
    for row, _, prediction in answered:
        sent = client.post(
            "/feedback", json={"prediction_id": prediction["prediction_id"], "true_class": truth[row]}, headers=bearer()
        )
        assert sent.status_code == 200, sent.text
    again = client.post(
        "/feedback",
        json={"prediction_id": answered[0][2]["prediction_id"], "true_class": (truth[0] + 1) % 3},
        headers=bearer(),
    )
    assert again.status_code == 409 and "already has the true class" in again.json()["message"]
    after = split_app.metrics()
    for variant in ("production", "candidate"):
        mine = [(row, p) for row, v, p in answered if v == variant]
        correct = sum(p["predicted_class"] == truth[row] for row, p in mine)
        assert (
            metric_value(after, "wine_serving_feedback_total", variant=variant, outcome="correct")
            - metric_value(before, "wine_serving_feedback_total", variant=variant, outcome="correct")
            == correct
        )
        assert (
            metric_value(after, "wine_serving_feedback_total", variant=variant, outcome="wrong")
            - metric_value(before, "wine_serving_feedback_total", variant=variant, outcome="wrong")
            == len(mine) - correct
        )
    report = wine_assets_cli("--params", split_app.params_file, "serving", "report", "--json")
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["experiment"] == "small-forest" and summary["mode"] == "split"
    by_variant = {item["variant"]: item for item in summary["variants"]}
    for variant in ("production", "candidate"):
        mine = [(row, p) for row, v, p in answered if v == variant]
        assert by_variant[variant]["labelled"] == len(mine)
        assert by_variant[variant]["correct"] == sum(p["predicted_class"] == truth[row] for row, p in mine)
        low, high = by_variant[variant]["interval"]
        assert low <= by_variant[variant]["accuracy"] <= high
    assert 0 <= summary["comparison"]["fisher_p_value"] <= 1
    text = wine_assets_cli("--params", split_app.params_file, "serving", "report", "--min-labelled", "1000")
    assert text.returncode == 0 and "WARNING: too few labelled predictions to decide" in text.stdout
    assert "decision: no decision: too few labelled predictions" in text.stdout


def test_shadow_mode_never_changes_an_answer(tmp_path, versions, wines):
    publish(tmp_path / "registry", versions, 1)
    publish(tmp_path / "registry", versions, 2, production=False)
    features = wines[list(FEATURE_COLUMNS)]
    expected = expected_predictions(tmp_path / "registry", features)
    shadow = expected_predictions(tmp_path / "registry", features, version="2")
    with serving_app(tmp_path, experiment="shadow-small", candidate_version=2, candidate_mode="shadow") as app:
        wait_until(
            lambda: (
                app.client.get("/ping").status_code == 200
                and app.client.get("/version").json()["candidate_version"] == 2
            ),
            app,
            "production and candidate loaded",
        )
        before = app.metrics()
        bodies = [
            app.client.post("/invocations", json={"instances": [row]}, headers={"X-Routing-Key": str(i)}).json()
            for i, row in enumerate(features.to_numpy().tolist())
        ]

        def compared() -> float:
            return metric_value(app.metrics(), "wine_serving_shadow_comparisons_total") - metric_value(
                before, "wine_serving_shadow_comparisons_total"
            )

        wait_until(lambda: compared() >= len(features), app, "every row compared with the shadow")
        text = app.metrics()
    # the app has stopped: its log is written out and closed
    answered = pd.DataFrame([body["predictions"][0] for body in bodies])
    assert {body["variant"] for body in bodies} == {"production"} and {b["model_version"] for b in bodies} == {1}
    assert np.array_equal(answered[PROBABILITIES].to_numpy(), expected[PROBABILITIES].to_numpy())
    agree = int((shadow["predicted_class"] == expected["predicted_class"]).sum())
    assert agree < len(features)  # the candidate does disagree on some wines, and still never answers

    def delta(outcome: str) -> float:
        return metric_value(text, "wine_serving_shadow_comparisons_total", outcome=outcome) - metric_value(
            before, "wine_serving_shadow_comparisons_total", outcome=outcome
        )

    assert delta("agree") == agree
    assert delta("disagree") == len(features) - agree
    with sqlite3.connect(app.prediction_log) as connection:
        rows = connection.execute(
            "SELECT prediction_id, variant, shadow_version, shadow_class FROM predictions"
        ).fetchall()
    assert len(rows) == len(features) and {(v, sv) for _, v, sv, _ in rows} == {("production", 2)}
    logged = {prediction_id: shadow_class for prediction_id, _, _, shadow_class in rows}
    assert [logged[p] for p in answered["prediction_id"]] == shadow["predicted_class"].tolist()
