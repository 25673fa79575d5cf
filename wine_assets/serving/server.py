"""``wine-assets serve``: process set-up, then uvicorn.

Workers are separate processes started by uvicorn; each builds the app from the params file
named by ``WINE_ASSETS_PARAMS`` (set here to an absolute path, so a worker reads exactly the
file the command was given) and loads the model itself. Prometheus' multiprocess folder is
created empty before any worker starts. SIGTERM (or Ctrl-C) stops accepting connections and
lets requests in flight finish, for at most ``graceful_seconds``.

Connections are bounded by ``protocol.GuardedHttpToolsProtocol`` (head size, head and body
timeouts) and uvicorn's ``timeout_keep_alive``; the prediction log by one ``LogRetention``
thread in this process, for every worker.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from wine_assets.params import PARAMS_ENV_VAR, Params

if TYPE_CHECKING:
    from wine_assets.serving.log import LogRetention

# Not imported from wine_assets.serving.metrics: prometheus_client must not be imported before it is set.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

logger = logging.getLogger(__name__)

APP_FACTORY = "wine_assets.serving.app:create_app"


def prepare_metrics_dir(folder: str | None) -> Path:
    """An empty folder for prometheus_client's multiprocess files (a new temporary one by default)."""
    if folder:
        path = Path(folder)
        if path.exists():
            for entry in path.glob("*.db"):
                entry.unlink()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix="wine-serving-metrics-"))


class ServeError(Exception):
    """The server cannot start; the message says what to fix."""


def check_log(params: Params) -> None:
    """Open the prediction log once before any worker starts: a bad path is one clear error, not a
    worker that uvicorn restarts over and over."""
    path = params.serving_log_path
    if path is None:
        return
    import sqlite3

    from wine_assets.serving.log import connect

    try:
        connect(path).close()
    except (OSError, sqlite3.Error) as exc:
        raise ServeError(f"serving.log_path: cannot open the prediction log {path}: {exc}") from None


def run(
    params: Params, host: str, port: int, workers: int, graceful_seconds: float = 30.0, access_log: bool = False
) -> None:
    if params.source_file is not None:
        os.environ[PARAMS_ENV_VAR] = str(params.source_file.resolve())
    check_log(params)
    chosen = os.environ.get(MULTIPROC_ENV)
    metrics_dir = prepare_metrics_dir(chosen)
    os.environ[MULTIPROC_ENV] = str(metrics_dir)
    import uvicorn  # after the environment is set: prometheus_client reads it at import

    retention = start_retention(params)
    try:
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            http=http_protocol(params),
            loop="uvloop",
            access_log=access_log,
            timeout_keep_alive=params.serving.keep_alive_seconds,
            timeout_graceful_shutdown=graceful_seconds,
            log_level="warning",
        )
    finally:
        if retention is not None:
            retention.stop()
        if not chosen:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def http_protocol(params: Params) -> functools.partial:
    """The httptools protocol with the serving section's limits; a partial pickles to spawned workers."""
    from wine_assets.serving.protocol import GuardedHttpToolsProtocol, HttpLimits

    settings = params.serving
    limits = HttpLimits(settings.max_header_bytes, settings.header_timeout_seconds, settings.body_timeout_seconds)
    return functools.partial(GuardedHttpToolsProtocol, limits=limits)


def start_retention(params: Params) -> LogRetention | None:
    """The log's age and size limits, enforced by one thread here for all workers (None: no log, no limits)."""
    from wine_assets.serving.log import LogRetention, Retention

    settings = params.serving
    path = params.serving_log_path
    if path is None or (settings.log_max_age_days is None and settings.log_max_bytes is None):
        return None
    retention = Retention.from_settings(settings)
    return LogRetention(path, retention, settings.log_prune_interval_seconds, settings.log_busy_timeout_seconds).start()
