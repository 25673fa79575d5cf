"""The prediction log's writer thread (wine_assets.serving.log.PredictionLog) on a real SQLite file in
tmp_path: a batch that fails is retried on a fresh connection, and one that keeps failing is dropped,
counted and logged, while the writer goes on with the next batch."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from wine_assets.serving.log import PredictionLog, PredictionRow, connect

pytestmark = pytest.mark.unit


def rows(*ids: str) -> list[PredictionRow]:
    return [PredictionRow(prediction_id, "request-1", "spring", "production", 3, 1) for prediction_id in ids]


def logged_ids(path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return sorted(row[0] for row in connection.execute("SELECT prediction_id FROM predictions"))


def test_closing_a_log_that_never_wrote_leaves_an_empty_log(tmp_path):
    path = tmp_path / "serving" / "predictions.sqlite"
    log = PredictionLog(path)
    assert log.flush(timeout=1)  # nothing queued: nothing to wait for
    log.close()
    assert path.is_file()
    assert logged_ids(path) == []


def test_a_batch_that_fails_is_written_on_a_fresh_connection(tmp_path):
    path = tmp_path / "predictions.sqlite"
    dropped: list[int] = []
    log = PredictionLog(path, interval=0.01, on_error=dropped.append)
    try:
        log.append(rows("a"))
        assert log.flush(timeout=5)
        # Another process drops the table under the writer's open connection: its next insert fails.
        with sqlite3.connect(path) as other:
            other.execute("DROP TABLE predictions")
        log.append(rows("b", "c"))
        assert log.flush(timeout=5)
    finally:
        log.close()
    # The retry's fresh connection created the table again and wrote the batch; nothing was dropped.
    assert logged_ids(path) == ["b", "c"]
    assert dropped == []


def test_a_batch_that_keeps_failing_is_dropped_counted_and_logged(tmp_path, caplog):
    path = tmp_path / "predictions.sqlite"
    dropped: list[int] = []
    log = PredictionLog(path, interval=0.01, on_error=dropped.append)
    log.RETRIES = 2  # two tries (0.1 s and 0.2 s apart) rather than the five a server makes
    try:
        path.unlink()
        path.mkdir()  # the log's path is now a folder: no connection can open it
        with caplog.at_level(logging.ERROR, logger="wine_assets.serving.log"):
            log.append(rows("a", "b", "c"))
            assert log.flush(timeout=5)  # dropped rows count as done: flush does not hang
        assert dropped == [3]
        assert [record.getMessage() for record in caplog.records] == [
            f"dropped 3 prediction(s): could not write them to {path}: unable to open database file"
        ]
        path.rmdir()
        log.append(rows("d"))  # the writer outlived the bad batch
        assert log.flush(timeout=5)
    finally:
        log.close()
    assert logged_ids(path) == ["d"]
    assert dropped == [3]


def test_connect_creates_the_folder_and_the_tables(tmp_path):
    path = tmp_path / "deep" / "er" / "log.sqlite"
    connection = connect(path, timeout=2.5)
    try:
        tables = sorted(row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        assert tables == ["feedback", "predictions"]
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA busy_timeout").fetchone() == (2500,)
    finally:
        connection.close()


def test_without_an_error_callback_a_dropped_batch_is_only_logged(tmp_path, caplog):
    path = tmp_path / "predictions.sqlite"
    log = PredictionLog(path, interval=0.01)
    log.RETRIES = 1
    try:
        path.unlink()
        path.mkdir()
        with caplog.at_level(logging.ERROR, logger="wine_assets.serving.log"):
            log.append(rows("a"))
            assert log.flush(timeout=5)
    finally:
        log.close()
    assert [record.getMessage() for record in caplog.records] == [
        f"dropped 1 prediction(s): could not write them to {path}: unable to open database file"
    ]
