"""`wine-assets serve` over real HTTP: a uvicorn server in its own process group on a free port
of 127.0.0.1, stopped in `finally`. Every answer is compared with `wine_assets.predict.predict`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from wine_assets.features import fit_scaler, split_frame
from wine_assets.files import joblib_bytes
from wine_assets.ingestion import load_builtin_frame
from wine_assets.params import ModelParams
from wine_assets.predict import clear_cache, predict
from wine_assets.registry import REFERENCE_FILE, ModelRegistry
from wine_assets.services import free_port
from wine_assets.serving.state import assign
from wine_assets.training import train_model
from wine_assets.validation import FEATURE_COLUMNS

from .conftest import start_in_group, stop_group

BIN = Path(sys.executable).parent
MODEL = "/v2/models/wine-classifier"
PROBABILITIES = ["probability_class_0", "probability_class_1", "probability_class_2"]
POLL = 0.5


# -- a registry with two real versions ----------------------------------------------------------
@pytest.fixture(scope="module")
def wines() -> pd.DataFrame:
    frame = load_builtin_frame()
    return frame.rename(columns=dict(zip(frame.columns[:13], FEATURE_COLUMNS, strict=True)))


@dataclass
class Versions:
    """Bundles ready to publish: the production forest and a small, different challenger."""

    files: dict[int, dict[str, bytes]]
    fields: dict


@pytest.fixture(scope="module")
def versions(wines) -> Versions:
    train, _ = split_frame(wines, 0.2, 42)
    scaler = fit_scaler(train)
    files = {}
    for number, model_params in ((1, ModelParams()), (2, ModelParams(n_estimators=3, max_depth=2, random_state=7))):
        model = train_model(train, scaler, model_params).model
        files[number] = {
            "model.joblib": joblib_bytes(model),
            "scaler.joblib": joblib_bytes(scaler),
            REFERENCE_FILE: train.drop(columns="target").to_csv(index=False).encode(),
        }
    return Versions(files, {"class_values": [0, 1, 2], "class_labels": ["class_0", "class_1", "class_2"]})


def publish(registry_dir: Path, versions: Versions, number: int, production: bool = True) -> int:
    return (
        ModelRegistry(registry_dir).publish(versions.files[number], versions.fields, set_production=production).version
    )


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
    settings = {"reload_interval_seconds": POLL, "log_path": "predictions.sqlite", **serving}
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
            if all(_in_group(int(pid), process.pid) for pid in ready_workers(server.metrics())):
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


@pytest.fixture(scope="module")
def server(tmp_path_factory, versions) -> Server:
    """Two workers serving v1; small limits so the 413 cases stay small."""
    folder = tmp_path_factory.mktemp("serve")
    publish(folder / "registry", versions, 1)
    running = start_server(folder, workers=2, max_rows=500, max_body_bytes=200_000)
    yield running
    stop_group(running.process)


def expected_predictions(registry_dir: Path, frame: pd.DataFrame, version: str | None = None) -> pd.DataFrame:
    clear_cache()
    return predict(frame[list(FEATURE_COLUMNS)], registry_dir=registry_dir, version=version).predictions


def check_headers(response: httpx.Response) -> None:
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", response.headers["x-request-id"])
    assert response.headers["x-model-version"]


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


def test_every_protocol_and_format_returns_exactly_the_batch_probabilities(server, wines):
    features = wines[list(FEATURE_COLUMNS)]
    expected = expected_predictions(server.registry, features)
    with server.client() as client:
        for name, (path, document, csv_text) in _bodies(features).items():
            if csv_text is None:
                response = client.post(path, json=document)
            else:
                response = client.post(path, content=csv_text, headers={"Content-Type": "text/csv"})
            assert response.status_code == 200, (name, response.text[:500])
            check_headers(response)
            assert response.headers["x-model-version"] == "1"
            classes, probabilities = probabilities_of(response)
            assert (classes == expected["predicted_class"].to_numpy()).all(), name
            assert np.array_equal(probabilities, expected[PROBABILITIES].to_numpy()), name
    assert response.json()["model_version"] == "1"


def test_the_response_names_version_variant_and_echoes_ids(server, wines):
    row = wines[list(FEATURE_COLUMNS)].iloc[:2]
    with server.client() as client:
        mlflow = client.post(
            "/invocations",
            json={"dataframe_records": row.to_dict("records")},
            headers={"X-Request-ID": "client-chosen.1"},
        )
        v2 = client.post(
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


def test_health_version_and_metadata(server):
    with server.client() as client:
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
            response = client.get(path)
            assert response.status_code == 200, path
            check_headers(response)
        metadata = client.get(MODEL).json()
        assert [item["name"] for item in metadata["inputs"]] == list(FEATURE_COLUMNS)
        assert {item["datatype"] for item in metadata["inputs"]} == {"FP64"}
        assert metadata["versions"] == ["1"] and metadata["parameters"]["production_version"] == "1"
        assert client.get("/version").json()["model_version"] == 1


# -- bad input: a JSON error, never a crash -----------------------------------------------------------
ROW = [13.2, 1.78, 2.14, 11.2, 100.0, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050.0]
RECORD = dict(zip(FEATURE_COLUMNS, ROW, strict=True))


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
        JSON_TYPE,
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
    ("feedback shape", "POST", "/feedback", JSON_TYPE, {"id": "x"}, 400, "BAD_REQUEST", "prediction_id"),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_requests_get_a_json_error_with_status_code_and_message(
    server, method, path, headers, body, status, code, words
):
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    with server.client() as client:
        response = client.request(method, path, content=content, headers=headers)
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    check_headers(response)
    error = response.json()
    assert error["error_code"] == code
    assert words in error["message"], error["message"]
    assert error["error"] == error["message"]


def test_concurrent_and_repeated_feedback_is_recorded_and_counted_once(server, wines):
    features = wines[list(FEATURE_COLUMNS)].iloc[:40]
    truth = wines["target"].iloc[:40].tolist()
    with server.client() as client:
        predictions = client.post("/invocations", json={"instances": features.to_numpy().tolist()}).json()
    ids = [p["prediction_id"] for p in predictions["predictions"]]
    before = server.metrics()
    answers: list[httpx.Response] = []

    def send(index: int) -> None:
        with server.client() as client:
            for _ in range(2):  # each label twice: the second is answered, not counted again
                answers.append(client.post("/feedback", json={"prediction_id": ids[index], "true_class": truth[index]}))

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


def test_a_bad_feedback_class_names_the_classes(server):
    with server.client() as client:
        prediction = client.post("/invocations", json={"instances": [ROW]}).json()["predictions"][0]
        response = client.post("/feedback", json={"prediction_id": prediction["prediction_id"], "true_class": 7})
    assert response.status_code == 400
    assert "true_class 7 is not a class of this model: use one of [0, 1, 2]" in response.json()["message"]


def test_rejected_rows_are_counted_by_reason(server):
    before = metric_value(server.metrics(), "wine_serving_rejected_rows_total", reason="out_of_bounds")
    with server.client() as client:
        client.post("/invocations", json={"instances": [ROW, _with(0, 1000.0), _with(1, 1000.0)]})
    assert metric_value(server.metrics(), "wine_serving_rejected_rows_total", reason="out_of_bounds") == before + 3


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


# -- metrics -------------------------------------------------------------------------------------------
def metric_value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(key) == str(value) for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def ready_workers(text: str) -> dict[str, float]:
    return {
        re.search(r'pid="(\d+)"', line).group(1): float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("wine_serving_model_ready{")
    }


def worker_versions(text: str, role: str = "production") -> dict[str, float]:
    versions = {}
    for line in text.splitlines():
        if line.startswith("wine_serving_model_version{") and f'role="{role}"' in line:
            pid = re.search(r'pid="(\d+)"', line).group(1)
            versions[pid] = float(line.rsplit(" ", 1)[1])
    return versions


def test_metrics_count_requests_predictions_and_workers(server):
    text = server.metrics()
    before = metric_value(text, "wine_serving_predictions_total", version="1", variant="production")
    with server.client() as client:
        assert client.post("/invocations", json={"instances": [ROW] * 5}).status_code == 200
    text = server.metrics()
    assert metric_value(text, "wine_serving_predictions_total", version="1", variant="production") == before + 5
    assert metric_value(text, "wine_serving_requests_total", endpoint="/invocations", status="200") >= 1
    assert metric_value(text, "wine_serving_request_duration_seconds_count", endpoint="/invocations") >= 1
    assert "wine_serving_requests_in_flight" in text
    assert sorted(worker_versions(text).values()) == [1.0, 1.0]  # both workers, each with its own pid


def test_promtool_accepts_the_live_metrics(server):
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=server.metrics(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- readiness, hot reload, rollback, tampering ------------------------------------------------------------
def test_503_with_retry_after_until_the_first_release(tmp_path, versions, wines):
    server = start_server(tmp_path / "empty", wait_ready=False)
    try:
        with server.client() as client:
            for path in ("/ping", "/health", "/v2/health/ready", f"{MODEL}/ready"):
                response = client.get(path)
                assert response.status_code == 503, path
                assert response.headers["retry-after"] == "1"
                assert response.json()["error_code"] == "MODEL_NOT_READY"
            refused = client.post("/invocations", json={"instances": [ROW]})
            assert refused.status_code == 503 and refused.headers["x-model-version"] == "none"
            assert client.get("/v2/health/live").status_code == 200
            publish(server.registry, versions, 1)
            wait_for(server, "/ping", timeout=30)
            answer = client.post("/invocations", json={"instances": [ROW]})
        assert answer.status_code == 200 and answer.headers["x-model-version"] == "1"
    finally:
        stop_group(server.process)


def test_a_release_under_load_fails_no_request_and_every_worker_moves(tmp_path, versions, wines):
    folder = tmp_path / "reload"
    publish(folder / "registry", versions, 1)
    server = start_server(folder, workers=2)
    results: list[tuple[float, int, str]] = []
    errors: list[str] = []
    stop = threading.Event()
    body = {"instances": wines[list(FEATURE_COLUMNS)].iloc[:3].to_numpy().tolist()}

    def client_loop():
        with server.client() as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post("/invocations", json=body)
                    results.append((started, response.status_code, response.headers["x-model-version"]))
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))

    try:
        threads = [threading.Thread(target=client_loop) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        publish(server.registry, versions, 2)
        released_at = time.monotonic()  # the alias moves at the end of publish
        time.sleep(3.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        final = server.metrics()
    finally:
        stop.set()
        stop_group(server.process)
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
    assert metric_value(final, "wine_serving_model_reloads_total", role="production", outcome="success") == 4


def test_a_rollback_is_followed_and_a_tampered_version_is_never_served(tmp_path, versions):
    folder = tmp_path / "tamper"
    publish(folder / "registry", versions, 1)
    publish(folder / "registry", versions, 2, production=False)
    server = start_server(folder)
    registry = ModelRegistry(server.registry)
    try:
        registry.set_production(2)  # what `wine-assets registry rollback 2` does
        wait_for_version(server, "2")
        registry.set_production(1)
        wait_for_version(server, "1")
        # v2's model bytes change after release; the alias is then pointed at it by hand.
        model_file = registry.version_dir(2) / "model.joblib"
        model_file.write_bytes(model_file.read_bytes()[:-1] + b"\x00")
        registry.alias_path.write_text("v2\n")
        deadline = time.monotonic() + 20
        while metric_value(server.metrics(), "wine_serving_model_reloads_total", outcome="failure") < 1:
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.1)
        with server.client() as client:
            assert client.get("/ping").status_code == 200
            answer = client.post("/invocations", json={"instances": [ROW]})
            pinned = client.post(f"{MODEL}/versions/2/infer", json=_tensor(ROW))
        assert answer.status_code == 200 and answer.json()["model_version"] == 1
        assert pinned.status_code == 503 and "does not match its sha256" in pinned.json()["message"]
        assert "wine-classifier/v2: model.joblib does not match its sha256" in pinned.json()["message"]
        assert str(server.registry) not in pinned.json()["message"]  # no path of the machine's
        assert "does not match its sha256" in server.log.read_text()
    finally:
        stop_group(server.process)


def test_a_killed_worker_is_replaced_and_its_gauges_go_with_it(tmp_path, versions):
    folder = tmp_path / "killed"
    publish(folder / "registry", versions, 1)
    server = start_server(folder, workers=2)
    try:
        before = ready_workers(server.metrics())
        victim = sorted(before)[0]
        os.kill(int(victim), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            now = ready_workers(server.metrics())
            if victim not in now and len(now) == 2 and sum(now.values()) == 2:
                break
            assert time.monotonic() < deadline, (now, server.log.read_text()[-2000:])
            time.sleep(0.2)
        assert victim not in worker_versions(server.metrics())
        with server.client() as client:
            assert client.post("/invocations", json={"instances": [ROW]}).status_code == 200
    finally:
        stop_group(server.process)


def wait_for_version(server: Server, version: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/ping", timeout=5).headers.get("x-model-version") == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not move to v{version}:\n{server.log.read_text()[-2000:]}")


def test_sigterm_lets_the_request_in_flight_finish(tmp_path, versions, wines):
    folder = tmp_path / "drain"
    publish(folder / "registry", versions, 1)
    server = start_server(folder, max_rows=100_000, max_body_bytes=50_000_000)
    rows = np.tile(wines[list(FEATURE_COLUMNS)].to_numpy(), (300, 1)).tolist()  # 53,400 rows
    outcome: dict = {}

    def send():
        with server.client() as client:
            outcome["response"] = client.post("/invocations", json={"instances": rows})

    try:
        sender = threading.Thread(target=send)
        sender.start()
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
    response = outcome["response"]
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == len(rows)


# -- A/B testing -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split_server(tmp_path_factory, versions) -> Server:
    folder = tmp_path_factory.mktemp("split")
    publish(folder / "registry", versions, 1)
    publish(folder / "registry", versions, 2, production=False)
    running = start_server(folder, workers=2, experiment="small-forest", candidate_version=2, candidate_weight=0.3)
    wait_for(running, "/version", timeout=30)
    deadline = time.monotonic() + 30
    while (
        httpx.get(f"{running.url}/version").json()["candidate_version"] != 2
        or len(worker_versions(running.metrics(), "candidate")) < 2
    ):
        assert time.monotonic() < deadline, running.log.read_text()[-2000:]
        time.sleep(0.1)
    yield running
    stop_group(running.process)


def test_the_split_is_sticky_the_same_in_every_worker_and_close_to_the_weight(split_server):
    keys = [f"customer-{number}" for number in range(2000)]
    variants = {}
    # New connections spread the requests over both workers.
    for key in keys:
        response = httpx.post(
            f"{split_server.url}/invocations", json={"instances": [ROW]}, headers={"X-Routing-Key": key}, timeout=10
        )
        assert response.status_code == 200
        variants[key] = response.json()["variant"]
        assert response.json()["model_version"] == (2 if variants[key] == "candidate" else 1)
    assert variants == {key: assign("small-forest", 0.3, key) for key in keys}
    share = sum(variant == "candidate" for variant in variants.values()) / len(keys)
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / len(keys)) ** 0.5  # within four standard errors
    with split_server.client() as client:
        again = [
            client.post("/invocations", json={"instances": [ROW]}, headers={"X-Routing-Key": key}).json()
            for key in keys[:200]
        ]
    assert [body["variant"] for body in again] == [variants[key] for key in keys[:200]]
    served_by = metric_value(split_server.metrics(), "wine_serving_predictions_total", variant="candidate")
    assert served_by >= sum(variant == "candidate" for variant in variants.values())


def test_feedback_moves_the_metrics_and_the_report(split_server, wines, tmp_path):
    features = wines[list(FEATURE_COLUMNS)]
    truth = dict(enumerate(wines["target"].tolist()))
    before = split_server.metrics()
    answered = []
    with split_server.client() as client:
        for row in range(len(features)):
            body = {"instances": [features.iloc[row].tolist()]}
            response = client.post("/invocations", json=body, headers={"X-Routing-Key": f"wine-{row}"}).json()
            answered.append((row, response["variant"], response["predictions"][0]))
        for row, _, prediction in answered:
            sent = client.post(
                "/feedback", json={"prediction_id": prediction["prediction_id"], "true_class": truth[row]}
            )
            assert sent.status_code == 200, sent.text
        again = client.post(
            "/feedback", json={"prediction_id": answered[0][2]["prediction_id"], "true_class": (truth[0] + 1) % 3}
        )
        assert again.status_code == 409 and "already has the true class" in again.json()["message"]
    after = split_server.metrics()
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
    report = subprocess.run(
        [str(BIN / "wine-assets"), "--params", str(split_server.folder / "params.yaml"), "serving", "report", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    text = subprocess.run(
        [
            str(BIN / "wine-assets"),
            "--params",
            str(split_server.folder / "params.yaml"),
            "serving",
            "report",
            "--min-labelled",
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert text.returncode == 0 and "WARNING: too few labelled predictions to decide" in text.stdout
    assert "decision: no decision: too few labelled predictions" in text.stdout


def test_shadow_mode_never_changes_an_answer(tmp_path, versions, wines):
    folder = tmp_path / "shadow"
    publish(folder / "registry", versions, 1)
    publish(folder / "registry", versions, 2, production=False)
    server = start_server(folder, experiment="shadow-small", candidate_version=2, candidate_mode="shadow")
    features = wines[list(FEATURE_COLUMNS)]
    expected = expected_predictions(server.registry, features)
    shadow = expected_predictions(server.registry, features, version="2")
    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/version").json()["candidate_version"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with server.client() as client:
            bodies = [
                client.post("/invocations", json={"instances": [row]}, headers={"X-Routing-Key": str(i)}).json()
                for i, row in enumerate(features.to_numpy().tolist())
            ]
        deadline = time.monotonic() + 20
        while metric_value(server.metrics(), "wine_serving_shadow_comparisons_total") < len(features):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        text = server.metrics()
    finally:
        stop_group(server.process)
    answered = pd.DataFrame([body["predictions"][0] for body in bodies])
    assert {body["variant"] for body in bodies} == {"production"} and {b["model_version"] for b in bodies} == {1}
    assert np.array_equal(answered[PROBABILITIES].to_numpy(), expected[PROBABILITIES].to_numpy())
    agree = int((shadow["predicted_class"] == expected["predicted_class"]).sum())
    assert agree < len(features)  # the candidate does disagree on some wines, and still never answers
    assert metric_value(text, "wine_serving_shadow_comparisons_total", outcome="agree") == agree
    assert metric_value(text, "wine_serving_shadow_comparisons_total", outcome="disagree") == len(features) - agree
    with sqlite3.connect(server.prediction_log) as connection:
        rows = connection.execute("SELECT variant, shadow_version, shadow_class FROM predictions").fetchall()
    assert len(rows) == len(features) and {(v, sv) for v, sv, _ in rows} == {("production", 2)}


# -- the real Prometheus ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_server_and_answers_a_query(server, tmp_path):
    if shutil.which("prometheus") is None and os.environ.get("WINE_ASSETS_REQUIRE_SERVICES") != "1":
        pytest.skip("Debian's prometheus package is not installed")
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
            client.post("/invocations", json={"instances": [ROW]})
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


# -- the command line ----------------------------------------------------------------------------------
def test_serve_refuses_bad_arguments_and_params_with_exit_2(tmp_path):
    bad_port = subprocess.run([str(BIN / "wine-assets"), "serve", "--port", "http"], capture_output=True, text=True)
    assert bad_port.returncode == 2 and "'http' is not a port" in bad_port.stderr
    (tmp_path / "params.yaml").write_text("serving: {experiment: rf-300}\n")
    bad_params = subprocess.run([str(BIN / "wine-assets"), "serve"], capture_output=True, text=True, cwd=tmp_path)
    assert bad_params.returncode == 2
    assert "experiment and candidate_version go together" in bad_params.stderr
    assert "Traceback" not in bad_params.stderr
    (tmp_path / "params.yaml").write_text("serving: {log_path: nothing-here.sqlite}\n")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "params.yaml").write_text("serving: {log_path: a-file/predictions.sqlite}\n")
    bad_log = subprocess.run([str(BIN / "wine-assets"), "serve"], capture_output=True, text=True, cwd=tmp_path)
    assert bad_log.returncode == 2 and "serving.log_path: cannot open the prediction log" in bad_log.stderr
    assert "Traceback" not in bad_log.stderr
    (tmp_path / "params.yaml").write_text("serving: {log_path: nothing-here.sqlite}\n")
    missing_log = subprocess.run(
        [str(BIN / "wine-assets"), "serving", "report"], capture_output=True, text=True, cwd=tmp_path
    )
    assert missing_log.returncode == 1 and "no prediction log at" in missing_log.stderr
