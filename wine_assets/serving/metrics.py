"""Prometheus metrics of the serving API, correct with several uvicorn workers.

``wine-assets serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder before any worker
starts (prometheus_client reads it at import); each worker then writes its samples to
memory-mapped files there, and ``GET /metrics`` on any worker merges every worker's files.
Gauges that describe one live worker (``multiprocess_mode="liveall"``) carry a ``worker`` label:
the worker's index (0, 1, ...), not its process id, which /metrics does not show. Each worker
claims the lowest free index at start-up by holding a lock file in that folder; a worker that
dies frees its index for the one uvicorn starts in its place. A worker that starts removes the
files of workers that died (``mark_process_dead``).
Without the variable (a library user building the app in-process) the default registry is used.

Names follow Prometheus' conventions: base units, ``_total`` for counters, ``_seconds``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "wine_serving"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_PID_FILE = re.compile(r"_(\d+)\.db$")
MAX_WORKERS = 256  # more indexes than serving.workers allows (64), for workers restarted while others stop
_claimed: tuple[int, FileLock] | None = None  # this process's index and the lock that holds it

REQUESTS = Counter(
    f"{PREFIX}_requests_total",
    "HTTP requests answered, by route template, method and status code.",
    ["endpoint", "method", "status"],
)
LATENCY = Histogram(
    f"{PREFIX}_request_duration_seconds",
    "Time from the request's arrival to the end of its response.",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    f"{PREFIX}_requests_in_flight", "Requests being handled now, over all workers.", multiprocess_mode="livesum"
)
PREDICTIONS = Counter(
    f"{PREFIX}_predictions_total",
    "Rows scored, by model version, variant and predicted class.",
    ["version", "variant", "predicted_class"],
)
REJECTED_ROWS = Counter(
    f"{PREFIX}_rejected_rows_total",
    "Rows in refused requests, by reason (a request refused before its rows were read counts one).",
    ["reason"],
)
MODEL_VERSION = Gauge(
    f"{PREFIX}_model_version",
    "The registry version a worker serves, by role (production, candidate).",
    ["role"],
    multiprocess_mode="liveall",
)
MODEL_LOADED = Gauge(
    f"{PREFIX}_model_ready",
    "1 when the worker has a verified, warmed production model.",
    multiprocess_mode="liveall",
)
RELOADS = Counter(
    f"{PREFIX}_model_reloads_total",
    "Attempts to load a version after the alias moved, by role and outcome.",
    ["role", "outcome"],
)
RELOAD_SECONDS = Histogram(
    f"{PREFIX}_model_load_seconds",
    "Time to load, verify and warm a version.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
FEEDBACK = Counter(
    f"{PREFIX}_feedback_total",
    "Labelled predictions received through POST /feedback, by variant and outcome.",
    ["variant", "outcome"],
)
SHADOW = Counter(
    f"{PREFIX}_shadow_comparisons_total",
    "Rows the shadow candidate scored, by whether it agreed with production.",
    ["outcome"],
)
LOG_DROPPED = Counter(f"{PREFIX}_log_write_errors_total", "Prediction-log rows that could not be written.")


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def forget_dead_workers() -> list[int]:
    """Remove the live-gauge files of worker processes that no longer exist; their pids."""
    folder = multiprocess_dir()
    if folder is None or not folder.is_dir():
        return []
    dead = set()
    for path in folder.glob("*.db"):
        match = _PID_FILE.search(path.name)
        if match and not _alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(folder))
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_worker_index() -> int | None:
    """This worker's index in the multiprocess folder (None without one): the lowest index whose
    lock no live process holds. The lock is held until the process ends, when the OS releases it."""
    global _claimed
    folder = multiprocess_dir()
    if folder is None:
        return None
    if _claimed is not None:
        return _claimed[0]
    for index in range(MAX_WORKERS):
        lock = FileLock(folder / f"worker-{index}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        pid = str(os.getpid())
        for stale in folder.glob("worker-*.pid"):  # a claim left by a dead process that had this pid
            if stale.name != f"worker-{index}.pid" and _read(stale) == pid:
                stale.unlink(missing_ok=True)
        (folder / f"worker-{index}.pid").write_text(pid)
        _claimed = (index, lock)
        return index
    raise RuntimeError(f"more than {MAX_WORKERS} workers hold an index in {folder}")


def worker_indexes(folder: Path) -> dict[str, str]:
    """Process id to worker index, for the workers that claimed one (the last claim of an index wins)."""
    found = {}
    for path in folder.glob("worker-*.pid"):
        pid = _read(path)
        if pid:  # empty: a worker writing its claim this moment; it shows on the next scrape
            found[pid] = path.name.removeprefix("worker-").removesuffix(".pid")
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class _ByWorkerIndex:
    """prometheus_client's multiprocess collector, with each live gauge's ``pid`` label replaced by
    ``worker`` (the index). A sample of a process that claimed no index is left out."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.collector = multiprocess.MultiProcessCollector(None, str(folder))

    def collect(self) -> Iterator[object]:
        indexes = worker_indexes(self.folder)
        for metric in self.collector.collect():
            samples = []
            for sample in metric.samples:
                if "pid" in sample.labels:
                    labels = dict(sample.labels)
                    index = indexes.get(labels.pop("pid"))
                    if index is None:
                        continue
                    sample = sample._replace(labels={**labels, "worker": index})
                samples.append(sample)
            metric.samples = samples
            yield metric


def exposition() -> tuple[bytes, str]:
    """The text every worker would answer on /metrics: all workers' samples merged."""
    folder = multiprocess_dir()
    if folder is None:
        from prometheus_client import REGISTRY

        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    registry.register(_ByWorkerIndex(folder))
    return generate_latest(registry), CONTENT_TYPE_LATEST
