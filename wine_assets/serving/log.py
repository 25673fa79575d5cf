"""The append-only log of predictions and feedback: one SQLite file in WAL mode.

Predictions are queued by the request and written by a background thread in batches, so
a request never waits for the disk. Several workers append to the same file (WAL lets
readers run beside the one writer; ``busy_timeout`` waits for the lock). Rows are only
ever inserted: feedback for a prediction is kept once, and a different label for the
same prediction is refused.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    prediction_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    created REAL NOT NULL,
    experiment TEXT,
    variant TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    predicted_class INTEGER NOT NULL,
    shadow_version INTEGER,
    shadow_class INTEGER
);
CREATE TABLE IF NOT EXISTS feedback (
    prediction_id TEXT PRIMARY KEY,
    true_class INTEGER NOT NULL,
    created REAL NOT NULL,
    labelled_by TEXT
);
"""


@dataclass(frozen=True)
class PredictionRow:
    prediction_id: str
    request_id: str
    experiment: str | None
    variant: str
    model_version: int
    predicted_class: int
    shadow_version: int | None = None
    shadow_class: int | None = None


def connect(path: Path, timeout: float = 10.0) -> sqlite3.Connection:
    """A connection to the log, created with its tables when new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    connection.executescript(SCHEMA)
    _add_labelled_by(connection)
    return connection


def _add_labelled_by(connection: sqlite3.Connection) -> None:
    """A log from before labels named their token's holder gets the column (its old rows: null)."""
    columns = [row[1] for row in connection.execute("PRAGMA table_info(feedback)")]
    if "labelled_by" in columns:
        return
    try:
        connection.execute("ALTER TABLE feedback ADD COLUMN labelled_by TEXT")
    except sqlite3.OperationalError as exc:  # another worker added it first
        if "duplicate column" not in str(exc):
            raise


class PredictionLog:
    """Queue prediction rows; a daemon thread writes them in batches every ``interval`` seconds.

    A batch that cannot be written (the file locked by another worker for longer than the busy
    timeout, a full disk) is retried a few times before it is dropped and counted (``on_error``).
    """

    RETRIES = 5

    def __init__(self, path: Path, interval: float = 0.05, on_error: Callable[[int], None] | None = None):
        self.path = path
        self.interval = interval
        self._queue: queue.Queue[tuple[int, PredictionRow] | None] = queue.Queue()
        self._on_error = on_error
        self._appended = 0  # rows queued so far
        self._done = 0  # rows written (or dropped) so far, in queue order
        self._progress = threading.Condition()
        connect(path).close()  # a bad path fails at start-up, naming the file
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def append(self, rows: Iterable[PredictionRow]) -> None:
        for row in rows:
            self._appended += 1
            self._queue.put((self._appended, row))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the rows queued before this call are written; False if ``timeout`` passed first."""
        target = self._appended
        with self._progress:
            return self._progress.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        stop = False
        while not stop:
            batch: list[tuple[int, PredictionRow]] = []
            item = self._queue.get()
            if item is None:
                stop = True
            else:
                batch.append(item)
            deadline = time.monotonic() + self.interval
            while not stop and time.monotonic() < deadline:
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                connection = self._write(connection, [row for _, row in batch])
                with self._progress:
                    self._done = batch[-1][0]
                    self._progress.notify_all()
        if connection is not None:
            connection.close()

    def _write(self, connection: sqlite3.Connection | None, rows: list[PredictionRow]) -> sqlite3.Connection | None:
        for attempt in range(self.RETRIES):
            try:
                connection = connection or connect(self.path)
                _insert(connection, rows)
                return connection
            except Exception as exc:  # the writer thread must outlive any one bad batch
                last = exc
                if connection is not None:
                    connection.close()
                    connection = None
                time.sleep(min(0.1 * 2**attempt, 2.0))
        logger.error("dropped %d prediction(s): could not write them to %s: %s", len(rows), self.path, last)
        if self._on_error:
            self._on_error(len(rows))
        return None


def _insert(connection: sqlite3.Connection, rows: list[PredictionRow]) -> None:
    now = time.time()
    with connection:
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT OR IGNORE INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    row.prediction_id,
                    row.request_id,
                    now,
                    row.experiment,
                    row.variant,
                    row.model_version,
                    row.predicted_class,
                    row.shadow_version,
                    row.shadow_class,
                )
                for row in rows
            ],
        )


def find_prediction(connection: sqlite3.Connection, prediction_id: str) -> PredictionRow | None:
    found = connection.execute(
        "SELECT prediction_id, request_id, experiment, variant, model_version, predicted_class, shadow_version, "
        "shadow_class FROM predictions WHERE prediction_id = ?",
        (prediction_id,),
    ).fetchone()
    return None if found is None else PredictionRow(*found)


def record_feedback(
    connection: sqlite3.Connection, prediction_id: str, true_class: int, labelled_by: str | None = None
) -> tuple[int, bool]:
    """Store the label once, with the name of the token that sent it: (the label stored, whether this call stored it).

    The connection must not be used by another thread meanwhile (callers hold a lock).
    """
    with connection:
        connection.execute("BEGIN IMMEDIATE")
        inserted = connection.execute(
            "INSERT OR IGNORE INTO feedback (prediction_id, true_class, created, labelled_by) VALUES (?, ?, ?, ?)",
            (prediction_id, true_class, time.time(), labelled_by),
        ).rowcount
        (stored,) = connection.execute(
            "SELECT true_class FROM feedback WHERE prediction_id = ?", (prediction_id,)
        ).fetchone()
    return int(stored), inserted == 1
