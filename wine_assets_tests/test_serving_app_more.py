"""The serving API in-process (``create_app`` under Starlette's TestClient, lifespan running) in the cases
test_serving_app.py leaves out: a server without a prediction log, feedback for versions the registry
no longer holds, a chunked body over the limit, a corrupt log answered with a JSON 500, and shadow
feedback counted for the shadow."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wine_assets.params import load_params
from wine_assets.serving.app import create_app
from wine_assets.serving.log import PredictionLog, PredictionRow
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

POLL = 0.1


@pytest.fixture
def serve(
    monkeypatch: pytest.MonkeyPatch, write_params: Callable[..., Path]
) -> Callable[..., contextlib.AbstractContextManager]:
    """``serve(**serving)``: the app for a params.yaml in tmp_path (registry/ beside it), as a worker of
    `wine-assets serve` builds it, inside a TestClient whose lifespan runs until the block ends."""
    package_logger = logging.getLogger("wine_assets")
    for attribute in ("propagate", "level"):  # create_app points the package logger at stderr; undone after
        monkeypatch.setattr(package_logger, attribute, getattr(package_logger, attribute))
    monkeypatch.setattr(package_logger, "handlers", list(package_logger.handlers))

    @contextlib.contextmanager
    def start(raise_server_exceptions: bool = True, **serving) -> Iterator[TestClient]:
        params_file = write_params(serving={"reload_interval_seconds": POLL, "tokens": FEEDBACK_TOKENS, **serving})
        app = create_app(load_params(params_file))
        with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
            yield client

    return start


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.02)


def log_predictions(path: Path, *rows: PredictionRow) -> None:
    """Rows as another worker (or an earlier server) left them in the shared prediction log."""
    log = PredictionLog(path, interval=0.01)
    try:
        log.append(rows)
        assert log.flush(timeout=5)
    finally:
        log.close()


def test_without_a_prediction_log_answers_are_served_and_feedback_is_refused(tmp_path, serve, versions, wines):
    publish(tmp_path / "registry", versions, 1)
    features = wines[list(FEATURE_COLUMNS)].iloc[:5]
    records = [{**record, "batch": "b-7"} for record in features.to_dict("records")]
    with serve(log_path=None) as client:
        wait_until(lambda: client.get("/ping").status_code == 200, "v1 loaded")
        answer = client.post("/invocations", json={"dataframe_records": records})
        ids = [prediction["prediction_id"] for prediction in answer.json()["predictions"]]
        refused = client.post("/feedback", json={"prediction_id": ids[0], "true_class": 0}, headers=bearer())
    assert answer.status_code == 200
    check_headers(answer)
    body = answer.json()
    assert body["warnings"] == ["ignored column(s) the model does not use: batch"]
    probabilities = np.array([[p[name] for name in PROBABILITIES] for p in body["predictions"]])
    assert np.array_equal(
        probabilities, expected_predictions(tmp_path / "registry", features)[PROBABILITIES].to_numpy()
    )
    assert refused.status_code == 409
    assert refused.json()["error_code"] == "FEEDBACK_DISABLED"
    assert refused.json()["message"] == "this server keeps no prediction log (serving.log_path is null)"
    assert not (tmp_path / "serving").exists()  # no log file was made


def test_before_the_first_release_pinned_inference_and_feedback_say_not_ready(tmp_path, serve):
    log_predictions(tmp_path / "predictions.sqlite", PredictionRow("old-1", "r", None, "pinned", 5, 1))
    infer = {"inputs": [{"name": "x", "shape": [1, 13], "datatype": "FP64", "data": ROW}]}
    with serve(log_path="predictions.sqlite") as client:
        pinned = client.post(f"{MODEL}/versions/1/infer", json=infer)
        feedback = client.post("/feedback", json={"prediction_id": "old-1", "true_class": 1}, headers=bearer())
    assert pinned.status_code == 503
    assert pinned.headers["retry-after"] == "1"
    assert pinned.json()["error_code"] == "MODEL_NOT_READY"
    assert feedback.status_code == 503
    assert feedback.json() == {
        "error_code": "MODEL_NOT_READY",
        "message": "no model is loaded to read the classes from",
        "error": "no model is loaded to read the classes from",
    }


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(tmp_path, serve):
    chunks = (b" " * 1024 for _ in range(65))  # 65 KiB with no Content-Length: only counting can tell
    with serve(log_path="predictions.sqlite") as client:
        refused = client.post("/feedback", content=chunks, headers={"content-type": "application/json", **bearer()})
    assert refused.status_code == 413
    assert refused.json()["error_code"] == "REQUEST_TOO_LARGE"
    assert refused.json()["message"] == "the body exceeds 65536 bytes (serving.max_body_bytes): split the request"


def test_feedback_for_a_version_no_longer_in_the_registry_uses_the_production_classes(tmp_path, serve, versions):
    publish(tmp_path / "registry", versions, 1)
    log_predictions(tmp_path / "predictions.sqlite", PredictionRow("old-1", "r", "spring", "candidate", 99, 1))
    with serve(log_path="predictions.sqlite") as client:
        wait_until(lambda: client.get("/ping").status_code == 200, "v1 loaded")
        by_label = client.post("/feedback", json={"prediction_id": "old-1", "true_class": "class_2"}, headers=bearer())
        again = client.post("/feedback", json={"prediction_id": "old-1", "true_class": 2}, headers=bearer())
        unknown = client.post("/feedback", json={"prediction_id": "old-1", "true_class": "class_9"}, headers=bearer())
    assert by_label.status_code == 200, by_label.text
    assert by_label.json() == {
        "prediction_id": "old-1",
        "true_class": 2,
        "predicted_class": 1,
        "correct": False,
        "variant": "candidate",
        "model_version": 99,
    }
    assert again.status_code == 200 and again.json()["true_class"] == 2
    assert unknown.status_code == 400
    assert unknown.json()["message"] == (
        "true_class \"class_9\" is not a class of this model: use one of [0, 1, 2] or ['class_0', 'class_1', 'class_2']"
    )


def test_a_corrupt_prediction_log_is_a_json_500_naming_the_request(tmp_path, serve, caplog):
    log_file = tmp_path / "predictions.sqlite"
    with serve(raise_server_exceptions=False, log_path="predictions.sqlite") as client:
        logging.getLogger("wine_assets").addHandler(caplog.handler)
        log_file.write_bytes(b"not a SQLite database\n" * 50)  # the log replaced under the running server
        failed = client.post(
            "/feedback", json={"prediction_id": "p-1", "true_class": 0}, headers={"X-Request-ID": "req-500", **bearer()}
        )
        still_live = client.get("/v2/health/live")
    assert failed.status_code == 500
    assert failed.headers["x-request-id"] == "req-500"
    assert failed.json() == {
        "error_code": "INTERNAL_ERROR",
        "message": "the server failed; request id req-500",
        "error": "the server failed; request id req-500",
    }
    assert "request req-500 failed" in [record.getMessage() for record in caplog.records]
    assert still_live.status_code == 200


def test_feedback_on_a_shadowed_prediction_is_counted_for_the_shadow_too(tmp_path, serve, versions):
    publish(tmp_path / "registry", versions, 1)
    publish(tmp_path / "registry", versions, 2, production=False)
    shadow = expected_predictions(tmp_path / "registry", pd.DataFrame([RECORD]), version="2")
    shadow_class = int(shadow["predicted_class"].iloc[0])
    with serve(experiment="shadow-1", candidate_version=2, candidate_mode="shadow", log_path="p.sqlite") as client:
        wait_until(lambda: client.get("/version").json()["candidate_version"] == 2, "v1 and the v2 shadow loaded")
        before = client.get("/metrics").text
        answer = client.post("/invocations", json={"dataframe_records": [RECORD]}).json()["predictions"][0]
        feedback = client.post(
            "/feedback", json={"prediction_id": answer["prediction_id"], "true_class": shadow_class}, headers=bearer()
        )
        after = client.get("/metrics").text
    assert feedback.status_code == 200, feedback.text
    assert feedback.json()["variant"] == "production" and feedback.json()["model_version"] == 1

    def counted(variant: str, outcome: str) -> float:
        return metric_value(after, "wine_serving_feedback_total", variant=variant, outcome=outcome) - metric_value(
            before, "wine_serving_feedback_total", variant=variant, outcome=outcome
        )

    assert counted("shadow", "correct") == 1 and counted("shadow", "wrong") == 0
    production_outcome = "correct" if answer["predicted_class"] == shadow_class else "wrong"
    assert counted("production", production_outcome) == 1
