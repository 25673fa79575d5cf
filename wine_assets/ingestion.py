"""Ingestion: the raw wine frame, from scikit-learn's built-in copy or a CSV file.

The frame carries where it came from in ``DataFrame.attrs`` (``source`` and
``fingerprint``), so every later stage, and the released model's manifest, can
say which data it was made from without a side channel.
"""

from __future__ import annotations

import csv
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


# -- the width of an input file, checked on a CSV's header line before anything parses it --
# The time to read and check a frame grows with its columns (`predict` took 17 s for one row of
# 10^4 columns, over a minute for 10^6), and every file this project reads holds the wine data's
# 14 columns (13 features and target) plus perhaps a few of the user's own. A thousand is far
# above any of them and is read in milliseconds. The header line is read alone, within a bounded
# number of bytes (a thousand column names of up to a thousand bytes each), so a file with one
# endless header line is refused without being parsed. `predict` holds JSON records to the same
# column limit.
MAX_INPUT_COLUMNS = 1000
MAX_CSV_HEADER_BYTES = 1 << 20


class CsvHeaderError(ValueError):
    """A CSV whose header line is too wide to read; the message names the file and the limit."""


def csv_header(head: bytes, where: str) -> list[str]:
    """The column names of a CSV from its first bytes: ``head`` holds the start of the file (at
    least MAX_CSV_HEADER_BYTES + 1 bytes of it when it is that long). CsvHeaderError, naming
    ``where``, when the header line is longer than MAX_CSV_HEADER_BYTES or has more than
    MAX_INPUT_COLUMNS columns. Encoding and quoting problems are left to the reader that follows."""
    head = head[: MAX_CSV_HEADER_BYTES + 1]
    text = head.decode("utf-8-sig", errors="replace")
    lines = io.StringIO(text, newline="")  # csv's own line ending rules: a quoted name may hold one
    reader = csv.reader(lines)
    try:
        names = next(reader, [])
    except csv.Error as exc:  # a NUL byte, a quoted name past csv's field limit (128 KiB)...
        if len(head) > MAX_CSV_HEADER_BYTES:
            raise CsvHeaderError(
                f"{where}: the header line is longer than {MAX_CSV_HEADER_BYTES} bytes or not CSV ({exc}); at most "
                f"{MAX_INPUT_COLUMNS} columns are read (the wine data has 14)"
            ) from None
        names = []  # a short file: the reader that follows names the problem
    # The first record ends within the bytes given when the reader stopped before their end, or at
    # a line end that is their last byte. (A quote left open to that end cannot look like one: its
    # field would pass csv's field limit, refused above.)
    ended = lines.tell() < len(text) or text.endswith(("\n", "\r"))
    if len(head) > MAX_CSV_HEADER_BYTES and not ended:
        raise CsvHeaderError(
            f"{where}: the header line is longer than {MAX_CSV_HEADER_BYTES} bytes; at most {MAX_INPUT_COLUMNS} "
            "columns are read (the wine data has 14)"
        )
    if len(names) > MAX_INPUT_COLUMNS:
        raise CsvHeaderError(
            f"{where}: the header has {len(names)} columns; at most {MAX_INPUT_COLUMNS} are read (the wine data has 14)"
        )
    return names


def csv_file_header(path: Path, where: str) -> list[str]:
    """``csv_header`` of a file, reading no more than its first MAX_CSV_HEADER_BYTES + 1 bytes."""
    with path.open("rb") as stream:
        return csv_header(stream.read(MAX_CSV_HEADER_BYTES + 1), where)


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
        csv_file_header(path, f"{key}: data file {path}")
        content = path.read_bytes()
    except CsvHeaderError as exc:
        raise IngestionError(str(exc)) from None
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
