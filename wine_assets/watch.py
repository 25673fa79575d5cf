"""Watching for new data: which CSV files to look at, and which ones are new, whole and readable.

A file counts as new when its content fingerprint (sha256, not the mtime) differs from the
last one requested for that path and from the data last trained on. It counts as whole when
two looks a moment apart see the same size and hash; a file still being written, an empty
file or one that cannot be read is skipped and looked at again on the next tick.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wine_assets.files import sha256_and_size
from wine_assets.params import Params


@dataclass(frozen=True)
class Look:
    size: int
    sha256: str


@dataclass(frozen=True)
class NewData:
    path: Path
    sha256: str


@dataclass
class ScanResult:
    new: list[NewData] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    requested: dict[str, str] = field(default_factory=dict)


def watched_files(params: Params) -> list[Path]:
    """Every ``*.csv`` in ``data.watch_dir`` when it is set, else the CSV ``data.source``, else none."""
    if params.watch_dir is not None:
        if not params.watch_dir.is_dir():
            return []
        return sorted(path for path in params.watch_dir.glob("*.csv"))
    source = params.data_source_path
    return [] if source is None else [source]


def look(path: Path) -> Look:
    """Size and sha256 of a file's bytes; OSError when it cannot be read."""
    sha256, size = sha256_and_size(path)
    return Look(size, sha256)


def _look_all(paths: Iterable[Path]) -> dict[Path, Look | str]:
    looks: dict[Path, Look | str] = {}
    for path in paths:
        try:
            looks[path] = look(path)
        except OSError as exc:
            looks[path] = f"{path} cannot be read ({exc.strerror or exc}); will look again"
    return looks


def scan(
    paths: Sequence[Path],
    requested: dict[str, str],
    settle_seconds: float,
    already_trained: str | None = None,
) -> ScanResult:
    """Find files whose content is new, looking twice ``settle_seconds`` apart.

    ``requested`` maps a path to the fingerprint last requested for it (the sensor's cursor);
    ``already_trained`` is the fingerprint of the data the latest model was trained on.
    """
    result = ScanResult(requested=dict(requested))
    if not paths:
        return result
    first = _look_all(paths)
    if settle_seconds > 0:
        time.sleep(settle_seconds)
    second = _look_all(paths)
    for path in paths:
        before, after = first[path], second[path]
        if isinstance(after, str) or isinstance(before, str):
            result.skipped.append(after if isinstance(after, str) else before)  # type: ignore[arg-type]
            continue
        if before != after:
            result.skipped.append(
                f"{path} is still being written ({before.size} -> {after.size} bytes); will look again"
            )
            continue
        if after.size == 0:
            result.skipped.append(f"{path} is empty; will look again")
            continue
        key = str(path)
        if requested.get(key) == after.sha256 or after.sha256 == already_trained:
            continue
        result.new.append(NewData(path, after.sha256))
        result.requested[key] = after.sha256
    return result


def encode_cursor(requested: dict[str, str]) -> str:
    return json.dumps({"requested": requested}, sort_keys=True)


def decode_cursor(cursor: str | None) -> dict[str, str]:
    """The fingerprints by path from a cursor; an empty or foreign cursor starts afresh."""
    if not cursor:
        return {}
    try:
        data = json.loads(cursor)
    except json.JSONDecodeError:
        return {}
    requested = data.get("requested") if isinstance(data, dict) else None
    if not isinstance(requested, dict):
        return {}
    return {str(key): str(value) for key, value in requested.items()}
