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
from collections.abc import Iterable
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
    created REAL NOT NULL
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
    return connection


class PredictionLog:
    """Queue prediction rows; a daemon thread writes them in batches every ``interval`` seconds."""

    def __init__(self, path: Path, interval: float = 0.05, on_error=None):
        self.path = path
        self.interval = interval
        self._queue: queue.Queue[PredictionRow | None] = queue.Queue()
        self._on_error = on_error
        connect(path).close()  # a bad path fails at start-up, naming the file
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def append(self, rows: Iterable[PredictionRow]) -> None:
        for row in rows:
            self._queue.put(row)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every row queued so far is written (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        connection = connect(self.path)
        stop = False
        while not stop:
            batch: list[PredictionRow] = []
            item = self._queue.get()
            taken = 1
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
                taken += 1
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            try:
                if batch:
                    _insert(connection, batch)
            except sqlite3.Error as exc:
                logger.error("could not write %d prediction(s) to %s: %s", len(batch), self.path, exc)
                if self._on_error:
                    self._on_error(len(batch))
            finally:
                for _ in range(taken):
                    self._queue.task_done()
        connection.close()


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


def record_feedback(connection: sqlite3.Connection, prediction_id: str, true_class: int) -> int:
    """Store the label once; the label already stored (equal to ``true_class`` unless a conflict)."""
    with connection:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("INSERT OR IGNORE INTO feedback VALUES (?, ?, ?)", (prediction_id, true_class, time.time()))
        (stored,) = connection.execute(
            "SELECT true_class FROM feedback WHERE prediction_id = ?", (prediction_id,)
        ).fetchone()
    return int(stored)
