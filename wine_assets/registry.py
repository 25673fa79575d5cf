"""A local, versioned, checksummed model registry with a ``production`` alias.

Layout under ``paths.registry_dir``::

    wine-classifier/
        v1/  model.skops  scaler.skops  metrics.json  params.yaml  reference.csv  manifest.json  manifest.sig
        v2/  ...
        production          # one line naming the version, e.g. "v2"
        history.jsonl       # every move of the alias and change of the evaluation set, one JSON line each
        evaluation/         # the frozen, labelled evaluation set every release is judged on
            evaluation.csv  evaluation.json (its sha256, rows, where it came from, why it was set)
        reserved            # optional: numbers up to this one are taken elsewhere (``reserve``)
    .staging/               # bundles being written; never read as versions
    .lock                   # held while publishing or moving the alias

Guarantees:

* A version appears whole or not at all: its files are written and fsynced in
  ``.staging``, loaded back and checked there, then renamed into place.
* ``production`` moves by an atomic replace, after the version is in place; a
  crash at any point leaves the previous production alias as it was.
* A file lock serializes publishers, so two releases never share a number; a writer that judged a
  candidate against one production version refuses to move the alias if production moved since.
* Every alias move is appended to ``history.jsonl`` with what moved it and why.
* Nothing is read as a model before the manifest's signature is verified against a trusted key
  (``wine_assets.signing``) and every file's sha256 matches the manifest. Models are stored as
  skops, which runs no code when loaded (``wine_assets.model_format``); a pickle is refused.
* A manifest may list only the plain file names of a bundle (``BUNDLE_FILES``); no symbolic link
  inside the registry is ever followed, and a file is read no further than its listed size.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wine_assets import model_format, signing
from wine_assets.files import (
    NotAPlainFile,
    fsync_dir,
    make_private_dir,
    read_plain_file,
    sha256_bytes,
    write_bytes_atomic,
    write_bytes_durably,
)

MODEL_NAME = "wine-classifier"
PRODUCTION_ALIAS = "production"
RESERVED_FILE = "reserved"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = signing.SIGNATURE_FILE
MODEL_FILE = "model.skops"
SCALER_FILE = "scaler.skops"
METRICS_FILE = "metrics.json"
PARAMS_FILE = "params.yaml"
REFERENCE_FILE = "reference.csv"
# The only names a manifest may list: plain names, so no entry can point outside its folder.
BUNDLE_FILES = (MODEL_FILE, SCALER_FILE, METRICS_FILE, PARAMS_FILE, REFERENCE_FILE)
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists five files; anything near this is not one
MAX_FILE_BYTES = 1 << 30  # the largest bundle file read (a 10^4-tree forest is far below it)
MAX_VERSION_DIGITS = 9
HISTORY_FILE = "history.jsonl"
EVALUATION_DIR = "evaluation"
EVALUATION_DATA = "evaluation.csv"
EVALUATION_RECORD = "evaluation.json"
REQUIRED_FILES = (MODEL_FILE, SCALER_FILE)
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
_ANY = object()  # no expectation of which version production is


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says what to do."""


class ChecksumError(RegistryError):
    """A file of a published version differs from its manifest."""


class NoProductionModel(RegistryError):
    """Nothing has been released yet."""


class VersionNotFound(RegistryError):
    """The asked-for version does not exist."""


class InvalidVersion(RegistryError):
    """The text given as a version is not one (3 and v3 are)."""


class UntrustedBundle(RegistryError):
    """A bundle whose manifest is unsigned, signed by an unknown key, or whose files are unsafe."""


@dataclass(frozen=True)
class Bundle:
    """A loaded, checksum-verified release: the fitted scaler and model with their manifest."""

    version: int
    path: Path
    manifest: dict[str, Any]
    model: Any
    scaler: Any


@dataclass(frozen=True)
class PublishResult:
    version: int
    path: Path
    manifest: dict[str, Any]
    created: bool
    previous_production: int | None
    production: int | None


def tag_name(version: int) -> str:
    return f"model-v{version}"


def parse_version(text: str | int) -> int:
    """Accept ``3``, ``"3"`` or ``"v3"``; refuse anything else with a clear message."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        shown = str(text)[:40] + ("..." if len(str(text)) > 40 else "")
        match = re.fullmatch(r"v?([0-9]+)", str(text).strip())
        if not match:
            raise InvalidVersion(f"{shown!r} is not a version: use a number such as 3 or v3")
        if len(match.group(1)) > MAX_VERSION_DIGITS:
            raise InvalidVersion(f"{shown!r} is not a version: at most {MAX_VERSION_DIGITS} digits")
        value = int(match.group(1))
    if value < 1:
        raise InvalidVersion(f"'{text}' is not a version: versions start at 1")
    return value


def _parse_manifest(content: bytes, where: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(content.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ChecksumError(f"{where} is not valid JSON ({exc}): the bundle is damaged") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or any(name not in files for name in REQUIRED_FILES):
        raise ChecksumError(f"{where} does not list {', '.join(REQUIRED_FILES)}: the bundle is damaged")
    unexpected = [name for name in files if name not in BUNDLE_FILES]
    if unexpected:
        shown = ", ".join(repr(str(name)[:60]) for name in unexpected[:3])
        raise UntrustedBundle(
            f"{where} lists {shown}: a bundle holds only {', '.join(BUNDLE_FILES)} (plain names); refused"
        )
    for name, entry in files.items():
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_BYTES:
            raise ChecksumError(f"{where}: {name} has no size in bytes up to {MAX_FILE_BYTES}: the bundle is damaged")
    return manifest


def _read_in(folder: int, name: str, limit: int, where: Path) -> bytes:
    """One file of an opened bundle folder: a regular file (a link is never followed), at most ``limit`` bytes."""
    try:
        return read_plain_file(name, limit, dir_fd=folder)
    except NotAPlainFile as exc:
        raise UntrustedBundle(f"{where / name} {str(exc).removeprefix(name + ' ')}; refused") from None


@contextlib.contextmanager
def _open_folder(path: Path) -> Iterator[int]:
    """A bundle folder opened once, without following a link: every file is read relative to it."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ChecksumError(f"{path} is missing: the bundle is incomplete") from None
    except NotADirectoryError:
        raise UntrustedBundle(f"{path} is a symbolic link or not a folder; the registry never follows links") from None
    try:
        yield descriptor
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class Verified:
    """A bundle folder read once: its manifest, the exact bytes checked, and who signed it."""

    manifest: dict[str, Any]
    files: dict[str, bytes]
    manifest_bytes: bytes
    signature: bytes
    signer: str


def _signed_manifest(folder: int, path: Path, trust: signing.Trust) -> tuple[dict[str, Any], bytes, bytes, str]:
    try:
        manifest_bytes = _read_in(folder, MANIFEST_FILE, MAX_MANIFEST_BYTES, path)
    except FileNotFoundError:
        raise ChecksumError(f"{path / MANIFEST_FILE} is missing: the bundle is incomplete") from None
    try:
        signature = _read_in(folder, SIGNATURE_FILE, signing.MAX_SIGNATURE_BYTES, path)
    except FileNotFoundError:
        signature = None
    try:
        signer = trust.verify(manifest_bytes, signature, str(path))
    except signing.SigningError as exc:
        raise UntrustedBundle(str(exc)) from None
    assert signature is not None  # verify refuses a missing signature
    return _parse_manifest(manifest_bytes, path / MANIFEST_FILE), manifest_bytes, signature, signer


def read_verified(path: Path, trust: signing.Trust, only: tuple[str, ...] | None = None) -> Verified:
    """A bundle folder's signed manifest and the bytes of its files, each checked against its sha256.

    The signature is checked first, against ``trust``; then the file names; then each file, read
    no further than its listed size. The bytes returned are the bytes hashed: nothing can be
    swapped in between. ``only`` reads just those files (the signature is checked all the same).
    """
    with _open_folder(path) as folder:
        manifest, manifest_bytes, signature, signer = _signed_manifest(folder, path, trust)
        contents: dict[str, bytes] = {}
        problems = []
        for name, entry in manifest["files"].items():
            if only is not None and name not in only:
                continue
            try:
                content = read_plain_file(name, entry["bytes"], dir_fd=folder)
            except (FileNotFoundError, IsADirectoryError):
                problems.append(f"{name} is missing")
                continue
            except NotAPlainFile as exc:  # its message starts with the name: "model.skops is ..."
                problems.append(str(exc))
                continue
            if len(content) != entry["bytes"] or sha256_bytes(content) != entry.get("sha256"):
                problems.append(f"{name} does not match its sha256 in the manifest")
                continue
            contents[name] = content
    if problems:
        raise ChecksumError(
            f"{path}: {'; '.join(problems)}. The files were changed after release; refusing to load them."
        )
    return Verified(manifest, contents, manifest_bytes, signature, signer)


def verify_dir(path: Path, trust: signing.Trust) -> dict[str, Any]:
    """Check a bundle folder's signature and every file against its manifest; return the manifest."""
    return read_verified(path, trust).manifest


def load_dir(path: Path, trust: signing.Trust) -> Bundle:
    """Verify a bundle folder, then load its scaler and model from exactly the verified bytes."""
    verified = read_verified(path, trust)
    try:
        model = model_format.loads(verified.files[MODEL_FILE], "model", str(path / MODEL_FILE))
        scaler = model_format.loads(verified.files[SCALER_FILE], "scaler", str(path / SCALER_FILE))
    except model_format.ModelFormatError as exc:
        raise UntrustedBundle(str(exc)) from None
    return Bundle(
        version=int(verified.manifest["version"]),
        path=path,
        manifest=verified.manifest,
        model=model,
        scaler=scaler,
    )


def git_commit(cwd: Path) -> str | None:
    """The commit checked out at ``cwd``, or None outside a git work tree."""
    import subprocess

    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = completed.stdout.strip()
    return commit if completed.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


class ModelRegistry:
    """The registry folder of one model name; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str], name: str = MODEL_NAME, trust: signing.Trust | None = None):
        self._trust = trust
        self.root = Path(root)
        self.name = name
        self.model_dir = self.root / name
        self.staging_dir = self.root / ".staging"
        self.lock_path = self.root / ".lock"
        self.alias_path = self.model_dir / PRODUCTION_ALIAS
        self.history_path = self.model_dir / HISTORY_FILE
        self.evaluation_dir = self.model_dir / EVALUATION_DIR

    @classmethod
    def from_params(cls, params: Any) -> ModelRegistry:
        """The registry a params file names, trusting the keys it lists (``registry.trusted_keys``)."""
        return cls(params.registry_dir, trust=signing.Trust.from_config(params.registry.trusted_keys))

    @property
    def trust(self) -> signing.Trust:
        """The keys whose signatures this registry accepts (built on first use)."""
        if self._trust is None:
            try:
                self._trust = signing.Trust.from_config()
            except signing.SigningError as exc:
                raise UntrustedBundle(str(exc)) from None
        return self._trust

    # -- reading ---------------------------------------------------------------------------
    def versions(self) -> list[int]:
        """Published versions, oldest first (a folder counts once its manifest is in it)."""
        if not self.model_dir.is_dir():
            return []
        found = []
        for entry in self.model_dir.iterdir():
            match = _VERSION_DIR.match(entry.name)
            if match and not entry.is_symlink() and (entry / MANIFEST_FILE).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def version_dir(self, version: int) -> Path:
        return self.model_dir / f"v{version}"

    def production_version(self) -> int | None:
        try:
            text = read_plain_file(self.alias_path, 64).decode("ascii").strip()
        except FileNotFoundError:
            return None
        except (NotAPlainFile, UnicodeDecodeError):
            raise RegistryError(
                f"{self.alias_path} is not a one-line file naming a version (links are never followed): "
                "point production at a published version with wine-assets registry rollback"
            ) from None
        match = _VERSION_DIR.match(text)
        if not match:
            raise RegistryError(f"{self.alias_path} holds {text!r}, not a version such as v3")
        return int(match.group(1))

    def manifest(self, version: int) -> dict[str, Any]:
        """A version's manifest, read without verifying its signature or loading its files."""
        path = self.version_dir(version)
        if path.is_symlink() or not (path / MANIFEST_FILE).is_file():
            raise VersionNotFound(self._missing_message(version))
        with _open_folder(path) as folder:
            return _parse_manifest(_read_in(folder, MANIFEST_FILE, MAX_MANIFEST_BYTES, path), path / MANIFEST_FILE)

    def production_manifest(self) -> dict[str, Any] | None:
        version = self.production_version()
        return None if version is None else self.manifest(version)

    def resolve(self, version: int | str | None = None) -> int:
        """The given version, checked to exist, or the production version."""
        if version is None:
            current = self.production_version()
            if current is None:
                raise NoProductionModel(
                    f"no model in production in {self.model_dir}: run the release job first "
                    "(dagster job execute -m wine_assets -j release_job, or make release)"
                )
            if current not in self.versions():
                raise RegistryError(
                    f"{self.alias_path} names v{current}, which is not in the registry: "
                    "point production at a published version with wine-assets registry rollback"
                )
            return current
        number = parse_version(version)
        if number not in self.versions():
            raise VersionNotFound(self._missing_message(number))
        return number

    def verify(self, version: int | str | None = None) -> dict[str, Any]:
        """A version's manifest, its signature and every checksum verified."""
        return self.verified(version).manifest

    def verified(self, version: int | str | None = None) -> Verified:
        """A version read and verified: its manifest, the bytes checked, and who signed it."""
        return read_verified(self.version_dir(self.resolve(version)), self.trust)

    def read_file(self, version: int | str | None, name: str) -> bytes:
        """One file of a version, returned only if the manifest is signed by a trusted key and the
        file's sha256 matches it."""
        number = self.resolve(version)
        if name not in self.manifest(number)["files"]:
            raise RegistryError(f"v{number} has no file {name}")
        return read_verified(self.version_dir(number), self.trust, only=(name,)).files[name]

    def load(self, version: int | str | None = None) -> Bundle:
        """Load a version (production by default) after verifying its signature and every checksum."""
        return load_dir(self.version_dir(self.resolve(version)), self.trust)

    def find_same(self, files: Mapping[str, str]) -> int | None:
        """The version whose model and scaler have these sha256s, if any."""
        for version in reversed(self.versions()):
            listed = self.manifest(version).get("files", {})
            if all(listed.get(name, {}).get("sha256") == files[name] for name in REQUIRED_FILES):
                return version
        return None

    def history(self) -> list[dict[str, Any]]:
        """Every recorded alias move and evaluation-set change, oldest first."""
        try:
            lines = read_plain_file(self.history_path, MAX_FILE_BYTES).decode("utf-8").splitlines()
        except FileNotFoundError:
            return []
        except (NotAPlainFile, UnicodeDecodeError) as exc:
            raise RegistryError(f"{self.history_path} cannot be read as the history ({exc})") from None
        events = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RegistryError(f"{self.history_path} line {number} is not valid JSON ({exc})") from exc
            events.append(event)
        return events

    def evaluation_set(self) -> tuple[bytes, dict[str, Any]] | None:
        """The frozen evaluation set's CSV bytes and record, sha256 verified; None before the first release."""
        record_path = self.evaluation_dir / EVALUATION_RECORD
        if self.evaluation_dir.is_symlink():
            raise RegistryError(f"{self.evaluation_dir} is a symbolic link; the registry never follows links")
        try:
            record = json.loads(read_plain_file(record_path, MAX_MANIFEST_BYTES).decode("utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, NotAPlainFile) as exc:
            raise ChecksumError(f"{record_path} cannot be read ({exc}): the evaluation set is damaged") from exc
        data_path = self.evaluation_dir / EVALUATION_DATA
        try:
            content = read_plain_file(data_path, MAX_FILE_BYTES)
        except FileNotFoundError:
            raise ChecksumError(f"{data_path} is missing: the evaluation set is damaged") from None
        except NotAPlainFile as exc:
            raise ChecksumError(f"{exc}: the evaluation set is damaged") from None
        if not isinstance(record, dict) or sha256_bytes(content) != record.get("sha256"):
            raise ChecksumError(
                f"{data_path} does not match its sha256 in {record_path}: the evaluation set was changed by hand; "
                "set it again with wine-assets registry evaluation-set replace"
            )
        return content, record

    def _missing_message(self, version: int) -> str:
        known = ", ".join(f"v{v}" for v in self.versions()) or "none"
        return f"version v{version} is not in {self.model_dir} (published versions: {known})"

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock on the registry, held by one publisher or alias move at a time.

        Every write runs under it, so it is also where the folders a write touches are checked not
        to be symbolic links: a link inside the registry is never followed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        for path in (self.lock_path, self.staging_dir, self.model_dir, self.evaluation_dir, self.history_path):
            if path.is_symlink():
                raise RegistryError(f"{path} is a symbolic link; the registry never follows links: remove it")
        descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(descriptor, "r+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _sweep_staging(self) -> None:
        # Runs under the lock: anything in .staging is left over from a publisher that died.
        if self.staging_dir.is_dir():
            for leftover in self.staging_dir.iterdir():
                if leftover.is_symlink() or not leftover.is_dir():
                    leftover.unlink()  # a link goes, its target stays
                else:
                    shutil.rmtree(leftover, ignore_errors=True)  # never follows the links inside

    def _append_history(self, event: Mapping[str, Any]) -> None:
        # Under the lock. One line per event, fsynced: the record survives what the alias survives.
        line = json.dumps({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **event}, sort_keys=False)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(descriptor, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _write_alias(self, version: int, previous: int | None, event: Mapping[str, Any]) -> None:
        write_bytes_atomic(self.alias_path, f"v{version}\n".encode("ascii"))
        self._append_history({"action": "production", "from": previous, "to": version, **event})

    def _check_expected(self, previous: int | None, expected: int | None | object) -> None:
        if expected is not _ANY and previous != expected:
            judged = f"v{expected}" if expected else "no production model"
            now = f"v{previous}" if previous else "none"
            raise RegistryError(
                f"production moved while this candidate was judged against {judged} (it is now {now}): "
                "nothing was changed; run it again to be judged against the current production"
            )

    def set_evaluation_set(
        self, content: bytes, fields: Mapping[str, Any], *, only_if_absent: bool = False
    ) -> dict[str, Any] | None:
        """Freeze ``content`` (a labelled CSV) as the evaluation set, recorded in the history.

        With ``only_if_absent`` (seeding at the first release) an existing set is kept: None.
        """
        with self.lock():
            if only_if_absent and (self.evaluation_dir / EVALUATION_RECORD).is_file():
                return None
            previous = None
            with contextlib.suppress(RegistryError, OSError):
                found = self.evaluation_set()
                previous = found[1].get("sha256") if found else None
            record = {
                **fields,
                "sha256": sha256_bytes(content),
                "bytes": len(content),
                "set_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            self.evaluation_dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.evaluation_dir / EVALUATION_DATA, content)
            write_bytes_atomic(self.evaluation_dir / EVALUATION_RECORD, (json.dumps(record, indent=2) + "\n").encode())
            self._append_history({"action": "evaluation-set", "previous_sha256": previous, **record})
            return record

    def _production_before_write(self) -> int | None:
        # A damaged alias must not block the write that repairs it: treat it as "no production".
        try:
            return self.production_version()
        except (RegistryError, OSError, UnicodeDecodeError):
            return None

    def set_production(
        self,
        version: int | str,
        event: Mapping[str, Any] | None = None,
        expected_production: int | None | object = _ANY,
    ) -> tuple[int | None, int]:
        """Verify a version's checksums, then point ``production`` at it; (previous, new).

        ``event`` is recorded in the history (what moved it, why, the verdict); with
        ``expected_production`` the move is refused if production is no longer that version.
        """
        with self.lock():
            number = self.resolve(version)
            verify_dir(self.version_dir(number), self.trust)
            previous = self._production_before_write()
            self._check_expected(previous, expected_production)
            if previous != number:
                self._write_alias(number, previous, {"by": "set_production", **(event or {})})
            return previous, number

    def publish(
        self,
        files: Mapping[str, bytes],
        manifest_fields: Mapping[str, Any],
        check: Callable[[Bundle], None] | None = None,
        set_production: bool = True,
        expected_production: int | None | object = _ANY,
        event: Mapping[str, Any] | None = None,
    ) -> PublishResult:
        """Publish a bundle as the next version and (by default) make it production.

        ``files`` maps file names to their bytes and must hold model.joblib and scaler.joblib.
        ``check`` receives the bundle loaded back from disk (checksums verified) before the
        version becomes visible; an exception from it discards the bundle and is re-raised.
        The same model and scaler bytes as an existing version make no new version.
        ``expected_production`` and ``event`` are as for ``set_production``.
        """
        missing = [name for name in REQUIRED_FILES if name not in files]
        if missing:
            raise RegistryError(f"a bundle needs {', '.join(missing)}")
        unexpected = [name for name in files if name not in BUNDLE_FILES]
        if unexpected:
            raise RegistryError(f"a bundle holds only {', '.join(BUNDLE_FILES)}, not {', '.join(unexpected)}")
        try:
            key = signing.signing_key(create=True)
        except signing.SigningError as exc:
            raise RegistryError(f"cannot sign the new version: {exc}") from None
        assert key is not None  # created when missing
        trust = self.trust.including(key)
        digests = {name: sha256_bytes(content) for name, content in files.items()}
        with self.lock():
            self._sweep_staging()
            previous = self._production_before_write()
            self._check_expected(previous, expected_production)
            existing = self.find_same(digests)
            if existing is not None:
                manifest = verify_dir(self.version_dir(existing), trust)
                if set_production and previous != existing:
                    self._write_alias(
                        existing, previous, {"by": "publish (the same files as this version)", **(event or {})}
                    )
                return PublishResult(
                    existing,
                    self.version_dir(existing),
                    manifest,
                    False,
                    previous,
                    existing if set_production else previous,
                )
            version = self._next_version()
            manifest = {
                "name": self.name,
                "version": version,
                "tag": tag_name(version),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **manifest_fields,
                "files": {name: {"sha256": digests[name], "bytes": len(content)} for name, content in files.items()},
            }
            manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode()
            contents = {**files, MANIFEST_FILE: manifest_bytes, SIGNATURE_FILE: signing.sign(manifest_bytes, key)}
            final = self._stage_and_rename(version, contents, check, trust)
            if set_production:
                self._write_alias(version, previous, {"by": "publish", **(event or {})})
            return PublishResult(version, final, manifest, True, previous, version if set_production else previous)

    def _stage_and_rename(
        self,
        version: int,
        contents: Mapping[str, bytes],
        check: Callable[[Bundle], None] | None,
        trust: signing.Trust,
    ) -> Path:
        """Write a bundle into .staging, fsync, verify its checksums (and, given ``check``, load it
        back and run the check), then rename it into place as v<version>. On any failure the
        staged bundle is removed."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        staged = make_private_dir(self.staging_dir, prefix=f"v{version}-")
        final = self.version_dir(version)
        try:
            for name, content in contents.items():
                write_bytes_durably(staged / name, content)
            fsync_dir(staged)
            if check is not None:
                check(load_dir(staged, trust))
            else:
                verify_dir(staged, trust)
            self.model_dir.mkdir(parents=True, exist_ok=True)
            os.rename(staged, final)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        fsync_dir(self.model_dir)
        return final

    def import_dir(
        self,
        source: Path,
        set_production: bool = False,
        expected_production: int | None | object = _ANY,
        event: Mapping[str, Any] | None = None,
    ) -> tuple[int, bool]:
        """Add a bundle folder (from ``export``) under the version its manifest names; (version, added).

        Its signature (by a trusted key) and checksums are verified first, and exactly the bytes
        verified are copied. A version already present with the same files is left alone; one with
        different files is refused. ``expected_production`` and ``event`` are as for ``set_production``.
        """
        verified = read_verified(source, self.trust)
        manifest = verified.manifest
        version = parse_version(manifest.get("version", 0))
        with self.lock():
            self._sweep_staging()
            previous = self._production_before_write()
            if set_production:
                self._check_expected(previous, expected_production)
            final = self.version_dir(version)
            added = False
            if final.exists():
                present = self.manifest(version).get("files", {})
                if present != manifest["files"]:
                    raise RegistryError(f"{final} already holds a different v{version}; refusing to overwrite it")
            else:
                contents = {
                    **verified.files,
                    MANIFEST_FILE: verified.manifest_bytes,
                    SIGNATURE_FILE: verified.signature,
                }
                self._stage_and_rename(version, contents, None, self.trust)
                added = True
            if set_production and previous != version:
                self._write_alias(version, previous, {"by": "import", **(event or {})})
            return version, added

    def export(self, version: int | str | None, output: Path) -> int:
        """Write a version as a .tar.gz holding ``wine-classifier-v<N>/`` (checksums verified first)."""
        import gzip
        import tarfile

        number = self.resolve(version)
        verified = read_verified(self.version_dir(number), self.trust)
        contents = {**verified.files, MANIFEST_FILE: verified.manifest_bytes, SIGNATURE_FILE: verified.signature}
        buffer = io.BytesIO()
        # Fixed mtimes, owners and order: the same version always gives the same archive bytes.
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed:
            with tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive:
                for name, content in sorted(contents.items()):
                    info = tarfile.TarInfo(f"{self.name}-v{number}/{name}")
                    info.size, info.mode, info.mtime = len(content), 0o644, 0
                    archive.addfile(info, io.BytesIO(content))
        write_bytes_atomic(output, buffer.getvalue())
        return number

    def reserved_through(self) -> int:
        """The highest number taken elsewhere (``reserve``), or 0."""
        path = self.model_dir / RESERVED_FILE
        try:
            text = read_plain_file(path, 64).decode("ascii", errors="replace").strip()
        except FileNotFoundError:
            return 0
        except NotAPlainFile as exc:
            raise RegistryError(f"{exc}; write a version number into a plain file") from None
        try:
            return parse_version(text)
        except InvalidVersion as exc:
            raise RegistryError(f"{path} holds {text!r}, not a version number; write one such as 7") from exc

    def sign(self, version: int | str) -> tuple[str, str]:
        """Sign a version again with the current signing key (key rotation); (old key id, new key id).

        Its present signature must be by a trusted key and its files must match: re-signing
        never launders a bundle this registry would refuse. Recorded in the history.
        """
        key = signing.signing_key()
        if key is None:
            raise RegistryError(
                f"no signing key: set ${signing.SIGNING_KEY_FILE_ENV} or ${signing.SIGNING_KEY_ENV} "
                "(make one with wine-assets keys new)"
            )
        with self.lock():
            number = self.resolve(version)
            folder = self.version_dir(number)
            verified = read_verified(folder, self.trust)
            new = signing.key_id(signing.public_key_text(key))
            if verified.signer != new:
                write_bytes_atomic(folder / SIGNATURE_FILE, signing.sign(verified.manifest_bytes, key))
                self._append_history({"action": "sign", "version": number, "from_key": verified.signer, "to_key": new})
            return verified.signer, new

    def reserve(self, through: int | str) -> tuple[int, int]:
        """Mark the numbers up to ``through`` as taken, so the next publish gets a higher one.

        For numbers used outside this folder, e.g. release tags that hold no bundle. Never
        lowers an earlier reservation. Returns (the reservation, the next version number).
        """
        number = parse_version(through)
        with self.lock():
            current = self.reserved_through()
            if number > current:
                self.model_dir.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(self.model_dir / RESERVED_FILE, f"{number}\n".encode("ascii"))
                current = number
            return current, self._next_version()

    def _next_version(self) -> int:
        # Any v<N> folder counts, even one without a manifest, so a number is never reused.
        numbers = [self.reserved_through()]
        if self.model_dir.is_dir():
            for entry in self.model_dir.iterdir():
                match = _VERSION_DIR.match(entry.name)
                if match:
                    numbers.append(int(match.group(1)))
        return max(numbers) + 1


def extract_bundle(archive: Path, into: Path) -> Path:
    """Unpack an exported bundle safely (plain files in one folder only); return that folder."""
    import tarfile

    try:
        bundle = tarfile.open(archive, mode="r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise RegistryError(f"{archive} is not a .tar.gz bundle: {exc}") from exc
    with bundle:
        members = bundle.getmembers()
        folders = {Path(member.name).parts[0] for member in members if member.name}
        allowed = {*BUNDLE_FILES, MANIFEST_FILE, SIGNATURE_FILE}
        for member in members:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 2 or member.name.startswith("/") or ".." in parts:
                raise RegistryError(
                    f"{archive}: unexpected entry {member.name!r}; a bundle holds plain files in one folder"
                )
            if parts[1] not in allowed or member.size > MAX_FILE_BYTES:
                raise RegistryError(
                    f"{archive}: unexpected entry {member.name!r}; a bundle holds only {', '.join(sorted(allowed))}"
                )
        if len(folders) != 1:
            raise RegistryError(f"{archive}: expected one bundle folder, found {len(folders)}")
        folder = into / folders.pop()
        folder.mkdir(parents=True)
        for member in members:
            handle = bundle.extractfile(member)
            assert handle is not None  # plain files only, checked above
            with handle, open(folder / Path(member.name).name, "xb") as target:
                shutil.copyfileobj(handle, target)  # in chunks: a large member is never held in memory
    return folder
