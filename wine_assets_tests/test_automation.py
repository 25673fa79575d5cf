"""Sensors and the schedule, evaluated against real files and a real Dagster instance."""

import hashlib
import os
import threading
import time

import dagster as dg
import pytest

from wine_assets.definitions import ASSET_CHECKS, ASSETS, defs, new_data_sensor, release_after_training
from wine_assets.pipeline.automation import sensor_default_status, sensor_interval
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.watch import decode_cursor, encode_cursor


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "instance").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "instance")) as instance:
        yield instance


@pytest.fixture
def watch_dir(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    return folder


def tick(instance, params_file, cursor=None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"params": WineParamsResource(params_file=str(params_file))}
    )
    return new_data_sensor.evaluate_tick(context)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.component
def test_new_same_and_changed_files(instance, write_params, write_csv, watch_dir):
    params_file = write_params(data={"watch_dir": "incoming"})
    first = write_csv("incoming/harvest.csv")

    new = tick(instance, params_file)
    [request] = new.run_requests
    assert request.run_key == sha(first)
    assert new_data_sensor.job_name == "training_job"
    assert request.run_config == {"resources": {"params": {"config": {"overrides": [f'data.source="{first}"']}}}}
    assert decode_cursor(new.cursor) == {str(first): sha(first)}

    same = tick(instance, params_file, new.cursor)
    assert same.run_requests == []
    assert "no new data in 1 watched file(s)" in same.skip_message

    first.write_text(first.read_text().replace("14.23", "14.25", 1))
    changed = tick(instance, params_file, same.cursor)
    [request] = changed.run_requests
    assert request.run_key == sha(first) != new.run_requests[0].run_key


@pytest.mark.component
def test_a_file_still_being_written_is_skipped_then_picked_up(instance, write_params, watch_dir, wine_frame):
    params_file = write_params(data={"watch_dir": "incoming"})
    target = watch_dir / "slow.csv"
    text = wine_frame.to_csv(index=False)
    stop = threading.Event()

    def writer():
        with open(target, "w") as handle:
            for start in range(0, len(text), 200):
                handle.write(text[start : start + 200])
                handle.flush()
                if stop.wait(0.02):
                    break
            # Keep going until the sensor has looked twice (the test sets stop after the tick).
            while not stop.wait(0.02):
                handle.write("\n")
                handle.flush()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.1)
        busy = tick(instance, params_file)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert busy.run_requests == []
    assert "slow.csv is still being written" in busy.skip_message
    done = tick(instance, params_file, busy.cursor)
    assert [request.run_key for request in done.run_requests] == [sha(target)]


@pytest.mark.component
def test_unreadable_and_empty_files_are_skipped_without_blocking_others(instance, write_params, write_csv, watch_dir):
    params_file = write_params(data={"watch_dir": "incoming"})
    os.symlink(watch_dir / "gone.csv", watch_dir / "broken.csv")
    (watch_dir / "empty.csv").write_text("")
    good = write_csv("incoming/good.csv")
    result = tick(instance, params_file)
    assert [request.run_key for request in result.run_requests] == [sha(good)]
    # The skipped files are looked at again on every tick, and picked up once they are whole.
    (watch_dir / "broken.csv").unlink()
    fixed = write_csv("incoming/broken.csv", edit=lambda frame: frame.head(120))
    again = tick(instance, params_file, result.cursor)
    assert [request.run_key for request in again.run_requests] == [sha(fixed)]


@pytest.mark.component
def test_a_csv_source_is_watched_when_there_is_no_watch_dir(instance, write_params, write_csv):
    csv = write_csv("wine.csv")
    result = tick(instance, write_params(data={"source": "wine.csv"}))
    assert [request.run_key for request in result.run_requests] == [sha(csv)]


@pytest.mark.component
def test_the_builtin_source_gives_nothing_to_watch(instance, write_params):
    result = tick(instance, write_params())
    assert result.run_requests == []
    assert "nothing to watch" in result.skip_message


@pytest.mark.component
def test_data_already_trained_on_is_not_requested(instance, write_params, write_csv):
    csv = write_csv("wine.csv")
    params_file = write_params(data={"source": "wine.csv"})
    materialized = dg.materialize(
        [*ASSETS, *ASSET_CHECKS],
        selection=["raw_wine"],
        instance=instance,
        resources={"params": WineParamsResource(params_file=str(params_file))},
    )
    assert materialized.success
    result = tick(instance, params_file)
    assert result.run_requests == []
    csv.write_text(csv.read_text().replace("14.23", "14.3", 1))
    assert [request.run_key for request in tick(instance, params_file).run_requests] == [sha(csv)]


@pytest.mark.component
def test_release_sensor_requests_release_job_with_the_training_params(instance, write_params, monkeypatch):
    params_file = write_params()
    monkeypatch.setenv("WINE_ASSETS_PARAMS", str(params_file))
    run_config = {"resources": {"params": {"config": {"overrides": ["model.n_estimators=20"]}}}}
    training = defs.resolve_job_def("training_job").execute_in_process(instance=instance, run_config=run_config)
    assert training.success
    success_event = next(event for event in training.all_events if event.event_type_value == "PIPELINE_SUCCESS")
    context = dg.build_run_status_sensor_context(
        sensor_name="release_after_training",
        dagster_event=success_event,
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(training.run_id),
    )
    request = release_after_training(context)
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == f"release-after-{training.run_id}"
    assert request.run_config == run_config
    assert release_after_training.job_name == "release_job"


@pytest.mark.unit
def test_sensor_settings_come_from_the_environment(monkeypatch):
    assert sensor_interval() == 30
    assert sensor_default_status() == dg.DefaultSensorStatus.STOPPED
    assert new_data_sensor.minimum_interval_seconds == 30
    assert new_data_sensor.default_status == dg.DefaultSensorStatus.STOPPED
    monkeypatch.setenv("WINE_ASSETS_SENSOR_INTERVAL", "5")
    monkeypatch.setenv("WINE_ASSETS_SENSORS", "Running")
    assert sensor_interval() == 5
    assert sensor_default_status() == dg.DefaultSensorStatus.RUNNING
    monkeypatch.setenv("WINE_ASSETS_SENSOR_INTERVAL", "soon")
    with pytest.raises(ValueError, match="WINE_ASSETS_SENSOR_INTERVAL='soon'"):
        sensor_interval()


@pytest.mark.unit
def test_retrain_schedule_is_daily_and_stopped():
    schedule = defs.resolve_schedule_def("retrain_schedule")
    assert schedule.cron_schedule == "0 3 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.job_name == "training_job"


@pytest.mark.unit
def test_cursor_round_trip_and_foreign_cursors():
    assert decode_cursor(encode_cursor({"/a.csv": "x"})) == {"/a.csv": "x"}
    assert decode_cursor(None) == decode_cursor("") == decode_cursor("not json") == decode_cursor("[1]") == {}


@pytest.mark.component
def test_a_watched_path_with_yaml_characters_reaches_the_run_intact(instance, write_params, write_csv, watch_dir):
    from wine_assets.params import load_params

    params_file = write_params(data={"watch_dir": "incoming"})
    odd = write_csv("incoming/harvest #2: late.csv")
    [request] = tick(instance, params_file).run_requests
    overrides = request.run_config["resources"]["params"]["config"]["overrides"]
    assert load_params(params_file, overrides).data_source_path == odd
