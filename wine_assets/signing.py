"""Ed25519 signatures on a bundle's manifest: who released a model, checked before it is read.

A manifest lists every file of a bundle with its sha256, so one signature over the manifest's
bytes covers the whole bundle. The registry signs each version it publishes and refuses to read,
import or serve a bundle whose ``manifest.sig`` is missing or not made by a trusted key.

Keys (README "Security"):

* The private key that signs: the PEM text in ``WINE_ASSETS_SIGNING_KEY`` (CI's secret), else the
  PEM file named by ``WINE_ASSETS_SIGNING_KEY_FILE``, else ``~/.config/wine-assets/signing-key.pem``
  (``$XDG_CONFIG_HOME`` if set), created on the first publish when none of these exists.
* The public keys that readers trust: ``registry.trusted_keys`` in params.yaml, the ones in
  ``WINE_ASSETS_TRUSTED_KEYS`` (separated by commas or spaces), and the signing key's own.

Keys are written ``ed25519:<base64 of the 32 raw bytes>``, the form ``wine-assets keys`` prints.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNING_KEY_ENV = "WINE_ASSETS_SIGNING_KEY"
SIGNING_KEY_FILE_ENV = "WINE_ASSETS_SIGNING_KEY_FILE"
TRUSTED_KEYS_ENV = "WINE_ASSETS_TRUSTED_KEYS"
SIGNATURE_FILE = "manifest.sig"
ALGORITHM = "ed25519"
_PUBLIC_KEY = re.compile(r"^ed25519:([A-Za-z0-9+/]{43}=)$")
MAX_SIGNATURE_BYTES = 4096

log = logging.getLogger(__name__)


class SigningError(Exception):
    """A key or signature that cannot be used; the message says what to do."""


def default_key_file() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "wine-assets" / "signing-key.pem"


def public_key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``ed25519:<base64>`` for a key (a private key gives its public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{ALGORITHM}:{base64.b64encode(raw).decode('ascii')}"


def key_id(public_text: str) -> str:
    """A short name for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_text.encode("ascii")).hexdigest()[:16]


def parse_public_key(text: str, where: str) -> Ed25519PublicKey:
    match = _PUBLIC_KEY.match(text.strip())
    if not match:
        raise SigningError(
            f"{where}: {text!r} is not a public key; write ed25519:<base64>, as `wine-assets keys public` prints"
        )
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(match.group(1)))


def new_private_key_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private_key(path: Path, pem: bytes) -> None:
    """Write a new key file readable by its owner only; an existing file is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise SigningError(f"{path} exists: refusing to replace a signing key (remove it first)") from None
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


def private_key_from_pem(pem: bytes, where: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{where} is not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(
            f"{where} holds a {type(key).__name__}, not an Ed25519 key; make one with `wine-assets keys new`"
        )
    return key


def signing_key(*, create: bool = False) -> Ed25519PrivateKey | None:
    """The configured private key (see the module docstring), or None when there is none.

    With ``create``, a missing default key file is created (and said so in the log).
    """
    text = os.environ.get(SIGNING_KEY_ENV, "").strip()
    if text:
        return private_key_from_pem(text.encode("ascii", errors="replace"), f"${SIGNING_KEY_ENV}")
    named = os.environ.get(SIGNING_KEY_FILE_ENV, "").strip()
    path = Path(named).expanduser() if named else default_key_file()
    try:
        return private_key_from_pem(path.read_bytes(), str(path))
    except FileNotFoundError:
        if named:
            raise SigningError(
                f"{path} (${SIGNING_KEY_FILE_ENV}) does not exist; make a key with `wine-assets keys new`"
            ) from None
    if not create:
        return None
    write_private_key(path, new_private_key_pem())
    key = private_key_from_pem(path.read_bytes(), str(path))
    log.warning(
        "created the signing key %s (public key %s): trust it elsewhere with registry.trusted_keys",
        path,
        public_key_text(key),
    )
    return key


def sign(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    """The contents of ``manifest.sig`` for these manifest bytes."""
    public = public_key_text(key)
    record = {
        "algorithm": ALGORITHM,
        "key": public,
        "key_id": key_id(public),
        "signature": base64.b64encode(key.sign(manifest)).decode("ascii"),
    }
    return (json.dumps(record, indent=2) + "\n").encode("ascii")


@dataclass(frozen=True)
class Trust:
    """The public keys whose signatures a reader accepts, by key id."""

    keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def from_config(cls, configured: Iterable[str] = ()) -> Trust:
        """params' ``registry.trusted_keys``, ``$WINE_ASSETS_TRUSTED_KEYS`` and the signing key's own."""
        keys: dict[str, Ed25519PublicKey] = {}
        for text in configured:
            keys[key_id(text.strip())] = parse_public_key(text, "registry.trusted_keys")
        for text in re.split(r"[\s,]+", os.environ.get(TRUSTED_KEYS_ENV, "").strip()):
            if text:
                keys[key_id(text)] = parse_public_key(text, f"${TRUSTED_KEYS_ENV}")
        own = signing_key()
        if own is not None:
            keys[key_id(public_key_text(own))] = own.public_key()
        return cls(keys)

    def including(self, key: Ed25519PrivateKey) -> Trust:
        """This trust plus a signing key's public half (a publisher trusts what it signs)."""
        return Trust({**self.keys, key_id(public_key_text(key)): key.public_key()})

    def verify(self, manifest: bytes, signature: bytes | None, where: str) -> str:
        """Check ``signature`` (a manifest.sig's bytes) over ``manifest``; the signer's key id.

        ``where`` names the bundle in every message.
        """
        if signature is None:
            raise SigningError(
                f"{where} has no {SIGNATURE_FILE}: an unsigned bundle is refused "
                "(a bundle from before signing cannot be signed afterwards: train and release it again, "
                "into an empty registry folder if production itself is unsigned)"
            )
        try:
            record = json.loads(signature.decode("ascii"))
            algorithm, signer, raw = (
                record["algorithm"],
                record["key_id"],
                base64.b64decode(record["signature"], validate=True),
            )
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
            raise SigningError(
                f"{where}/{SIGNATURE_FILE} is not a signature record ({type(exc).__name__}): refused"
            ) from exc
        if algorithm != ALGORITHM:
            raise SigningError(f"{where}/{SIGNATURE_FILE} uses {algorithm!r}, not {ALGORITHM}: refused")
        public = self.keys.get(signer) if isinstance(signer, str) else None
        if public is None:
            raise SigningError(
                f"{where} is signed by key {signer}, which is not trusted here: add its public key to "
                f"registry.trusted_keys or ${TRUSTED_KEYS_ENV} if you trust who made it"
            )
        try:
            public.verify(raw, manifest)
        except InvalidSignature:
            raise SigningError(
                f"{where}: the signature of key {signer} does not match manifest.json: "
                "the bundle was changed after signing"
            ) from None
        return signer
