"""The HTTP API: a thin FastAPI layer over ``inputs``, ``state``, ``forest``, ``log`` and ``metrics``.

Endpoints (README "Serving" has examples):

* MLflow scoring protocol: ``POST /invocations``, ``GET /ping``, ``GET /health``, ``GET /version``;
* Open Inference Protocol (KServe V2): ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``GET /v2/models/wine-classifier[/versions/{v}]``, ``.../ready``, ``POST .../infer``;
* ``POST /feedback`` (the true class of an earlier prediction), ``GET /metrics`` (Prometheus).

Every response carries ``X-Request-ID`` (the client's, when it sent a usable one) and
``X-Model-Version``. Every error is a JSON body ``{"error_code", "message", "error"}``: 400
for anything wrong in the request (a ``Host`` not allowed included), 401/403 for a missing or
insufficient token (``access``), 404, 405, 413, 415, and 503 with ``Retry-After`` until a
model is ready. Request bodies are read and checked here, never by FastAPI's validation
(which would answer 422 and accept ``"13.2"`` where a number belongs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Path, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from wine_assets import __name__ as package_name
from wine_assets.params import Params, load_params
from wine_assets.registry import MAX_VERSION_DIGITS, MODEL_NAME, InvalidVersion, RegistryError, VersionNotFound
from wine_assets.serving import access, inputs, metrics
from wine_assets.serving.forest import ServedModel
from wine_assets.serving.log import PredictionLog, PredictionRow, connect, find_prediction, is_busy, record_feedback
from wine_assets.serving.state import PINNED, ServingState, TooManyLoads
from wine_assets.signing import Trust
from wine_assets.validation import FEATURE_COLUMNS

logger = logging.getLogger(__name__)

JSON = "application/json"
OUTPUTS = ("predicted_class", "predicted_label", "probabilities")
INLINE_ROWS = 64  # larger batches are scored on a worker thread so the event loop keeps answering
INLINE_BODY_BYTES = 64 * 1024  # larger bodies are parsed on a worker thread, for the same reason
# Values a body may hold per row of serving.max_rows (3 per feature: room for [N, 1] nesting, keys and
# ignored columns), plus a fixed allowance for what wraps them (objects, shapes, names): see bound_work.
VALUES_PER_ROW = 3 * len(FEATURE_COLUMNS)
VALUES_ANY_REQUEST = 4 * inputs.MAX_COLUMNS
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SCOPE_KEY = "wine_assets"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wine-assets")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None, background=None) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":")).encode(),
        status_code=status,
        media_type=JSON,
        headers=headers,
        background=background,
    )


def error_response(error: inputs.RequestError) -> Response:
    return json_response(error.body(), error.status, error.headers)


def public(state: ServingState, message: str) -> str:
    """A server-side message for a client: file paths relative to the registry, not the machine's."""
    return message.replace(f"{state.registry.root.resolve()}/", "").replace(f"{state.registry.root}/", "")


def not_ready(state: ServingState) -> inputs.RequestError:
    failure = state.last_failure
    detail = f" (the last load failed: {public(state, failure.message)})" if failure else ""
    return inputs.RequestError(
        503,
        "MODEL_NOT_READY",
        f"no model is loaded yet{detail}; the server loads the registry's production version as soon as there "
        "is one (run the release job)",
        reason="not_ready",
        headers={"Retry-After": str(max(1, round(state.interval)))},
    )


class ServingMiddleware:
    """Request id and model version headers, request metrics, and JSON for anything unexpected."""

    def __init__(self, app: Any, state: ServingState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        info = scope[SCOPE_KEY] = {"request_id": request_id, "model_version": None}
        status = 500
        sent = False
        finished = False

        def finish() -> None:
            # At the end of the response body, not of the ASGI call: work scheduled after the
            # response (shadow scoring) is neither latency nor a request in flight.
            nonlocal finished
            if finished:
                return
            finished = True
            metrics.IN_FLIGHT.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics.REQUESTS.labels(endpoint, scope["method"], str(status)).inc()
            metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - started)

        async def send_with_headers(message: dict) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status, sent = message["status"], True
                headers = MutableHeaders(scope=message)
                version = info["model_version"]
                if version is None and self.state.production is not None:
                    version = self.state.production.version
                headers["X-Request-ID"] = request_id
                headers["X-Model-Version"] = "none" if version is None else str(version)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            logger.exception("request %s failed", request_id)
            if not sent:
                error = inputs.RequestError(500, "INTERNAL_ERROR", f"the server failed; request id {request_id}")
                await error_response(error)(scope, receive, send_with_headers)
        finally:
            finish()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    too_large = inputs.RequestError(
        413,
        "REQUEST_TOO_LARGE",
        f"the body exceeds {limit} bytes (serving.max_body_bytes): split the request",
        reason="too_large",
    )
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared[:20]) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise inputs.RequestError(
            499,
            "CLIENT_DISCONNECTED",
            "the client closed the connection before the body arrived",
            reason="client_disconnected",
        ) from None
    return b"".join(chunks)


async def parse_off_loop(function: Any, *args: Any) -> Any:
    """Parse on a worker thread when the body is large, so the event loop keeps answering (health, metrics)."""
    body = args[0]
    if isinstance(body, bytes) and len(body) > INLINE_BODY_BYTES:
        return await run_in_threadpool(function, *args)
    return function(*args)


def bound_work(body: bytes, content_type: str | None, max_rows: int) -> None:
    """413 before parsing when the body holds more values (or CSV lines) than ``max_rows`` rows need.

    ``json.loads`` builds every list in C without letting go of the GIL, so even on a worker thread
    a 4.8 MB body of empty lists (1.6 million) kept the event loop from /ping for 1.2-1.5 s here.
    Counting separators is a few milliseconds; what passes holds at most VALUES_PER_ROW values a row.
    """
    allowed = VALUES_PER_ROW * max_rows + VALUES_ANY_REQUEST
    if inputs.media_type(content_type) == "text/csv":
        lines = max(body.count(b"\n"), body.count(b"\r"))
        if lines > max_rows + 2:  # a header, max_rows rows, and a blank line at the end
            raise inputs.RequestError(
                413,
                "REQUEST_TOO_LARGE",
                f"the CSV has {lines} lines; at most {max_rows} rows (serving.max_rows) and a header are scored "
                "per request: split it",
                reason="too_large",
            )
        values = body.count(b",")
    else:
        values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > allowed:
        raise inputs.RequestError(
            413,
            "REQUEST_TOO_LARGE",
            f"the body holds about {values} values (lists, objects and separated items); a request of at most "
            f"{max_rows} rows (serving.max_rows) needs at most {allowed}: split it",
            reason="too_large",
        )


async def in_log(settings: Any, function: Any, *args: Any) -> Any:
    """``function(*args)`` on the prediction log, on a worker thread. A log locked by another writer
    past ``serving.log_busy_timeout_seconds`` is 503 with Retry-After; any other failure of the log
    (a corrupt file, say) stays the server's error, a 500 naming the request."""
    try:
        return await run_in_threadpool(function, *args)
    except sqlite3.OperationalError as exc:
        if not is_busy(exc):
            raise
        waited = settings.log_busy_timeout_seconds
        message = (
            f"the prediction log is locked by another writer (waited {waited:g} s, "
            "serving.log_busy_timeout_seconds); send the feedback again"
        )
        retry = {"Retry-After": str(max(1, math.ceil(waited)))}
        raise inputs.RequestError(503, "LOG_BUSY", message, reason="unavailable", headers=retry) from None


def _request_info(request: Request) -> dict[str, Any]:
    return request.scope[SCOPE_KEY]


class Service:
    """The request handlers' shared parts: settings, models, log."""

    def __init__(self, params: Params):
        self.params = params
        self.settings = params.serving
        self.state = ServingState(
            params.registry_dir, params.serving, trust=Trust.from_config(params.registry.trusted_keys)
        )
        self.tokens = access.Tokens.from_settings(params.serving)
        self.log_path = params.serving_log_path
        self.log: PredictionLog | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._classes: dict[int, tuple[list[int], list[str]]] = {}

    def start(self) -> None:
        if self.log_path is not None:
            self.log = PredictionLog(self.log_path, on_error=metrics.LOG_DROPPED.inc)
        metrics.claim_worker_index()  # before the first live gauge is set: /metrics labels it by this index
        self.state.start()

    def stop(self) -> None:
        self.state.stop()
        if self.log is not None:
            self.log.close()
        if self._reader is not None:
            self._reader.close()

    def find(self, prediction_id: str) -> PredictionRow | None:
        with self._reader_lock:
            return find_prediction(self._connection(), prediction_id)

    def record_feedback(self, prediction_id: str, true_class: int, labelled_by: str) -> tuple[int, bool]:
        with self._reader_lock:
            return record_feedback(self._connection(), prediction_id, true_class, labelled_by)

    def _connection(self) -> sqlite3.Connection:
        # one connection for the feedback handlers of this worker, used under _reader_lock
        if self._reader is None:
            assert self.log_path is not None
            self._reader = connect(self.log_path, timeout=self.settings.log_busy_timeout_seconds)
        return self._reader

    def model_for(self, request: Request, version: str | None) -> tuple[ServedModel, str, ServedModel | None]:
        if not self.state.ready:
            raise not_ready(self.state)
        if version is not None:
            return self.state.pinned(version), PINNED, None
        key = request.headers.get(self.settings.routing_header) or _request_info(request)["request_id"]
        return self.state.choose(key)

    async def score(
        self, request: Request, features: inputs.Features, model: ServedModel, variant: str, shadow: ServedModel | None
    ) -> tuple[np.ndarray, np.ndarray, list[str], BackgroundTask | None]:
        """Scores, prediction ids, and the after-response work (shadow scoring), if any.

        Log rows are only queued here; the log's own thread writes them.
        """
        info = _request_info(request)
        info["model_version"] = model.version
        if features.rows <= INLINE_ROWS:
            chosen, probabilities = model.predict(features.values)
        else:
            chosen, probabilities = await run_in_threadpool(model.predict, features.values)
        base = uuid.uuid4().hex
        ids = [f"{base}-{row}" for row in range(features.rows)]
        classes = np.asarray(model.class_values)[chosen]
        counts = np.bincount(chosen, minlength=len(model.class_values))
        for value, count in zip(model.class_values, counts.tolist(), strict=True):
            if count:
                metrics.PREDICTIONS.labels(str(model.version), variant, str(value)).inc(count)
        if shadow is not None:  # scored after the response is sent: the shadow never delays an answer
            return (
                chosen,
                probabilities,
                ids,
                BackgroundTask(
                    self._log_rows, info["request_id"], ids, model.version, variant, classes, features.values, shadow
                ),
            )
        self._log_rows(info["request_id"], ids, model.version, variant, classes, features.values, None)
        return chosen, probabilities, ids, None

    def _log_rows(
        self,
        request_id: str,
        ids: list[str],
        version: int,
        variant: str,
        classes: np.ndarray,
        values: np.ndarray,
        shadow: ServedModel | None,
    ) -> None:
        shadow_classes: list[int | None] = [None] * len(ids)
        if shadow is not None:
            shadow_chosen, _ = shadow.predict(values)
            shadow_values = np.asarray(shadow.class_values)[shadow_chosen]
            agree = int((shadow_values == classes).sum())
            metrics.SHADOW.labels("agree").inc(agree)
            metrics.SHADOW.labels("disagree").inc(len(ids) - agree)
            shadow_classes = [int(value) for value in shadow_values]
        if self.log is not None:
            experiment = self.settings.experiment if variant != PINNED else None
            self.log.append(
                PredictionRow(
                    pid,
                    request_id,
                    experiment,
                    variant,
                    version,
                    int(value),
                    shadow.version if shadow else None,
                    shadow_class,
                )
                for pid, value, shadow_class in zip(ids, classes.tolist(), shadow_classes, strict=True)
            )


def _model_metadata(service: Service, versions: list[int]) -> dict[str, Any]:
    production = service.state.production
    return {
        "name": MODEL_NAME,
        "versions": [str(version) for version in versions],
        "platform": "sklearn",
        "inputs": [{"name": name, "datatype": "FP64", "shape": [-1]} for name in FEATURE_COLUMNS],
        "outputs": [
            {"name": "predicted_class", "datatype": "INT64", "shape": [-1]},
            {"name": "predicted_label", "datatype": "BYTES", "shape": [-1]},
            {
                "name": "probabilities",
                "datatype": "FP64",
                "shape": [-1, len(production.class_values) if production else -1],
            },
        ],
        "parameters": {
            "production_version": str(production.version) if production else None,
            "tensor_input": {"shape": [-1, len(FEATURE_COLUMNS)], "datatype": "FP64", "columns": list(FEATURE_COLUMNS)},
            "class_labels": list(production.class_labels) if production else None,
        },
    }


def _bounded(name: str) -> dict[str, Any]:
    low, high = inputs.BOUNDS[name]
    return {"type": "number", "minimum": low, "maximum": high}


# Request bodies are read by the handlers (see the module docstring); these schemas document them
# and let schema-driven clients and fuzzers build valid requests.
_ROW = {
    "type": "array",
    "description": "the 13 features in training order",
    "prefixItems": [_bounded(name) for name in FEATURE_COLUMNS],
    "items": False,
    "minItems": len(FEATURE_COLUMNS),
}
_ROWS = {"type": "array", "items": _ROW, "minItems": 1, "maxItems": 50}
_RECORD = {
    "type": "object",
    "properties": {name: _bounded(name) for name in FEATURE_COLUMNS},
    "required": list(FEATURE_COLUMNS),
}
_EXAMPLE_ROW = [13.2, 1.78, 2.14, 11.2, 100.0, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050.0]


def _one_key(key: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {key: schema}, "required": [key], "additionalProperties": False}


INVOCATIONS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "oneOf": [
                        _one_key(
                            "dataframe_split",
                            {
                                "type": "object",
                                "properties": {"columns": {"const": list(FEATURE_COLUMNS)}, "data": _ROWS},
                                "required": ["columns", "data"],
                            },
                        ),
                        _one_key("dataframe_records", {"type": "array", "items": _RECORD, "minItems": 1}),
                        _one_key("instances", {"oneOf": [_ROWS, {"type": "array", "items": _RECORD, "minItems": 1}]}),
                        _one_key("inputs", _ROWS),
                    ]
                },
                "example": {"inputs": [_EXAMPLE_ROW]},
            },
            "text/csv": {
                "schema": {"type": "string"},
                "example": ",".join(FEATURE_COLUMNS) + "\n" + ",".join(map(str, _EXAMPLE_ROW)) + "\n",
            },
        },
    }
}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype", "data"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "shape": {"const": [1, len(FEATURE_COLUMNS)]},
        "datatype": {"enum": ["FP64", "FP32"]},
        "data": _ROW,
    },
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
                        "outputs": {
                            "type": "array",
                            "items": {"type": "object", "properties": {"name": {"enum": list(OUTPUTS)}}},
                        },
                    },
                },
                "example": {
                    "id": "1",
                    "inputs": [{"name": "features", "shape": [1, 13], "datatype": "FP64", "data": _EXAMPLE_ROW}],
                },
            }
        },
    }
}
FEEDBACK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["prediction_id", "true_class"],
                    "properties": {
                        "prediction_id": {"type": "string"},
                        "true_class": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
                    },
                },
            }
        },
    }
}
ModelName = Annotated[str, Path(json_schema_extra={"enum": [MODEL_NAME]})]
Version = Annotated[str, Path(json_schema_extra={"pattern": "^v?[1-9][0-9]*$", "maxLength": MAX_VERSION_DIGITS + 1})]


def create_app(params: Params | None = None) -> ServingMiddleware:
    """The API for the params' registry (``load_params()`` when not given). uvicorn calls this per worker."""
    _log_to_stderr()
    params = params if params is not None else load_params()
    service = Service(params)
    settings = service.settings

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="wine-assets serving",
        version=_version(),
        summary="The production wine classifier over MLflow's scoring protocol and the Open Inference Protocol.",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(inputs.RequestError)
    async def _request_error(_: Request, error: inputs.RequestError) -> Response:
        if error.reason not in ("not_ready", "not_found", "unavailable", "client_disconnected", "unauthorized"):
            metrics.REJECTED_ROWS.labels(error.reason).inc(max(error.rows, 1))
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> Response:
        codes = {404: "RESOURCE_DOES_NOT_EXIST", 405: "METHOD_NOT_ALLOWED"}
        message = f"{error.detail}" if error.status_code != 404 else "no such endpoint (see /docs for the API)"
        body = inputs.RequestError(error.status_code, codes.get(error.status_code, "BAD_REQUEST"), message).body()
        return json_response(body, error.status_code, dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> Response:
        request_id = request.scope.get(SCOPE_KEY, {}).get("request_id", "?")
        body = inputs.RequestError(500, "INTERNAL_ERROR", f"the server failed; request id {request_id}").body()
        return json_response(body, 500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> Response:
        return error_response(inputs.bad_request(f"the request is not valid: {error.errors()}", "malformed"))

    def model_name(name: str) -> None:
        if name != MODEL_NAME:
            raise inputs.RequestError(
                404,
                "RESOURCE_DOES_NOT_EXIST",
                f"no model named {name!r}; this server has {MODEL_NAME!r}",
                reason="not_found",
            )

    async def pinned_or_404(version: str) -> ServedModel:
        try:
            return await run_in_threadpool(service.state.pinned, version)
        except (VersionNotFound, InvalidVersion) as exc:
            raise inputs.RequestError(404, "RESOURCE_DOES_NOT_EXIST", str(exc), reason="not_found") from None
        except TooManyLoads as exc:
            headers = {"Retry-After": str(exc.retry_after)}
            raise inputs.RequestError(
                429, "TOO_MANY_REQUESTS", str(exc), reason="unavailable", headers=headers
            ) from None
        except Exception as exc:  # anything else about that version is the server's problem, not the client's
            raise inputs.RequestError(
                503,
                "MODEL_UNAVAILABLE",
                f"version {version} cannot be served: {public(service.state, str(exc))}",
                reason="unavailable",
            ) from None

    # -- MLflow scoring protocol -------------------------------------------------------------
    @app.get("/ping", summary="200 when a model is loaded and warmed, 503 before")
    @app.get("/health", summary="200 when a model is loaded and warmed, 503 before")
    async def ping() -> Response:
        if not service.state.ready:
            raise not_ready(service.state)
        return json_response({"status": "ready", "model_version": service.state.production.version})

    @app.get("/version", summary="the server's version and the model versions it serves")
    async def version() -> Response:
        production, candidate = service.state.production, service.state.candidate
        return json_response(
            {
                "server": package_name.replace("_", "-"),
                "server_version": _version(),
                "model_name": MODEL_NAME,
                "model_version": production.version if production else None,
                "experiment": settings.experiment,
                "candidate_version": candidate.version if candidate else None,
                "candidate_mode": settings.candidate_mode if settings.experiment else None,
                "candidate_weight": settings.candidate_weight if settings.experiment else None,
            }
        )

    # The scheme documents the Authorization header in /openapi.json; the handlers check it themselves.
    bearer = [Security(HTTPBearer(auto_error=False, description="a token from `wine-assets serving token new`"))]
    scoring_security = bearer if settings.require_auth_for_predictions else None

    def authorize_scoring(request: Request) -> None:
        if settings.require_auth_for_predictions:
            service.tokens.authorize(request.headers.get("authorization"), "predict")

    @app.post(
        "/invocations",
        summary="score rows (MLflow's four JSON shapes, or text/csv)",
        openapi_extra=INVOCATIONS_BODY,
        dependencies=scoring_security,
    )
    async def invocations(request: Request) -> Response:
        authorize_scoring(request)
        model, variant, shadow = service.model_for(request, None)
        content_type = request.headers.get("content-type")
        if inputs.media_type(content_type) not in (JSON, "text/csv"):
            raise inputs.unsupported_media_type(content_type, (JSON, "text/csv"))
        body = await read_body(request, settings.max_body_bytes)
        features = await parse_off_loop(_parse_invocations_body, body, content_type, settings.max_rows)
        chosen, probabilities, ids, background = await service.score(request, features, model, variant, shadow)
        records = model.records(chosen, probabilities)
        for record, prediction_id in zip(records, ids, strict=True):
            record["prediction_id"] = prediction_id
        payload: dict[str, Any] = {
            "predictions": records,
            "model_version": model.version,
            "variant": variant,
            "request_id": _request_info(request)["request_id"],
        }
        if features.warnings:
            payload["warnings"] = features.warnings
        return json_response(payload, background=background)

    # -- Open Inference Protocol -------------------------------------------------------------
    @app.get("/v2", summary="server metadata")
    async def server_metadata() -> Response:
        return json_response({"name": "wine-assets", "version": _version(), "extensions": []})

    @app.get("/v2/health/live", summary="200 while the process answers")
    async def live() -> Response:
        return json_response({"live": True})

    @app.get("/v2/health/ready", summary="200 when a model is loaded and warmed, 503 before")
    async def ready() -> Response:
        if not service.state.ready:
            raise not_ready(service.state)
        return json_response({"ready": True})

    @app.get("/v2/models/{name}", summary="model metadata: inputs in training order, outputs, versions")
    async def model_metadata(name: ModelName) -> Response:
        model_name(name)
        return json_response(_model_metadata(service, service.state.registry.versions()))

    @app.get("/v2/models/{name}/versions/{version}", summary="metadata of one version")
    async def version_metadata(name: ModelName, version: Version) -> Response:
        model_name(name)
        served = await pinned_or_404(version)
        return json_response(_model_metadata(service, [served.version]))

    @app.get("/v2/models/{name}/ready", summary="200 when the production model is ready")
    async def model_ready(name: ModelName) -> Response:
        model_name(name)
        if not service.state.ready:
            raise not_ready(service.state)
        return json_response({"name": name, "ready": True})

    @app.get("/v2/models/{name}/versions/{version}/ready", summary="200 when that version can be served")
    async def version_ready(name: ModelName, version: Version) -> Response:
        model_name(name)
        served = await pinned_or_404(version)
        return json_response({"name": name, "version": str(served.version), "ready": True})

    async def infer(request: Request, name: str, version: str | None) -> Response:
        authorize_scoring(request)
        model_name(name)
        if version is not None:
            if not service.state.ready:
                raise not_ready(service.state)
            model, variant, shadow = await pinned_or_404(version), PINNED, None
        else:
            model, variant, shadow = service.model_for(request, None)
        content_type = request.headers.get("content-type")
        if inputs.media_type(content_type) != JSON:
            raise inputs.unsupported_media_type(content_type, (JSON,))
        body = await read_body(request, settings.max_body_bytes)
        parsed = await parse_off_loop(_parse_infer_body, body, settings.max_rows)
        chosen, probabilities, ids, background = await service.score(request, parsed.features, model, variant, shadow)
        rows = parsed.features.rows
        outputs = {
            "predicted_class": {
                "name": "predicted_class",
                "datatype": "INT64",
                "shape": [rows],
                "data": np.asarray(model.class_values)[chosen].tolist(),
            },
            "predicted_label": {
                "name": "predicted_label",
                "datatype": "BYTES",
                "shape": [rows],
                "data": [model.class_labels[index] for index in chosen.tolist()],
            },
            "probabilities": {
                "name": "probabilities",
                "datatype": "FP64",
                "shape": [rows, probabilities.shape[1]],
                "data": probabilities.reshape(-1).tolist(),
                "parameters": {"classes": list(model.class_labels)},
            },
        }
        wanted = parsed.outputs or list(OUTPUTS)
        request_id = _request_info(request)["request_id"]
        payload = {
            "model_name": MODEL_NAME,
            "model_version": str(model.version),
            "id": parsed.id if parsed.id is not None else request_id,
            "parameters": {"variant": variant, "prediction_ids": ids, "request_id": request_id},
            "outputs": [outputs[name] for name in wanted],
        }
        if parsed.features.warnings:
            payload["parameters"]["warnings"] = parsed.features.warnings
        return json_response(payload, background=background)

    @app.post(
        "/v2/models/{name}/infer",
        summary="score rows with the production model (or the A/B variant)",
        openapi_extra=INFER_BODY,
        dependencies=scoring_security,
    )
    async def infer_production(request: Request, name: ModelName) -> Response:
        return await infer(request, name, None)

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        summary="score rows with one version",
        openapi_extra=INFER_BODY,
        dependencies=scoring_security,
    )
    async def infer_version(request: Request, name: ModelName, version: Version) -> Response:
        return await infer(request, name, version)

    # -- feedback and metrics ----------------------------------------------------------------
    @app.post(
        "/feedback",
        summary="the true class of an earlier prediction, by its prediction_id (a token with scope feedback)",
        openapi_extra=FEEDBACK_BODY,
        dependencies=bearer,
    )
    async def feedback(request: Request) -> Response:
        caller = service.tokens.authorize(request.headers.get("authorization"), "feedback")
        content_type = request.headers.get("content-type")
        if inputs.media_type(content_type) != JSON:
            raise inputs.unsupported_media_type(content_type, (JSON,))
        document = inputs.decode_json(await read_body(request, 64 * 1024))
        if not isinstance(document, dict) or set(document) != {"prediction_id", "true_class"}:
            raise inputs.bad_request(
                'the body must be {"prediction_id": "...", "true_class": <class or label>}', "feedback"
            )
        prediction_id, label = document["prediction_id"], document["true_class"]
        if not isinstance(prediction_id, str) or not prediction_id:
            raise inputs.bad_request("prediction_id must be the string a prediction response gave", "feedback")
        if service.log is None:
            raise inputs.RequestError(
                409,
                "FEEDBACK_DISABLED",
                "this server keeps no prediction log (serving.log_path is null)",
                reason="feedback",
            )
        found = await in_log(settings, _find_logged, service, prediction_id)
        if found is None:
            raise inputs.RequestError(
                404,
                "RESOURCE_DOES_NOT_EXIST",
                f"no prediction with id {prediction_id!r} in the log",
                reason="not_found",
            )
        true_class = _class_value(service, found.model_version, label)
        stored, inserted = await in_log(settings, service.record_feedback, prediction_id, true_class, caller.name)
        if stored != true_class:
            raise inputs.RequestError(
                409,
                "CONFLICT",
                f"prediction {prediction_id!r} already has the true class {stored}; labels are kept once",
                reason="feedback",
            )
        correct = found.predicted_class == true_class
        if inserted:  # the same label sent again is answered, but counted once
            metrics.FEEDBACK.labels(found.variant, "correct" if correct else "wrong").inc()
            if found.shadow_class is not None:
                metrics.FEEDBACK.labels("shadow", "correct" if found.shadow_class == true_class else "wrong").inc()
        return json_response(
            {
                "prediction_id": prediction_id,
                "true_class": true_class,
                "predicted_class": found.predicted_class,
                "correct": correct,
                "variant": found.variant,
                "model_version": found.model_version,
            }
        )

    @app.get("/metrics", summary="Prometheus metrics of every worker")
    async def prometheus_metrics() -> Response:
        content, media = metrics.exposition()
        return Response(content, media_type=media)

    return ServingMiddleware(access.AllowedHosts(app, access.allowed_hosts(settings)), service.state)


def _parse_invocations_body(body: bytes, content_type: str | None, max_rows: int) -> inputs.Features:
    bound_work(body, content_type, max_rows)
    return inputs.parse_invocations(body, content_type, max_rows)


def _parse_infer_body(body: bytes, max_rows: int) -> inputs.InferRequest:
    bound_work(body, JSON, max_rows)
    return inputs.parse_infer(inputs.decode_json(body), max_rows, OUTPUTS)


def _log_to_stderr() -> None:
    package_logger = logging.getLogger("wine_assets")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"wine-assets serve [{os.getpid()}] %(levelname)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False


def _find_logged(service: Service, prediction_id: str) -> PredictionRow | None:
    """The logged prediction; waits briefly (1 s at most) for rows still queued here or in another worker."""
    assert service.log is not None
    found = service.find(prediction_id)
    if found is not None:
        return found
    deadline = time.monotonic() + 1.0
    service.log.flush(timeout=0.5)  # rows this worker queued before now
    while True:
        found = service.find(prediction_id)
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _class_value(service: Service, version: int, label: Any) -> int:
    if version not in service._classes:
        try:
            manifest = service.state.registry.manifest(version)
            service._classes[version] = (list(manifest["class_values"]), list(manifest["class_labels"]))
        except (RegistryError, OSError, KeyError, ValueError):
            production = service.state.production  # the version was removed: the classes are the same data's
            if production is None:
                raise inputs.RequestError(
                    503, "MODEL_NOT_READY", "no model is loaded to read the classes from", reason="not_ready"
                ) from None
            service._classes[version] = (list(production.class_values), list(production.class_labels))
    values, labels = service._classes[version]
    if type(label) is int and label in values:
        return label
    if isinstance(label, str) and label in labels:
        return values[labels.index(label)]
    raise inputs.bad_request(
        f"true_class {json.dumps(label)[:40]} is not a class of this model: use one of {values} or {labels}",
        "feedback",
    )
