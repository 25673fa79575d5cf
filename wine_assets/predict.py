"""Predictions from a released model, with the input checked by the training schema's features.

    from wine_assets.predict import predict
    result = predict(frame)                 # the production model, loaded once per process
    result.predictions                      # predicted_class, predicted_label, probability_<label>...

A bundle is loaded through the registry, which verifies the manifest's signature and every
file's sha256 before anything is loaded (and loading runs no code: skops). Bundles are cached
per process by registry folder and version; the ``production`` alias is read on every call, so a rollback is picked up.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wine_assets.ingestion import MAX_INPUT_COLUMNS, CsvHeaderError, csv_header
from wine_assets.params import load_params
from wine_assets.registry import Bundle, ModelRegistry
from wine_assets.signing import Trust
from wine_assets.validation import (
    FEATURE_COLUMNS,
    MAX_LISTED_FAILURES,
    WineFeatures,
    collect_failures,
    fast_features_valid,
)

logger = logging.getLogger(__name__)

_CACHE: dict[tuple[Path, int], Bundle] = {}
_CACHE_LOCK = threading.Lock()


class PredictionInputError(ValueError):
    """The input cannot be scored; the message names the column and the row."""


# -- what counts as a number: one rule for `wine-assets predict` and `wine-assets serve` --------------
# A JSON value is a number when JSON says so: an int or a float, never text ("13.2"), true/false or
# null (pandas and NumPy would quietly turn all three into numbers). A CSV cell is text, so it is a
# number when it is plain ASCII decimal notation: an optional sign, digits with an optional point,
# an optional exponent, and spaces around it. float() would also take '1_000', non-ASCII digits,
# 'nan' and 'inf'; those are refused.
NUMERAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NOT_FINITE = ("nan", "inf", "infinity")


class FeatureValueError(PredictionInputError):
    """One value that is not a number where a feature belongs; ``reason`` labels the serving metric."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def feature_number(value: Any, column: str, row: int, integers_only: bool = False) -> float:
    """A JSON value where a feature belongs, as a float; or FeatureValueError naming column and row."""
    kind = type(value)
    if kind is float and not integers_only:
        if math.isfinite(value):
            return value
        raise FeatureValueError(f"column '{column}', row {row}: {value!r} is not a finite number", "type")
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            raise FeatureValueError(
                f"column '{column}', row {row}: {value} is too large for a float", "out_of_bounds"
            ) from None
    expected = "an integer (the tensor's datatype is an integer type)" if integers_only else "a number"
    if value is None:
        raise FeatureValueError(f"column '{column}', row {row}: the value is missing (null); send {expected}", "null")
    if kind is bool:
        raise FeatureValueError(
            f"column '{column}', row {row}: {json.dumps(value)} is a true/false value, not {expected}", "type"
        )
    if kind is str:
        raise FeatureValueError(
            f"column '{column}', row {row}: {value[:40]!r} is text, not {expected}; send the number without quotes",
            "type",
        )
    shown = repr(value) if kind is float else {list: "a list", dict: "an object"}.get(kind, type(value).__name__)
    raise FeatureValueError(f"column '{column}', row {row}: {shown} is not {expected}", "type")


def feature_number_from_text(cell: Any, column: str, row: int) -> float:
    """A CSV cell where a feature belongs, as a float; or FeatureValueError naming column and row."""
    if not isinstance(cell, str) or not cell.strip():  # pandas gives NaN for the cells a short line lacks
        raise FeatureValueError(f"column '{column}', row {row}: the value is missing (an empty cell)", "null")
    cell = cell.strip()
    if cell.lower().lstrip("+-") in _NOT_FINITE:
        raise FeatureValueError(f"column '{column}', row {row}: {cell!r} is not a finite number", "type")
    if not cell.isascii() or not NUMERAL.fullmatch(cell):
        raise FeatureValueError(f"column '{column}', row {row}: {cell[:40]!r} is not a number", "type")
    number = float(cell)
    if not math.isfinite(number):
        raise FeatureValueError(f"column '{column}', row {row}: {cell[:40]!r} is too large for a float", "type")
    return number


@dataclass(frozen=True)
class PredictionResult:
    predictions: pd.DataFrame
    version: int
    warnings: list[str] = field(default_factory=list)


def load_bundle(version: int | str | None = None, registry_dir: str | Path | ModelRegistry | None = None) -> Bundle:
    """A verified bundle (production by default), loaded once per process and reused.

    ``registry_dir`` is a registry (its trusted keys with it), a folder, or None for the params'
    registry; a folder or None trusts the keys the params list (``registry.trusted_keys``).
    """
    if isinstance(registry_dir, ModelRegistry):
        registry = registry_dir
    else:
        params = load_params()
        root = Path(registry_dir) if registry_dir is not None else params.registry_dir
        registry = ModelRegistry(root.resolve(), trust=Trust.from_config(params.registry.trusted_keys))
    number = registry.resolve(version)
    key = (registry.root, number)
    with _CACHE_LOCK:
        bundle = _CACHE.get(key)
        if bundle is None:
            bundle = registry.load(number)
            _CACHE[key] = bundle
    return bundle


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def prepare_features(frame: pd.DataFrame, strict: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The 13 features in training order, as floats; or PredictionInputError naming column and row.

    Column order does not matter. Extra columns are ignored with a warning, or refused when
    ``strict``. Values are checked with the feature part of the training schema.
    """
    if frame.shape[0] == 0:
        raise PredictionInputError("the input has no rows to predict")
    names = [str(name) for name in frame.columns]
    missing = [name for name in FEATURE_COLUMNS if name not in names]
    if missing:
        raise PredictionInputError(
            f"the input lacks column(s) {', '.join(missing)}; every row needs all of: {', '.join(FEATURE_COLUMNS)}"
        )
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise PredictionInputError(f"the input has column(s) {', '.join(duplicated)} more than once")
    extra = [name for name in names if name not in FEATURE_COLUMNS]
    warnings = []
    if extra:
        if strict:
            raise PredictionInputError(f"the input has column(s) the model does not use: {', '.join(extra)} (--strict)")
        warnings.append(f"ignoring column(s) the model does not use: {', '.join(extra)}")
    features = frame.loc[:, list(FEATURE_COLUMNS)]
    # pandera would coerce true/false to 1.0/0.0; a flag where a measurement belongs is a mistake.
    # Only boolean and mixed (object) columns can hold one, so numeric columns are not scanned.
    flags = [
        f"column '{column}', row {row}: {value!r} is a true/false value, not a number"
        for column in FEATURE_COLUMNS
        if not pd.api.types.is_numeric_dtype(features[column].dtype)
        or pd.api.types.is_bool_dtype(features[column].dtype)
        for row, value in enumerate(features[column])
        if isinstance(value, (bool, np.bool_))
    ]
    if flags:
        raise PredictionInputError(
            "\n  - ".join([f"{len(flags)} problem(s) in the input:", *flags[:MAX_LISTED_FAILURES]])
        )
    if fast_features_valid(features):
        return features.astype(np.float64), warnings
    validated, failures = collect_failures(WineFeatures, features)
    if failures or validated is None:
        shown = [case.describe() for case in failures[:MAX_LISTED_FAILURES]]
        more = len(failures) - len(shown)
        raise PredictionInputError(
            f"{len(failures)} problem(s) in the input (rows count from 0, the header not included):\n  - "
            + "\n  - ".join(shown)
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return validated.astype(np.float64), warnings


def score(bundle: Bundle, features: pd.DataFrame) -> pd.DataFrame:
    """Predicted class, its label and one probability column per class, in the input's row order."""
    probabilities = bundle.model.predict_proba(bundle.scaler.transform(features))
    classes = [int(value) for value in bundle.model.classes_]
    names = dict(zip(bundle.manifest["class_values"], bundle.manifest["class_labels"], strict=True))
    labels = [names[value] for value in classes]
    chosen = probabilities.argmax(axis=1)  # vectorized: no Python loop over rows
    columns = {
        "predicted_class": np.asarray(classes)[chosen],
        "predicted_label": np.asarray(labels, dtype=object)[chosen],
    }
    columns.update({f"probability_{label}": probabilities[:, position] for position, label in enumerate(labels)})
    return pd.DataFrame(columns)


def predict(
    frame: pd.DataFrame,
    version: int | str | None = None,
    registry_dir: str | Path | ModelRegistry | None = None,
    strict: bool = False,
) -> PredictionResult:
    """Validate ``frame`` and score it with a released model (production by default)."""
    bundle = load_bundle(version, registry_dir)
    features, warnings = prepare_features(frame, strict=strict)
    for warning in warnings:
        logger.warning(warning)
    return PredictionResult(score(bundle, features), bundle.version, warnings)


def read_input(source: str, data: bytes | None = None) -> pd.DataFrame:
    """Read CSV or JSON records from a file, or from ``data`` (standard input) when source is '-'.

    The format follows the file's extension; standard input is JSON when it starts with
    '[' or '{', CSV otherwise.
    """
    if data is None:
        path = Path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise PredictionInputError(f"input file not found: {source}") from None
        except IsADirectoryError:
            raise PredictionInputError(f"input {source} is a folder, not a file") from None
        kind = "json" if path.suffix.lower() == ".json" else "csv" if path.suffix.lower() == ".csv" else None
    else:
        kind = None
    try:
        text = data.decode("utf-8-sig") if data else ""
    except UnicodeDecodeError as exc:
        raise PredictionInputError(
            f"the input {_name(source)} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    if not text.strip():
        raise PredictionInputError(f"the input {_name(source)} is empty")
    if kind is None:
        kind = "json" if text.lstrip()[:1] in "[{" else "csv"
    if kind == "json":
        return _parse_json(text, source)
    try:
        header = csv_header(data, f"the input {_name(source)}")  # its width, before pandas parses it
    except CsvHeaderError as exc:
        raise PredictionInputError(str(exc)) from None
    return _parse_csv(text, source, header)


def _name(source: str) -> str:
    return "on standard input" if source == "-" else source


def _parse_csv(text: str, source: str, header: list[str]) -> pd.DataFrame:
    # pandas renames a repeated header (alcohol, alcohol.1); a repeated column is an error here.
    repeated = sorted(name for name, count in Counter(header).items() if count > 1)
    if repeated:
        raise PredictionInputError(f"the input {_name(source)} has column(s) {', '.join(repeated)} more than once")
    try:
        # every cell as text: the feature cells are read by the one number rule, not pandas' guesses
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PredictionInputError(f"the input {_name(source)} is not a readable CSV: {exc}") from exc
    for name in FEATURE_COLUMNS:
        if name in frame.columns:
            cells = frame[name].tolist()
            frame[name] = np.array(
                [feature_number_from_text(cell, name, row) for row, cell in enumerate(cells)], dtype=np.float64
            )
    return frame


def _parse_json(text: str, source: str) -> pd.DataFrame:
    try:
        records: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PredictionInputError(f"the input {_name(source)} is not valid JSON: {exc}") from exc
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise PredictionInputError(
            f"the input {_name(source)} must be a JSON list of records (objects keyed by column name)"
        )
    columns: set[str] = set()
    for record in records:
        columns.update(record)
        if len(columns) > MAX_INPUT_COLUMNS:
            raise PredictionInputError(
                f"the input {_name(source)}: its records name more than {MAX_INPUT_COLUMNS} columns (at least "
                f"{len(columns)}); at most {MAX_INPUT_COLUMNS} are read (the wine data has 14)"
            )
    for row, record in enumerate(records):  # the one number rule; a missing key is left to the schema (null)
        for name in FEATURE_COLUMNS:
            if name in record:
                record[name] = feature_number(record[name], name, row)
    return pd.DataFrame.from_records(records)


def format_predictions(predictions: pd.DataFrame, output_format: str) -> str:
    if output_format == "json":
        return json.dumps(predictions.to_dict("records"), indent=2) + "\n"
    return predictions.to_csv(index=False, lineterminator="\n")
