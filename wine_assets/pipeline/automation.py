"""Automation: retrain when new data arrives, release after a successful training run, and an
optional daily retrain.

Sensors start STOPPED unless ``WINE_ASSETS_SENSORS=running``; ``WINE_ASSETS_SENSOR_INTERVAL``
sets how often they are evaluated (seconds, 30 by default).
"""

import json
import os
from typing import Any

import dagster as dg

from wine_assets.pipeline.ingestion import raw_wine
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.watch import decode_cursor, encode_cursor, scan, watched_files

SENSORS_ENV_VAR = "WINE_ASSETS_SENSORS"
INTERVAL_ENV_VAR = "WINE_ASSETS_SENSOR_INTERVAL"
DEFAULT_INTERVAL_SECONDS = 30
# Two looks this far apart must agree before a file counts as completely written.
SETTLE_SECONDS = 1.0
DATA_VERSION_TAG = "dagster/data_version"


def sensor_interval() -> int:
    text = os.environ.get(INTERVAL_ENV_VAR, "").strip()
    if not text:
        return DEFAULT_INTERVAL_SECONDS
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{INTERVAL_ENV_VAR}={text!r}: use a whole number of seconds, 1 or more")
    return int(text)


def sensor_default_status() -> dg.DefaultSensorStatus:
    text = os.environ.get(SENSORS_ENV_VAR, "stopped").strip().lower()
    if text not in ("running", "stopped"):
        raise ValueError(f"{SENSORS_ENV_VAR}={text!r}: use 'running' or 'stopped'")
    return dg.DefaultSensorStatus.RUNNING if text == "running" else dg.DefaultSensorStatus.STOPPED


def params_run_config(overrides: list[str]) -> dict:
    return {"resources": {"params": {"config": {"overrides": overrides}}}}


def latest_trained_fingerprint(instance: dg.DagsterInstance) -> str | None:
    """The fingerprint of the data raw_wine last loaded (its data version), if any."""
    event = instance.get_latest_materialization_event(raw_wine.key)
    if event is None or event.asset_materialization is None:
        return None
    return event.asset_materialization.tags.get(DATA_VERSION_TAG)


def build_new_data_sensor(
    training_job: Any,
    settle_seconds: float = SETTLE_SECONDS,
    minimum_interval_seconds: int | None = None,
    default_status: dg.DefaultSensorStatus | None = None,
) -> dg.SensorDefinition:
    @dg.sensor(
        name="new_data_sensor",
        job=training_job,
        minimum_interval_seconds=minimum_interval_seconds or sensor_interval(),
        default_status=default_status or sensor_default_status(),
        description=(
            "Requests training_job when the CSV named by data.source (or any *.csv in data.watch_dir) "
            "has content not trained on yet. run_key = the file's sha256, so the same data never "
            "trains twice; files still being written or unreadable are skipped until a later tick."
        ),
    )
    def new_data_sensor(context: dg.SensorEvaluationContext, params: WineParamsResource):
        values = params.values
        paths = watched_files(values)
        if not paths:
            where = values.watch_dir or "data.source"
            return dg.SkipReason(f"nothing to watch: no *.csv in {where} (the built-in data set never changes)")
        result = scan(
            paths, decode_cursor(context.cursor), settle_seconds, latest_trained_fingerprint(context.instance)
        )
        for reason in result.skipped:
            context.log.info(reason)
        requests = [
            dg.RunRequest(
                run_key=item.sha256,
                # JSON-quoted: a path with '#' or ': ' must stay one YAML string.
                run_config=params_run_config([*params.overrides, f"data.source={json.dumps(str(item.path))}"]),
                tags={"wine_assets/data_fingerprint": item.sha256, "wine_assets/data_source": str(item.path)},
            )
            for item in result.new
        ]
        if not requests:
            skipped = f"; skipped: {'; '.join(result.skipped)}" if result.skipped else ""
            return dg.SensorResult(
                skip_reason=dg.SkipReason(f"no new data in {len(paths)} watched file(s){skipped}"),
                cursor=encode_cursor(result.requested),
            )
        return dg.SensorResult(run_requests=requests, cursor=encode_cursor(result.requested))

    return new_data_sensor


def build_release_sensor(
    training_job: Any,
    release_job: Any,
    minimum_interval_seconds: int | None = None,
    default_status: dg.DefaultSensorStatus | None = None,
) -> dg.RunStatusSensorDefinition:
    @dg.run_status_sensor(
        name="release_after_training",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=[training_job],
        request_job=release_job,
        minimum_interval_seconds=minimum_interval_seconds or sensor_interval(),
        default_status=default_status or sensor_default_status(),
        description=(
            "Requests release_job after every successful training_job run, with the same params. "
            "The release job's own accuracy gate still decides whether anything is deployed."
        ),
    )
    def release_after_training(context: dg.RunStatusSensorContext):
        run = context.dagster_run
        resources = run.run_config.get("resources") if isinstance(run.run_config, dict) else None
        return dg.RunRequest(
            run_key=f"release-after-{run.run_id}",
            run_config={"resources": resources} if resources else {},
            tags={"wine_assets/training_run": run.run_id},
        )

    return release_after_training


def build_retrain_schedule(training_job: Any) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="retrain_schedule",
        job=training_job,
        cron_schedule="0 3 * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=(
            "Retrain every day at 03:00 UTC. Stopped by default; start it in the UI or with dagster schedule start."
        ),
    )
