"""The Celery app a worker runs (``make worker``): dagster-celery's step task on the project's broker.

    celery -A wine_assets.pipeline.celery_app worker -Q dagster --prefetch-multiplier=1

Broker and result backend come from ``WINE_ASSETS_CELERY_BROKER`` and
``WINE_ASSETS_CELERY_BACKEND`` (what ``make services`` writes to .services.env), the same
variables deploy/run-celery.yaml gives the executor: launcher and workers meet on one queue.
Each task loads the run from the instance the launcher names and executes one step with
Dagster's engine, reading the run's params from its tags (wine_assets.params.LaunchParams).
"""

import os

from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

BROKER_ENV, BACKEND_ENV = "WINE_ASSETS_CELERY_BROKER", "WINE_ASSETS_CELERY_BACKEND"


def _required(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise SystemExit(f"{name} is not set: run `make services` (it writes .services.env) or set it by hand")
    return value


app = make_app(CeleryExecutor.for_cli(broker=_required(BROKER_ENV), backend=_required(BACKEND_ENV)).app_args())
execute_plan = create_task(app)
