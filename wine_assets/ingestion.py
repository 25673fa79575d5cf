"""Ingestion: the raw wine frame, from scikit-learn's built-in copy or a CSV file.

The frame carries where it came from in ``DataFrame.attrs`` (``source`` and
``fingerprint``), so every later stage, and the released model's manifest, can
say which data it was made from without a side channel.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from wine_assets.params import BUILTIN_SOURCE, Params

SOURCE_ATTR = "source"
FINGERPRINT_ATTR = "fingerprint"


class IngestionError(ValueError):
    """The data source cannot be read; the message names the file and the params key."""


@dataclass(frozen=True)
class RawData:
    frame: pd.DataFrame
    source: str
    fingerprint: str


def fingerprint_frame(frame: pd.DataFrame) -> str:
    """sha256 of a canonical CSV serialization: same values, same fingerprint."""
    text = frame.to_csv(index=False, lineterminator="\n")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_builtin_frame() -> pd.DataFrame:
    """The wine recognition data that scikit-learn ships: 178 rows, 13 features, target."""
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame
    frame["target"] = frame["target"].astype("int64")
    return frame


def read_csv_source(path: Path, key: str = "data.source") -> tuple[pd.DataFrame, str]:
    """Read a CSV source once: the frame and the sha256 of exactly the bytes parsed.

    Errors name the file and the params key.
    """
    if not path.exists():
        raise IngestionError(f"{key}: data file not found: {path}")
    if path.is_dir():
        raise IngestionError(f"{key}: {path} is a folder, not a CSV file")
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise IngestionError(f"{key}: data file {path} cannot be read: {exc.strerror}") from exc
    try:
        frame = pd.read_csv(io.BytesIO(content))
    except pd.errors.EmptyDataError:
        raise IngestionError(f"{key}: data file {path} is empty (no header, no rows)") from None
    except pd.errors.ParserError as exc:
        raise IngestionError(f"{key}: data file {path} is not a readable CSV: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise IngestionError(f"{key}: data file {path} is not UTF-8 text: {exc}") from exc
    if frame.empty:
        raise IngestionError(f"{key}: data file {path} has a header but no data rows")
    return frame, hashlib.sha256(content).hexdigest()


def load_raw(params: Params, dataset: str | None = None) -> RawData:
    """Load the source named by ``data.source`` (or by the experiment dataset ``dataset``) and
    fingerprint it."""
    if dataset is None:
        path, key = params.data_source_path, "data.source"
    else:
        path, key = params.dataset_source_path(dataset), f"experiments.datasets.{dataset}"
    if path is None:
        frame = load_builtin_frame()
        source, fingerprint = BUILTIN_SOURCE, fingerprint_frame(frame)
    else:
        frame, fingerprint = read_csv_source(path, key)
        source = str(path)
    frame.attrs = {SOURCE_ATTR: source, FINGERPRINT_ATTR: fingerprint}
    return RawData(frame=frame, source=source, fingerprint=fingerprint)


def class_counts(frame: pd.DataFrame, target: str = "target") -> dict[str, int]:
    """Rows per target value, as plain ints keyed by text (empty when there is no target)."""
    if target not in frame.columns:
        return {}
    counts = frame[target].value_counts(dropna=False).sort_index()
    return {str(label): int(count) for label, count in counts.items()}
