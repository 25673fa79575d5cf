"""The append-only log of predictions and feedback: one SQLite file in WAL mode.

Predictions are queued by the request and written by a background thread in batches, so
a request never waits for the disk. Several workers append to the same file (WAL lets
readers run beside the one writer; ``busy_timeout`` waits for the lock). Requests only
ever insert: feedback for a prediction is kept once, and a different label for the
same prediction is refused.

Retention (``LogRetention``, one thread in the ``wine-assets serve`` process, not per worker)
deletes what the limits no longer allow, oldest first, in short transactions, so requests
never wait long for it. The rule: rows older than ``log_max_age_days`` are deleted, and while
the log's data is above ``log_max_bytes`` the oldest rows are deleted until it is at 80% of
it; in both cases **labelled predictions of the running experiment** (``serving.experiment``)
are kept, since the A/B report's accuracies and test are computed from them alone. Unlabelled
predictions are what a client can create in bulk; labels need a token (``/feedback``).
"""

from __future__ import annotations

import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from wine_assets.params import ServingParams

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
CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created);
"""
# After a checkpoint the WAL file is cut back to this: a large prune must not leave a large WAL behind.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
PRUNE_BATCH = 5000  # rows per delete transaction: about 15 ms, so a waiting /feedback is not kept long
SIZE_TARGET = 0.8  # over log_max_bytes, delete down to this share of it (room before the next prune)


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
    connection.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
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


def is_busy(error: BaseException) -> bool:
    """Whether a SQLite error is another connection holding the lock (the busy timeout ran out)."""
    return isinstance(error, sqlite3.OperationalError) and any(
        word in str(error).lower() for word in ("locked", "busy")
    )


@dataclass(frozen=True)
class Retention:
    """What the log may keep (module docstring): an age, a size, and the experiment whose labels stay."""

    max_age_seconds: float | None
    max_bytes: int | None
    experiment: str | None = None

    @classmethod
    def from_settings(cls, settings: ServingParams) -> Retention:
        days = settings.log_max_age_days
        return cls(None if days is None else days * 86400.0, settings.log_max_bytes, settings.experiment)


@dataclass(frozen=True)
class Pruned:
    by_age: int
    by_size: int
    data_bytes: int  # the log's data after the prune (the file keeps its size; SQLite reuses the space)


def data_bytes(connection: sqlite3.Connection) -> int:
    """Bytes of the database's pages in use (freed pages are reused before the file grows)."""
    (pages,) = connection.execute("PRAGMA page_count").fetchone()
    (free,) = connection.execute("PRAGMA freelist_count").fetchone()
    (size,) = connection.execute("PRAGMA page_size").fetchone()
    return (pages - free) * size


def _deletable(retention: Retention) -> tuple[str, tuple]:
    if retention.experiment is None:
        return "1", ()
    return (
        "NOT (p.experiment IS ? AND EXISTS (SELECT 1 FROM feedback f WHERE f.prediction_id = p.prediction_id))",
        (retention.experiment,),
    )


def _delete_oldest(connection: sqlite3.Connection, where: str, args: tuple, limit: int) -> int:
    """Delete up to ``limit`` of the oldest predictions matching ``where`` (and their labels), in batches."""
    deleted = 0
    while deleted < limit:
        with connection:
            connection.execute("BEGIN IMMEDIATE")
            ids = [
                found
                for (found,) in connection.execute(
                    f"SELECT p.prediction_id FROM predictions p WHERE {where} ORDER BY p.created LIMIT ?",
                    (*args, min(PRUNE_BATCH, limit - deleted)),
                )
            ]
            if not ids:
                break
            marks = ",".join("?" * len(ids))
            connection.execute(f"DELETE FROM feedback WHERE prediction_id IN ({marks})", ids)
            connection.execute(f"DELETE FROM predictions WHERE prediction_id IN ({marks})", ids)
        deleted += len(ids)
    return deleted


def prune(connection: sqlite3.Connection, retention: Retention, now: float | None = None) -> Pruned:
    """Enforce the age limit, then the size limit (module docstring for what is kept)."""
    keep, keep_args = _deletable(retention)
    by_age = 0
    if retention.max_age_seconds is not None:
        cutoff = (time.time() if now is None else now) - retention.max_age_seconds
        by_age = _delete_oldest(connection, f"p.created < ? AND {keep}", (cutoff, *keep_args), math.inf)
    by_size = 0
    used = data_bytes(connection)
    if retention.max_bytes is not None and used > retention.max_bytes:
        (rows,) = connection.execute("SELECT count(*) FROM predictions").fetchone()
        share = (used - SIZE_TARGET * retention.max_bytes) / used
        by_size = _delete_oldest(connection, keep, keep_args, math.ceil(rows * share))
        used = data_bytes(connection)
        if used > retention.max_bytes:
            logger.warning(
                "the prediction log holds %d bytes of data, above serving.log_max_bytes (%d), in labelled "
                "predictions of the running experiment %r, which are kept",
                used,
                retention.max_bytes,
                retention.experiment,
            )
    if by_age or by_size:
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
    return Pruned(by_age, by_size, used)


class LogRetention:
    """A daemon thread that prunes the log every ``interval`` seconds on its own connection."""

    def __init__(self, path: Path, retention: Retention, interval: float, busy_timeout: float = 1.0):
        self.path = path
        self.retention = retention
        self.interval = interval
        self.busy_timeout = busy_timeout
        self.last: Pruned | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log-retention", daemon=True)

    def start(self) -> LogRetention:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        while not self._stop.is_set():
            try:
                connection = connection or connect(self.path, timeout=self.busy_timeout)
                self.last = prune(connection, self.retention)
                if self.last.by_age or self.last.by_size:
                    logger.info(
                        "pruned the prediction log: %d row(s) past serving.log_max_age_days, %d over "
                        "serving.log_max_bytes",
                        self.last.by_age,
                        self.last.by_size,
                    )
            except Exception as exc:  # a locked or broken log: try again at the next interval
                logger.warning("could not prune the prediction log %s: %s", self.path, exc)
                if connection is not None:
                    connection.close()
                    connection = None
            self._stop.wait(self.interval)
        if connection is not None:
            connection.close()
