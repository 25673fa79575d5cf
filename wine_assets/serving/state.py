"""The models one worker serves, the production alias watcher, and the A/B routing.

Each worker reads the registry's ``production`` alias every ``reload_interval_seconds``.
When it names another version, that version is loaded in the background thread (signature
and sha256 verified before loading, predictions compared with scikit-learn's, warmed) and then
swapped in by one assignment: a request takes the model once when it starts, so requests
in flight finish on the version they started with. A version that fails is not served:
the previous one keeps serving, the failure is counted, and the load is retried after
``retry_seconds`` or as soon as the alias moves again.

Routing is sticky and the same in every worker: the SHA-256 of ``"<experiment>:<key>"``
(not Python's ``hash``, which is salted per process) read as a fraction of 2**64, below
``candidate_weight`` goes to the candidate.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from wine_assets.params import ServingParams
from wine_assets.registry import ModelRegistry, RegistryError, VersionNotFound, parse_version
from wine_assets.serving import forest, metrics
from wine_assets.serving.forest import ServedModel
from wine_assets.signing import Trust

logger = logging.getLogger(__name__)

PRODUCTION = "production"
CANDIDATE = "candidate"
PINNED = "pinned"
LOAD_WINDOW_SECONDS = 60.0  # serving.pinned_loads_per_minute counts the loads of the last minute


def route_fraction(experiment: str, key: str) -> float:
    """A stable number in [0, 1) for this experiment and routing key, equal in every process."""
    digest = hashlib.sha256(f"{experiment}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(experiment: str | None, weight: float, key: str) -> str:
    """``candidate`` for a ``weight`` share of keys, ``production`` for the rest."""
    if experiment is None or weight <= 0:
        return PRODUCTION
    return CANDIDATE if route_fraction(experiment, key) < weight else PRODUCTION


class TooManyLoads(Exception):
    """A pinned version is not loaded, and this worker has used its loads of the minute."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class LoadFailure:
    version: int | None
    message: str
    at: float


class ServingState:
    """What one worker serves. ``start`` begins watching; ``stop`` ends it."""

    def __init__(
        self,
        registry_dir: Path,
        settings: ServingParams,
        retry_seconds: float | None = None,
        trust: Trust | None = None,
    ):
        self.registry = ModelRegistry(registry_dir, trust=trust)
        self.settings = settings
        self.interval = settings.reload_interval_seconds
        self.retry_seconds = retry_seconds if retry_seconds is not None else max(5 * self.interval, 10.0)
        self.production: ServedModel | None = None
        self.candidate: ServedModel | None = None
        self.last_failure: LoadFailure | None = None
        self.candidate_failure: LoadFailure | None = None
        self._failed: tuple[int | None, float] | None = None
        self._pinned: OrderedDict[int, ServedModel] = OrderedDict()
        self._pinned_lock = threading.Lock()  # the cache, held only to look up and insert
        self._load_lock = threading.Lock()  # one pinned load at a time per worker
        self._loads: deque[float] = deque()  # when the loads of the last LOAD_WINDOW_SECONDS started
        self._pinned_failures: dict[int, LoadFailure] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- readiness ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.production is not None

    @property
    def experiment(self) -> str | None:
        return self.settings.experiment

    # -- the watcher -------------------------------------------------------------------------
    def start(self) -> None:
        metrics.forget_dead_workers()
        metrics.MODEL_LOADED.set(0)
        self._thread = threading.Thread(target=self._watch, name="production-alias-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # the watcher must outlive any one bad poll
                logger.exception("polling the production alias failed")
            self._stop.wait(self.interval)

    def poll_once(self) -> None:
        """Load the version the alias names if it is not the one served (and the candidate, once)."""
        self._poll_production()
        if self.settings.candidate_version is not None and self.candidate is None:
            self._poll_candidate()

    def _poll_production(self) -> None:
        try:
            wanted = self.registry.production_version()
        except (RegistryError, OSError, UnicodeDecodeError) as exc:
            self._fail(PRODUCTION, None, f"the production alias cannot be read: {exc}")
            return
        if wanted is None or (self.production is not None and self.production.version == wanted):
            return
        if self._failed is not None and self._failed[0] == wanted and time.monotonic() < self._failed[1]:
            return
        try:
            served = forest.load(self.registry, wanted)
        except Exception as exc:  # whatever a bad bundle raises (loading, another library version), it is not served
            self._failed = (wanted, time.monotonic() + self.retry_seconds)
            self._fail(PRODUCTION, wanted, str(exc))
            return
        previous = self.production
        self.production = served  # the swap: one assignment
        self._failed = None
        metrics.RELOADS.labels(PRODUCTION, "success").inc()
        metrics.RELOAD_SECONDS.observe(served.load_seconds)
        metrics.MODEL_VERSION.labels(PRODUCTION).set(served.version)
        metrics.MODEL_LOADED.set(1)
        logger.info(
            "serving v%d (was %s), loaded, verified and warmed in %.2f s",
            served.version,
            f"v{previous.version}" if previous else "nothing",
            served.load_seconds,
        )

    def _poll_candidate(self) -> None:
        version = self.settings.candidate_version
        failure = self.candidate_failure
        if failure is not None and time.monotonic() < failure.at + self.retry_seconds:
            return
        try:
            self.candidate = forest.load(self.registry, version)
        except Exception as exc:
            self.candidate_failure = LoadFailure(version, str(exc), time.monotonic())
            metrics.RELOADS.labels(CANDIDATE, "failure").inc()
            logger.error("candidate v%s is not served: %s", version, exc)
            return
        metrics.RELOADS.labels(CANDIDATE, "success").inc()
        metrics.MODEL_VERSION.labels(CANDIDATE).set(self.candidate.version)

    def _fail(self, role: str, version: int | None, message: str) -> None:
        self.last_failure = LoadFailure(version, message, time.monotonic())
        metrics.RELOADS.labels(role, "failure").inc()
        serving = f"v{self.production.version} keeps serving" if self.production else "nothing is served"
        logger.error("v%s is not served (%s): %s", version, serving, message)

    # -- choosing a model for a request ------------------------------------------------------
    def choose(self, routing_key: str) -> tuple[ServedModel, str, ServedModel | None]:
        """(the model that answers, its variant, a shadow model that also scores or None)."""
        production, candidate = self.production, self.candidate
        assert production is not None, "choose() is called only when ready"
        if candidate is None or self.experiment is None:
            return production, PRODUCTION, None
        if self.settings.candidate_mode == "shadow":
            return production, PRODUCTION, candidate
        if assign(self.experiment, self.settings.candidate_weight, routing_key) == CANDIDATE:
            return candidate, CANDIDATE, None
        return production, PRODUCTION, None

    def pinned(self, version_text: str) -> ServedModel:
        """A version asked for by number in the URL: loaded once (verified), kept in an LRU cache of
        ``pinned_cache_size`` versions.

        A load costs about a tenth of a second of CPU (verify, load, warm), so a client
        cycling through more versions than the cache holds would make every request one. Loads are
        therefore serialized (concurrent requests for a version load it once; requests for cached
        versions never wait for a load) and limited to ``pinned_loads_per_minute`` per worker:
        beyond, ``TooManyLoads`` (429 with Retry-After). A version not in the registry is refused
        before any of that, and one that failed is not tried again for ``retry_seconds``.
        """
        number = parse_version(version_text)  # InvalidVersion for text that is not a version
        for model in (self.production, self.candidate):
            if model is not None and model.version == number:
                return model
        cached = self._cached(number)
        if cached is not None:
            return cached
        with self._load_lock:
            cached = self._cached(number)  # loaded by the request this one waited for
            if cached is not None:
                return cached
            failed = self._pinned_failures.get(number)
            if failed is not None and time.monotonic() < failed.at + self.retry_seconds:
                raise RegistryError(failed.message)
            if number not in self.registry.versions():
                raise VersionNotFound(f"version v{number} is not in the registry")
            self._take_a_load(number)
            try:
                served = forest.load(self.registry, number)
            except Exception as exc:
                self._pinned_failures[number] = LoadFailure(number, str(exc), time.monotonic())
                raise
            self._pinned_failures.pop(number, None)
            with self._pinned_lock:
                self._pinned[number] = served
                while len(self._pinned) > self.settings.pinned_cache_size:
                    self._pinned.popitem(last=False)
            return served

    def _cached(self, number: int) -> ServedModel | None:
        with self._pinned_lock:
            cached = self._pinned.get(number)
            if cached is not None:
                self._pinned.move_to_end(number)
            return cached

    def _take_a_load(self, number: int) -> None:
        """Count a load against the minute's budget, or raise TooManyLoads (called under _load_lock)."""
        now = time.monotonic()
        while self._loads and self._loads[0] <= now - LOAD_WINDOW_SECONDS:
            self._loads.popleft()
        budget = self.settings.pinned_loads_per_minute
        if len(self._loads) >= budget:
            wait = max(1, math.ceil(self._loads[0] + LOAD_WINDOW_SECONDS - now))
            raise TooManyLoads(
                f"version v{number} is not loaded, and this worker has loaded {budget} pinned versions in the last "
                f"minute (serving.pinned_loads_per_minute); the {self.settings.pinned_cache_size} most recently "
                f"used stay loaded (serving.pinned_cache_size): try again in {wait} s",
                wait,
            )
        self._loads.append(now)
