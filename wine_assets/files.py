"""Small file helpers shared by the stages: hashing, durable and atomic writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    current = os.umask(0)
    os.umask(current)
    return current


FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def sha256_bytes(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def sha256_and_size(path: str | os.PathLike[str]) -> tuple[str, int]:
    """sha256 and length of one read of a file's bytes."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: str | os.PathLike[str]) -> str:
    return sha256_and_size(path)[0]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in this folder durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(parent: Path, prefix: str) -> Path:
    """A new temporary folder in ``parent`` with the usual permissions (mkdtemp makes it 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, DIR_MODE)
    return folder


def write_bytes_durably(path: Path, content: bytes) -> None:
    """Write a new file and fsync it (no rename: for files inside a folder that is renamed later)."""
    with open(path, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


def write_bytes_atomic(path: str | os.PathLike[str], content: bytes) -> None:
    """Write to a temporary file beside the target, fsync, then rename over it.

    A reader sees the old file or the new one, never a half-written one. The file gets the
    permissions a plain ``open`` would give it (mkstemp alone would make it owner-only).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fchmod(handle.fileno(), FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_bytes_atomic(path, json_text(data).encode("utf-8"))


class NotAPlainFile(OSError):
    """A path that is a symbolic link, not a regular file, or larger than allowed."""


def read_plain_file(path: str | os.PathLike[str], limit: int, *, dir_fd: int | None = None) -> bytes:
    """A regular file's bytes, refusing a symbolic link (never followed), a device, a fifo or a
    folder, and any file larger than ``limit`` bytes (read no further than that)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotAPlainFile(f"{path} is a symbolic link, which is never followed here") from None
        raise
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise NotAPlainFile(f"{path} is not a regular file")
        content = handle.read(limit + 1)
    if len(content) > limit:
        raise NotAPlainFile(f"{path} is larger than {limit} bytes")
    return content
