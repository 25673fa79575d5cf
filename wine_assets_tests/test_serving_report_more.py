"""`wine-assets serving report`'s reading and deciding (wine_assets.serving.report), called directly on
prediction logs written by wine_assets.serving.log in tmp_path and on hand-made rows."""

from __future__ import annotations

import time

import pytest

from wine_assets.serving.log import PredictionRow, connect, record_feedback
from wine_assets.serving.report import ReportError, build_report, format_report, latest_experiment, read_rows

pytestmark = pytest.mark.unit


def write_log(path, rows: list[tuple[str, str | None, str]]) -> None:
    """(prediction id, experiment, variant) rows, one second apart in this order, as the server logs them."""
    connection = connect(path)
    try:
        for offset, (prediction_id, experiment, variant) in enumerate(rows):
            row = PredictionRow(prediction_id, "request", experiment, variant, 1, 0)
            connection.execute(
                "INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.prediction_id,
                    row.request_id,
                    time.time() + offset,
                    row.experiment,
                    row.variant,
                    1,
                    0,
                    None,
                    None,
                ),
            )
    finally:
        connection.close()


def test_the_latest_experiment_is_the_one_logged_last(tmp_path):
    path = tmp_path / "predictions.sqlite"
    assert latest_experiment(path) is None  # no log yet
    write_log(path, [("a", None, "pinned")])
    assert latest_experiment(path) is None  # only pinned predictions, which belong to no experiment
    write_log(path, [("b", "spring", "production"), ("c", "summer", "candidate"), ("d", None, "pinned")])
    assert latest_experiment(path) == "summer"


def test_a_file_that_is_not_a_log_has_no_experiment_and_no_rows(tmp_path):
    path = tmp_path / "predictions.sqlite"
    path.write_bytes(b"this is not a SQLite database, only text that happens to be here\n" * 20)
    assert latest_experiment(path) is None
    with pytest.raises(ReportError, match=rf"^{path} is not a readable prediction log: file is not a database"):
        read_rows(path, None)


def test_rows_are_filtered_by_experiment_and_joined_with_feedback(tmp_path):
    path = tmp_path / "predictions.sqlite"
    write_log(path, [("a", "spring", "production"), ("b", "spring", "candidate"), ("c", "summer", "production")])
    connection = connect(path)
    try:
        assert record_feedback(connection, "b", 2) == (2, True)
    finally:
        connection.close()
    assert sorted(read_rows(path, "spring")) == [
        ("candidate", 1, 0, None, None, 2),
        ("production", 1, 0, None, None, None),
    ]
    assert len(read_rows(path, None)) == 3


def test_no_rows_is_an_error_naming_the_experiment():
    with pytest.raises(ReportError, match=r"^the log has no predictions for experiment 'autumn'$"):
        build_report([], "autumn", min_labelled=1)
    with pytest.raises(ReportError, match=r"^the log has no predictions$"):
        build_report([], None, min_labelled=1)


def test_one_variant_is_reported_without_a_comparison():
    rows = [
        ("production", 1, 0, None, None, 0),
        ("production", 1, 1, None, None, 2),
        ("production", 1, 2, None, None, None),
    ]
    report = build_report(rows, None, min_labelled=1)
    assert report.mode == "none"
    assert report.decision == "no comparison: only one variant has predictions"
    assert report.comparison == {} and report.warnings == []
    (summary,) = report.variants
    assert (summary.predictions, summary.labelled, summary.correct, summary.accuracy) == (3, 2, 1, 0.5)
    text = format_report(report)
    assert "test:" not in text and "WARNING" not in text
    assert text.endswith("\ndecision: no comparison: only one variant has predictions\n")
    assert "experiment: (none named: every prediction in the log, pinned versions included)    mode: none" in text


def test_a_split_without_labels_decides_nothing():
    rows = [("production", 1, 0, None, None, None), ("candidate", 2, 1, None, None, None)]
    report = build_report(rows, "spring", min_labelled=1)
    assert report.mode == "split"
    assert report.comparison == {}
    assert report.decision == "no decision: no labelled predictions yet"
    assert report.warnings == [
        "too few labelled predictions to decide: production has 0, candidate has 0 "
        "(serving.min_labelled is 1 per variant); send more feedback"
    ]
    text = format_report(report)
    table = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:5]}
    assert table["candidate"] == ["v2", "1", "0", "-", "-"]
    assert table["production"] == ["v1", "1", "0", "-", "-"]
    assert "\nWARNING: too few labelled predictions to decide" in text


@pytest.mark.unit
def test_a_log_in_a_folder_with_uri_characters_is_read(tmp_path):
    from wine_assets.serving.log import connect
    from wine_assets.serving.report import latest_experiment, read_rows

    path = tmp_path / "probe #1 ?x=%20" / "predictions.sqlite"
    path.parent.mkdir()
    connect(path).close()
    assert read_rows(path, None) == []
    assert latest_experiment(path) is None


def test_pruning_the_log_leaves_the_experiments_accuracies_test_and_decision_as_they_were(tmp_path):
    """Retention keeps the running experiment's labelled rows, which are all the report decides on."""
    from wine_assets.serving.log import Retention, data_bytes, prune

    path = tmp_path / "predictions.sqlite"
    connection = connect(path)
    try:
        now, day = time.time(), 86400.0
        rows = []
        for index in range(120):  # labelled, 40 days old: production right 60%, the candidate 95%
            variant = "candidate" if index % 2 else "production"
            rows.append((f"l{index}", variant, 0, now - 40 * day))
        for index in range(3000):  # unlabelled, old and new
            rows.append((f"u{index}", "candidate" if index % 3 == 0 else "production", 1, now - (index % 60) * day))
        connection.executemany(
            "INSERT INTO predictions VALUES (?, 'request', ?, 'spring', ?, ?, ?, NULL, NULL)",
            [
                (pid, created, variant, 2 if variant == "candidate" else 1, predicted)
                for pid, variant, predicted, created in rows
            ],
        )
        for index in range(120):
            right = index % 20 != 1 if index % 2 else index % 10 < 6
            assert record_feedback(connection, f"l{index}", 0 if right else 2)[1]
        before = build_report(read_rows(path, "spring"), "spring", min_labelled=30)
        pruned = prune(connection, Retention(30 * day, data_bytes(connection) // 2, "spring"))
        after = build_report(read_rows(path, "spring"), "spring", min_labelled=30)
    finally:
        connection.close()
    assert pruned.by_age > 0 and sum(v.predictions for v in after.variants) < sum(
        v.predictions for v in before.variants
    )
    fields = ("variant", "versions", "labelled", "correct", "accuracy", "interval")
    assert [[getattr(v, f) for f in fields] for v in after.variants] == [
        [getattr(v, f) for f in fields] for v in before.variants
    ]
    assert after.comparison == before.comparison and after.decision == before.decision
    assert after.decision.startswith("the candidate is more accurate")
