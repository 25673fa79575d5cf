"""Request bodies to a checked ``[rows, 13]`` float64 array in training order.

Accepted, as MLflow's scoring server accepts them (``POST /invocations``):

* ``{"dataframe_split": {"columns": [...], "data": [[...], ...]}}`` (``index`` allowed, ignored);
* ``{"dataframe_records": [{"alcohol": 13.2, ...}, ...]}``;
* ``{"instances": [...]}``: rows as records or as lists of the 13 values in training order;
* ``{"inputs": ...}``: columns (``{"alcohol": [...], ...}``) or rows as lists;
* ``text/csv`` with a header line.

and, for the Open Inference Protocol (``POST /v2/models/wine-classifier/infer``), either one
``[N, 13]`` tensor or one ``[N]`` (or ``[N, 1]``) tensor per feature, named by the feature.

Every value must be a JSON number: NumPy would silently read ``"13.2"`` as 13.2 and ``true``
as 1.0, so strings, booleans and nulls are refused, naming the column and the row; a CSV cell
must be plain decimal notation. Both rules, and their words, are ``wine_assets.predict``'s
(``feature_number``, ``feature_number_from_text``), which `wine-assets predict` uses too. Values
outside the training schema's bounds are refused with the same messages as ``wine-assets
predict`` (pandera's, from ``wine_assets.predict.prepare_features``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from wine_assets.predict import (
    FeatureValueError,
    PredictionInputError,
    feature_number,
    feature_number_from_text,
    prepare_features,
)
from wine_assets.validation import FEATURE_COLUMNS, WineFeatures, schema_bounds

N_FEATURES = len(FEATURE_COLUMNS)
_POSITION = {name: index for index, name in enumerate(FEATURE_COLUMNS)}
BOUNDS = schema_bounds(WineFeatures.to_schema()) or {}
_LOWS = np.array([BOUNDS[name][0] for name in FEATURE_COLUMNS])
_HIGHS = np.array([BOUNDS[name][1] for name in FEATURE_COLUMNS])
MLFLOW_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
FLOAT_TYPES = {"FP16", "FP32", "FP64"}
INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
MAX_LISTED = 20
MAX_COLUMNS = 1000  # far more than any real request; bounds the work a header or tensor list can cause
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class RequestError(Exception):
    """A request that cannot be answered as asked: its HTTP status, a code and a message.

    ``reason`` labels the rejected-rows metric; ``rows`` is how many rows the request held
    when that is known (0 when the body could not be read that far).
    """

    def __init__(
        self,
        status: int,
        error_code: str,
        message: str,
        reason: str = "malformed",
        rows: int = 0,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.reason = reason
        self.rows = rows
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        # "error_code"/"message" as MLflow's scoring server answers, "error" as the Open Inference Protocol does.
        return {"error_code": self.error_code, "message": self.message, "error": self.message}


def bad_request(message: str, reason: str, rows: int = 0, code: str = "BAD_REQUEST") -> RequestError:
    return RequestError(400, code, message, reason=reason, rows=rows)


@dataclass
class Features:
    """Checked features, the request's row count, and anything the client should know."""

    values: np.ndarray
    warnings: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])


# -- JSON --------------------------------------------------------------------------------------
def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise bad_request(f"the JSON object has the key {key!r} more than once", "duplicate_column")
        result[key] = value
    return result


def _no_constants(text: str) -> Any:
    raise bad_request(f"{text} is not a number JSON allows; send a finite number", "type")


def decode_json(body: bytes) -> Any:
    """The parsed body; 400 for text that is not UTF-8 JSON, a repeated key, NaN or Infinity."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object", "malformed", code="MALFORMED_REQUEST")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise bad_request(
            f"the body is not UTF-8 text ({exc.reason} at byte {exc.start})", "malformed", code="MALFORMED_REQUEST"
        ) from None
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", "malformed", code="MALFORMED_REQUEST") from None
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit conversion limit
        raise bad_request(f"the body is not valid JSON: {exc}", "malformed", code="MALFORMED_REQUEST") from None
    except RecursionError:
        raise bad_request("the JSON is nested too deeply", "malformed", code="MALFORMED_REQUEST") from None
    # json.loads turns an escape such as \ud800 without its pair into a string that is not text (no
    # UTF-8 for it: SQLite and logging fail on it). Only a body with such an escape is walked.
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(document):
        raise bad_request(
            "the JSON holds a \\uD800-\\uDFFF escape without its pair: a string must be Unicode text",
            "malformed",
            code="MALFORMED_REQUEST",
        )
    return document


def _has_lone_surrogate(document: Any) -> bool:
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _number(value: Any, column: str, row: int, rows: int, integers_only: bool = False) -> float:
    """A JSON value by ``wine_assets.predict.feature_number``'s rule, as a 400 naming column and row."""
    if type(value) is float and not integers_only:  # JSON has no NaN or Infinity (decode_json refuses them)
        return value  # the common case, answered without a call: a request may hold 10^5 values
    try:
        return feature_number(value, column, row, integers_only)
    except FeatureValueError as exc:
        raise bad_request(str(exc), exc.reason, rows) from None


def _text_number(cell: str, column: str, row: int, rows: int) -> float:
    """A CSV cell by ``wine_assets.predict.feature_number_from_text``'s rule, as a 400 naming column and row."""
    try:
        return feature_number_from_text(cell, column, row)
    except FeatureValueError as exc:
        raise bad_request(str(exc), exc.reason, rows) from None


def _rows_limit(rows: int, max_rows: int) -> None:
    if rows > max_rows:
        raise RequestError(
            413,
            "REQUEST_TOO_LARGE",
            f"the request has {rows} rows; at most {max_rows} are scored per request (serving.max_rows): split it",
            reason="too_large",
            rows=rows,
        )
    if rows == 0:
        raise bad_request("the input has no rows to predict", "shape")


def check_bounds(values: np.ndarray, warnings: list[str] | None = None) -> Features:
    """Features within the schema's bounds, or 400 naming each column and row outside them."""
    if bool(((values >= _LOWS) & (values <= _HIGHS)).all()):
        return Features(values, warnings or [])
    frame = pd.DataFrame(values, columns=list(FEATURE_COLUMNS))
    try:
        prepare_features(frame)
    except PredictionInputError as exc:
        raise bad_request(str(exc), "out_of_bounds", values.shape[0]) from None
    raise AssertionError("the bounds check and the schema disagree")  # pragma: no cover


def _from_positional(rows_data: list[Any], where: str, max_rows: int) -> np.ndarray:
    rows = len(rows_data)
    _rows_limit(rows, max_rows)
    values = np.empty((rows, N_FEATURES))
    for row, item in enumerate(rows_data):
        if not isinstance(item, list):
            raise bad_request(f"{where}: row {row} is not a list of {N_FEATURES} values", "shape", rows)
        if len(item) != N_FEATURES:
            raise bad_request(
                f"{where}: row {row} has {len(item)} values; every row needs {N_FEATURES}, in this order: "
                + ", ".join(FEATURE_COLUMNS),
                "shape",
                rows,
            )
        for position, value in enumerate(item):
            values[row, position] = _number(value, FEATURE_COLUMNS[position], row, rows)
    return values


def _columns_positions(columns: list[Any], where: str, rows: int) -> tuple[list[int | None], list[str]]:
    if len(columns) > MAX_COLUMNS:
        raise bad_request(f"{where}: {len(columns)} columns; the model has {N_FEATURES}", "shape", rows)
    if not all(isinstance(name, str) for name in columns):
        raise bad_request(f"{where}: column names must be strings", "shape", rows)
    names = list(columns)
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise bad_request(f"{where}: column(s) {', '.join(repeated)} appear more than once", "duplicate_column", rows)
    missing = [name for name in FEATURE_COLUMNS if name not in names]
    if missing:
        raise bad_request(
            f"{where}: missing column(s) {', '.join(missing)}; every row needs all of: {', '.join(FEATURE_COLUMNS)}",
            "missing_column",
            rows,
        )
    extra = [name for name in names if name not in _POSITION]
    warnings = [f"ignored column(s) the model does not use: {', '.join(extra)}"] if extra else []
    return [_POSITION.get(name) for name in names], warnings


def _from_records(records: list[Any], where: str, max_rows: int) -> tuple[np.ndarray, list[str]]:
    rows = len(records)
    _rows_limit(rows, max_rows)
    values = np.empty((rows, N_FEATURES))
    extra: set[str] = set()
    for row, record in enumerate(records):
        if not isinstance(record, dict):
            raise bad_request(f"{where}: row {row} is not an object of column: value", "shape", rows)
        if len(record) != N_FEATURES or any(name not in record for name in FEATURE_COLUMNS):
            missing = [name for name in FEATURE_COLUMNS if name not in record]
            if missing:
                raise bad_request(
                    f"{where}: row {row} lacks column(s) {', '.join(missing)}; every row needs all of: "
                    + ", ".join(FEATURE_COLUMNS),
                    "missing_column",
                    rows,
                )
            extra.update(name for name in record if name not in _POSITION)
        for position, name in enumerate(FEATURE_COLUMNS):
            values[row, position] = _number(record[name], name, row, rows)
    warnings = [f"ignored column(s) the model does not use: {', '.join(sorted(extra))}"] if extra else []
    return values, warnings


def _from_columns(columns: dict[str, Any], where: str, max_rows: int) -> tuple[np.ndarray, list[str]]:
    lengths = {name: len(value) for name, value in columns.items() if isinstance(value, list)}
    not_lists = [name for name, value in columns.items() if not isinstance(value, list)]
    if not_lists:
        raise bad_request(f"{where}: column(s) {', '.join(not_lists)} must be lists of values", "shape")
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name}: {length}" for name, length in lengths.items())
        raise bad_request(f"{where}: the columns have different lengths ({shown})", "shape")
    rows = next(iter(lengths.values()), 0)
    _rows_limit(rows, max_rows)
    positions, warnings = _columns_positions(list(columns), where, rows)
    values = np.empty((rows, N_FEATURES))
    for name, position in zip(columns, positions, strict=True):
        if position is None:
            continue
        for row, value in enumerate(columns[name]):
            values[row, position] = _number(value, name, row, rows)
    return values, warnings


def _from_split(split: Any, max_rows: int) -> tuple[np.ndarray, list[str]]:
    where = "dataframe_split"
    if not isinstance(split, dict):
        raise bad_request(f"{where} must be an object with 'columns' and 'data'", "shape")
    unknown = sorted(set(split) - {"columns", "data", "index"})
    if unknown:
        raise bad_request(f"{where} has unknown key(s) {', '.join(unknown)}; it takes columns, data and index", "shape")
    columns, data = split.get("columns"), split.get("data")
    if not isinstance(columns, list) or not isinstance(data, list):
        raise bad_request(f"{where} needs 'columns' (a list of names) and 'data' (a list of rows)", "shape")
    rows = len(data)
    _rows_limit(rows, max_rows)
    positions, warnings = _columns_positions(columns, where, rows)
    values = np.empty((rows, N_FEATURES))
    for row, item in enumerate(data):
        if not isinstance(item, list) or len(item) != len(columns):
            raise bad_request(
                f"{where}: row {row} must be a list of {len(columns)} values, one per column", "shape", rows
            )
        for name, position, value in zip(columns, positions, item, strict=True):
            if position is not None:
                values[row, position] = _number(value, name, row, rows)
    if "index" in split and (not isinstance(split["index"], list) or len(split["index"]) != rows):
        raise bad_request(f"{where}: 'index' must be a list with one entry per row ({rows})", "shape", rows)
    return values, warnings


def parse_mlflow_json(document: Any, max_rows: int) -> Features:
    """One of MLflow's four JSON shapes to checked features."""
    if not isinstance(document, dict):
        raise bad_request(f"the body must be a JSON object with one of the keys {', '.join(MLFLOW_KEYS)}", "shape")
    found = [key for key in MLFLOW_KEYS if key in document]
    unknown = sorted(set(document) - set(MLFLOW_KEYS) - {"params"})
    if unknown:
        raise bad_request(
            f"unknown key(s) {', '.join(unknown)}; the body takes exactly one of {', '.join(MLFLOW_KEYS)}", "shape"
        )
    if len(found) != 1:
        raise bad_request(
            f"the body must have exactly one of the keys {', '.join(MLFLOW_KEYS)} (found {len(found)})", "shape"
        )
    if document.get("params"):
        raise bad_request("this model takes no inference params; leave 'params' out or empty", "shape")
    key = found[0]
    payload = document[key]
    if key == "dataframe_split":
        values, warnings = _from_split(payload, max_rows)
    elif key == "dataframe_records":
        if not isinstance(payload, list):
            raise bad_request("dataframe_records must be a list of objects (one per row)", "shape")
        values, warnings = _from_records(payload, key, max_rows)
    elif isinstance(payload, dict) and key == "inputs":
        values, warnings = _from_columns(payload, key, max_rows)
    elif isinstance(payload, list) and payload and all(isinstance(item, dict) for item in payload):
        values, warnings = _from_records(payload, key, max_rows)
    elif isinstance(payload, list) and payload and all(isinstance(item, list) for item in payload):
        values, warnings = _from_positional(payload, key, max_rows), []
    elif isinstance(payload, list) and not payload:
        raise bad_request("the input has no rows to predict", "shape")
    else:
        raise bad_request(
            f"{key} must be a list of rows (objects by column name, or lists of {N_FEATURES} values in training "
            "order)" + (", or an object of columns" if key == "inputs" else ""),
            "shape",
        )
    return check_bounds(values, warnings)


def parse_csv(body: bytes, max_rows: int) -> Features:
    """CSV with a header line: every cell a number, no empty cells."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise bad_request(
            f"the CSV is not UTF-8 text ({exc.reason} at byte {exc.start})", "malformed", code="MALFORMED_REQUEST"
        ) from None
    try:
        lines = [line for line in csv.reader(io.StringIO(text)) if line]
    except csv.Error as exc:
        raise bad_request(f"the body is not a readable CSV: {exc}", "malformed", code="MALFORMED_REQUEST") from None
    if not lines:
        raise bad_request(
            "the CSV is empty; send a header line and one line per row", "malformed", code="MALFORMED_REQUEST"
        )
    header, data = [name.strip() for name in lines[0]], lines[1:]
    rows = len(data)
    positions, warnings = _columns_positions(header, "the CSV", rows)
    _rows_limit(rows, max_rows)
    values = np.empty((rows, N_FEATURES))
    for row, cells in enumerate(data):
        if len(cells) != len(header):
            raise bad_request(f"the CSV: row {row} has {len(cells)} cells; the header has {len(header)}", "shape", rows)
        for name, position, cell in zip(header, positions, cells, strict=True):
            if position is None:
                continue
            values[row, position] = _text_number(cell, name, row, rows)
    return check_bounds(values, warnings)


def parse_invocations(body: bytes, content_type: str | None, max_rows: int) -> Features:
    """The body of ``POST /invocations``: JSON in one of MLflow's shapes, or CSV."""
    kind = media_type(content_type)
    if kind == "application/json":
        return parse_mlflow_json(decode_json(body), max_rows)
    if kind == "text/csv":
        return parse_csv(body, max_rows)
    raise unsupported_media_type(content_type, ("application/json", "text/csv"))


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def unsupported_media_type(content_type: str | None, accepted: tuple[str, ...]) -> RequestError:
    shown = f"'{content_type}'" if content_type else "no Content-Type"
    return RequestError(
        415,
        "UNSUPPORTED_MEDIA_TYPE",
        f"{shown} is not accepted here; send {' or '.join(accepted)}",
        reason="content_type",
    )


# -- Open Inference Protocol -------------------------------------------------------------------
@dataclass
class InferRequest:
    features: Features
    id: str | None
    outputs: list[str] | None


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(type(size) is int and size >= 0 for size in value):
        raise bad_request(f"{where}: 'shape' must be a list of non-negative integers", "shape")
    return value


def _flatten(data: Any, shape: list[int], where: str) -> list[Any]:
    """Row-major flat data: as sent (flat), or nested lists that match the shape exactly."""
    if not isinstance(data, list):
        raise bad_request(f"{where}: 'data' must be a list", "shape")
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []

    def walk(item: Any, depth: int) -> None:
        if depth == len(shape):
            if isinstance(item, list):
                raise bad_request(f"{where}: 'data' is nested deeper than the shape {shape}", "shape")
            flat.append(item)
            return
        if not isinstance(item, list) or len(item) != shape[depth]:
            raise bad_request(f"{where}: the nesting of 'data' does not match the shape {shape}", "shape")
        for element in item:
            walk(element, depth + 1)

    walk(data, 0)
    return flat


def _tensor(spec: Any, index: int) -> tuple[str, list[int], str, list[Any]]:
    where = f"inputs[{index}]"
    if not isinstance(spec, dict):
        raise bad_request(f"{where} must be an object with name, shape, datatype and data", "shape")
    missing = [key for key in ("name", "shape", "datatype", "data") if key not in spec]
    if missing:
        raise bad_request(f"{where} lacks {', '.join(missing)}", "shape")
    unknown = sorted(set(spec) - {"name", "shape", "datatype", "data", "parameters"})
    if unknown:
        raise bad_request(f"{where} has unknown key(s) {', '.join(unknown)}", "shape")
    name, datatype = spec["name"], spec["datatype"]
    if not isinstance(name, str) or not name:
        raise bad_request(f"{where}: 'name' must be a non-empty string", "shape")
    where = f"input '{name}'"
    if not isinstance(datatype, str) or datatype not in FLOAT_TYPES | INT_TYPES:
        raise bad_request(
            f"{where}: datatype {json.dumps(datatype)[:30]} is not numeric; use FP64, FP32 or an integer type", "type"
        )
    shape = _shape(spec["shape"], where)
    if len(shape) > 2:
        raise bad_request(f"{where}: shape {shape[:8]} has more than two dimensions; use [N, 13] or [N]", "shape")
    data = _flatten(spec["data"], shape, where)
    expected = math.prod(shape)
    if len(data) != expected:
        raise bad_request(f"{where}: shape {shape} needs {expected} values, 'data' has {len(data)}", "shape")
    return name, shape, datatype, data


def parse_infer(document: Any, max_rows: int, output_names: tuple[str, ...]) -> InferRequest:
    """An Open Inference Protocol inference request to checked features."""
    if not isinstance(document, dict):
        raise bad_request("the body must be a JSON object with 'inputs'", "shape")
    unknown = sorted(set(document) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise bad_request(
            f"unknown key(s) {', '.join(unknown)}; the request takes id, parameters, inputs, outputs", "shape"
        )
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("'id' must be a string", "shape")
    if "parameters" in document and not isinstance(document["parameters"], dict):
        raise bad_request("'parameters' must be an object", "shape")
    outputs = _requested_outputs(document.get("outputs"), output_names)
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request("'inputs' must be a non-empty list of tensors", "shape")
    if len(inputs) == 1:
        name, shape, datatype, data = _tensor(inputs[0], 0)
        if len(shape) != 2 or shape[1] != N_FEATURES:
            raise bad_request(
                f"input '{name}': shape {shape} is not [N, {N_FEATURES}]; send one [N, {N_FEATURES}] tensor with the "
                f"features in training order ({', '.join(FEATURE_COLUMNS)}), or one [N] tensor per feature",
                "shape",
            )
        rows = shape[0]
        _rows_limit(rows, max_rows)
        integers_only = datatype in INT_TYPES
        values = np.empty((rows, N_FEATURES))
        flat = values.reshape(-1)
        for position, value in enumerate(data):
            flat[position] = _number(
                value, FEATURE_COLUMNS[position % N_FEATURES], position // N_FEATURES, rows, integers_only
            )
        return InferRequest(check_bounds(values), request_id, outputs)
    if len(inputs) > MAX_COLUMNS:
        raise bad_request(f"{len(inputs)} inputs; the model takes one [N, {N_FEATURES}] or {N_FEATURES} [N]", "shape")
    tensors = [_tensor(spec, index) for index, spec in enumerate(inputs)]
    names = [name for name, _, _, _ in tensors]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise bad_request(f"input(s) {', '.join(repeated)} appear more than once", "duplicate_column")
    unknown_names = [name for name in names if name not in _POSITION]
    if unknown_names:
        raise bad_request(
            f"input(s) {', '.join(unknown_names)} are not features of this model; with one tensor per feature, "
            f"name them: {', '.join(FEATURE_COLUMNS)}",
            "missing_column",
        )
    missing = [name for name in FEATURE_COLUMNS if name not in names]
    if missing:
        raise bad_request(f"missing input(s) {', '.join(missing)}: send one tensor per feature", "missing_column")
    rows_by_name = {}
    for name, shape, _, _ in tensors:
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise bad_request(f"input '{name}': shape {shape} is not [N] or [N, 1]", "shape")
        rows_by_name[name] = shape[0]
    if len(set(rows_by_name.values())) != 1:
        shown = ", ".join(f"{name}: {rows}" for name, rows in rows_by_name.items())
        raise bad_request(f"the inputs have different numbers of rows ({shown})", "shape")
    rows = next(iter(rows_by_name.values()))
    _rows_limit(rows, max_rows)
    values = np.empty((rows, N_FEATURES))
    for name, _, datatype, data in tensors:
        position = _POSITION[name]
        integers_only = datatype in INT_TYPES
        for row, value in enumerate(data):
            values[row, position] = _number(value, name, row, rows, integers_only)
    return InferRequest(check_bounds(values), request_id, outputs)


def _requested_outputs(outputs: Any, output_names: tuple[str, ...]) -> list[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(
        isinstance(item, dict) and isinstance(item.get("name"), str) for item in outputs
    ):
        raise bad_request("'outputs' must be a list of objects with a 'name'", "shape")
    names = [item["name"] for item in outputs]
    unknown = [name for name in names if name not in output_names]
    if unknown:
        raise bad_request(f"unknown output(s) {', '.join(unknown)}; this model has {', '.join(output_names)}", "shape")
    return names
