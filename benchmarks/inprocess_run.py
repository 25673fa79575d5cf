"""Materialize the whole graph with dagster.materialize() in this process and print timings as JSON.

Usage: python inprocess_run.py PARAMS_FILE INSTANCE_DIR [--twice]
Prints import seconds, materialize() seconds, and each step's start and end (epoch seconds).
With --twice, materializes once more in the same process (warm: imports and first-call costs
paid) and also prints that call's seconds.
"""

import json
import sys
import time

started = time.perf_counter()
import dagster as dg  # noqa: E402

from wine_assets.definitions import ASSET_CHECKS, ASSETS  # noqa: E402
from wine_assets.pipeline.resources import WineParamsResource  # noqa: E402

imported = time.perf_counter()
STEP_EVENTS = {"STEP_START": "start", "STEP_SUCCESS": "end", "STEP_FAILURE": "end"}


def materialize_report(params_file: str, instance_dir: str, twice: bool = False) -> dict:
    """The report this script prints. materialize_seconds count from the call (in this script, right
    after the imports), the instance's set-up included; import_seconds are this module's imports
    (Dagster's and the definitions'), which only a fresh process measures."""
    called = time.perf_counter()
    with dg.instance_for_test(temp_dir=instance_dir) as instance:
        result = dg.materialize(
            [*ASSETS, *ASSET_CHECKS],
            instance=instance,
            resources={"params": WineParamsResource(params_file=params_file)},
            raise_on_error=False,
        )
        finished = time.perf_counter()
        steps: dict[str, dict[str, float]] = {}
        for entry in instance.all_logs(result.run_id):
            event = entry.dagster_event
            if event is not None and event.event_type_value in STEP_EVENTS:
                steps.setdefault(event.step_key, {})[STEP_EVENTS[event.event_type_value]] = entry.timestamp
                if event.event_type_value == "STEP_FAILURE":
                    steps[event.step_key]["failed"] = 1.0

        again = None
        if twice:
            before = time.perf_counter()
            second = dg.materialize(
                [*ASSETS, *ASSET_CHECKS],
                instance=instance,
                resources={"params": WineParamsResource(params_file=params_file)},
                raise_on_error=False,
            )
            again = time.perf_counter() - before if second.success else None
    return {
        "success": result.success,
        "import_seconds": imported - started,
        "materialize_seconds": finished - called,
        "warm_materialize_seconds": again,
        "steps": steps,
    }


if __name__ == "__main__":
    print(json.dumps(materialize_report(sys.argv[1], sys.argv[2], "--twice" in sys.argv)))
