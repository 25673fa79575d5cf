"""The prediction log's writer thread (wine_assets.serving.log.PredictionLog) on a real SQLite file in
tmp_path: a batch that fails is retried on a fresh connection, and one that keeps failing is dropped,
counted and logged, while the writer goes on with the next batch. And its retention: the age and size
limits, what they keep (labelled predictions of the running experiment), and the background thread."""

from __future__ import annotations

import logging
import sqlite3
import time

import pytest

from wine_assets.params import ServingParams
from wine_assets.serving.log import (
    LogRetention,
    PredictionLog,
    PredictionRow,
    Retention,
    _insert,
    connect,
    data_bytes,
    prune,
    record_feedback,
)

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


# -- retention: the age and size limits (wine_assets.serving.log.prune, LogRetention) -------------------
DAY = 86400.0


def log_rows(path, specs: list[tuple[str, str | None, float]]) -> None:
    """(prediction id, experiment, age in seconds) rows, written as the server writes them, then aged."""
    connection = connect(path)
    try:
        _insert(
            connection,
            [PredictionRow(pid, "request-1", experiment, "production", 1, 0) for pid, experiment, _ in specs],
        )
        now = time.time()
        connection.executemany(
            "UPDATE predictions SET created = ? WHERE prediction_id = ?", [(now - age, pid) for pid, _, age in specs]
        )
    finally:
        connection.close()


def label(path, *ids: str) -> None:
    connection = connect(path)
    try:
        for prediction_id in ids:
            record_feedback(connection, prediction_id, 0)
    finally:
        connection.close()


def labelled_ids(path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return sorted(row[0] for row in connection.execute("SELECT prediction_id FROM feedback"))


def test_the_age_limit_deletes_old_rows_but_the_running_experiments_labels(tmp_path):
    path = tmp_path / "predictions.sqlite"
    log_rows(
        path,
        [
            ("old-unlabelled", "spring", 40 * DAY),
            ("old-labelled-spring", "spring", 40 * DAY),
            ("old-labelled-winter", "winter", 40 * DAY),
            ("old-labelled-pinned", None, 40 * DAY),
            ("new-unlabelled", "spring", DAY),
            ("new-labelled-winter", "winter", DAY),
        ],
    )
    label(path, "old-labelled-spring", "old-labelled-winter", "old-labelled-pinned", "new-labelled-winter")
    connection = connect(path)
    try:
        pruned = prune(connection, Retention(max_age_seconds=30 * DAY, max_bytes=None, experiment="spring"))
    finally:
        connection.close()
    assert (pruned.by_age, pruned.by_size) == (3, 0)
    assert logged_ids(path) == ["new-labelled-winter", "new-unlabelled", "old-labelled-spring"]
    assert labelled_ids(path) == ["new-labelled-winter", "old-labelled-spring"]  # no label outlives its prediction


def test_without_a_running_experiment_labelled_rows_age_out_too(tmp_path):
    path = tmp_path / "predictions.sqlite"
    log_rows(path, [("old", "spring", 40 * DAY), ("new", "spring", DAY)])
    label(path, "old", "new")
    connection = connect(path)
    try:
        pruned = prune(connection, Retention(max_age_seconds=30 * DAY, max_bytes=None, experiment=None))
    finally:
        connection.close()
    assert pruned.by_age == 1
    assert logged_ids(path) == labelled_ids(path) == ["new"]


def test_the_size_limit_deletes_the_oldest_rows_and_the_space_is_reused(tmp_path):
    path = tmp_path / "predictions.sqlite"
    count = 20_000
    specs = [(f"p{index:06d}", "spring", float(count - index)) for index in range(count)]  # p000000 is the oldest
    log_rows(path, specs)
    kept_labels = [f"p{index:06d}" for index in range(0, 200, 10)]  # among the oldest, of the running experiment
    label(path, *kept_labels)
    connection = connect(path)
    try:
        full = data_bytes(connection)
        limit = full // 2
        pruned = prune(connection, Retention(max_age_seconds=None, max_bytes=limit, experiment="spring"))
        assert pruned.by_size > 0 and pruned.by_age == 0
        assert pruned.data_bytes == data_bytes(connection) <= limit
        (file_pages,) = connection.execute("PRAGMA page_count").fetchone()
    finally:
        connection.close()
    remaining = logged_ids(path)
    unlabelled = [pid for pid in remaining if pid not in kept_labels]
    # the oldest went first: what is left (besides the kept labels) is the newest rows, every one of them
    assert unlabelled == [pid for pid, _, _ in specs[count - len(unlabelled) :]]
    assert set(kept_labels) <= set(remaining) and labelled_ids(path) == sorted(kept_labels)
    # As much again, pruned again: the file grows no further, the freed pages were used again.
    log_rows(path, [(f"q{index:06d}", "spring", 0.0) for index in range(count - len(unlabelled))])
    connection = connect(path)
    try:
        prune(connection, Retention(max_age_seconds=None, max_bytes=limit, experiment="spring"))
        assert data_bytes(connection) <= limit
        assert connection.execute("PRAGMA page_count").fetchone()[0] <= file_pages * 1.1
    finally:
        connection.close()


def test_labelled_rows_of_the_running_experiment_are_kept_over_the_size_limit_and_said(tmp_path, caplog):
    path = tmp_path / "predictions.sqlite"
    ids = [f"p{index:05d}" for index in range(8000)]
    log_rows(path, [(pid, "spring", 1.0) for pid in ids])
    label(path, *ids)
    connection = connect(path)
    try:
        assert data_bytes(connection) > 1_000_000
        with caplog.at_level(logging.WARNING, logger="wine_assets.serving.log"):
            pruned = prune(connection, Retention(max_age_seconds=None, max_bytes=1_000_000, experiment="spring"))
    finally:
        connection.close()
    assert pruned.by_size == 0 and logged_ids(path) == ids
    assert any(
        "labelled predictions of the running experiment 'spring', which are kept" in r.message for r in caplog.records
    )


def test_the_retention_thread_prunes_in_the_background_while_labels_are_written(tmp_path):
    path = tmp_path / "predictions.sqlite"
    log_rows(path, [(f"old{index}", "spring", 40 * DAY) for index in range(12_000)])
    log_rows(path, [(f"new{index}", "spring", 0.0) for index in range(200)])
    retention = LogRetention(path, Retention(30 * DAY, None, "spring"), interval=0.05, busy_timeout=1.0).start()
    writer = connect(path, timeout=1.0)  # as /feedback's connection: a busy log would raise within 1 s
    try:
        for index in range(200):
            assert record_feedback(writer, f"new{index}", 0) == (0, True)
        deadline = time.monotonic() + 20
        while any(pid.startswith("old") for pid in logged_ids(path)):
            assert time.monotonic() < deadline, "the old rows were not pruned within 20 s"
            time.sleep(0.05)
    finally:
        writer.close()
        retention.stop()
    assert logged_ids(path) == sorted(f"new{index}" for index in range(200)) == labelled_ids(path)
    assert retention.last is not None and retention.last.by_size == 0


def test_retention_reads_its_limits_from_the_serving_section():
    settings = ServingParams(log_max_age_days=2.5, log_max_bytes=5_000_000, experiment="spring", candidate_version=2)
    assert Retention.from_settings(settings) == Retention(2.5 * DAY, 5_000_000, "spring")
    assert Retention.from_settings(ServingParams(log_max_age_days=None)).max_age_seconds is None
