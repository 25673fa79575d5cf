"""Who may call what, and under which host name: bearer tokens and the Host allow-list.

Tokens: ``serving.tokens`` in params (and ``WINE_ASSETS_SERVING_TOKENS`` for deployments) hold
each token's name, its SHA-256 and its scopes, never the token. A request shows the token as
``Authorization: Bearer <token>``; its SHA-256 is compared with every configured hash by
``hmac.compare_digest``. Writes (``POST /feedback``: scope ``feedback``) always need one; the
scoring endpoints need one (scope ``predict``) only with ``serving.require_auth_for_predictions``.
No or an unknown token: 401 with ``WWW-Authenticate: Bearer``; a known token without the scope:
403; no token configured with the scope at all: 403 saying how to configure one.

Hosts: Starlette's ``TrustedHostMiddleware`` decides which ``Host`` headers are served (a page
on another site that re-points its own name at 127.0.0.1, DNS rebinding, sends its own name);
a refusal is answered with the project's JSON error body (400).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import Response

from wine_assets.params import TOKEN_SCOPES, ServingParams, ServingToken
from wine_assets.serving.inputs import RequestError

TOKENS_ENV = "WINE_ASSETS_SERVING_TOKENS"
MAX_TOKEN_CHARS = 512  # token_urlsafe(32) is 43; anything far longer is not a token of ours
REALM = 'Bearer realm="wine-assets"'
HOW_TO_CONFIGURE = (
    "make one with `wine-assets serving token new --name NAME` and add the line it prints to serving.tokens "
    f"in params.yaml (or to {TOKENS_ENV})"
)
_ANY_ADDRESS = ("0.0.0.0", "::", "")  # a bind address, never a name a client sends
_HOST_OK = "wine_assets.host_allowed"


class TokenConfigError(ValueError):
    """The configured tokens cannot be used; the message names the source and the entry."""


def new_token() -> str:
    """A fresh random token: 32 bytes from the OS's generator, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def params_entry(name: str, token: str, scopes: Sequence[str]) -> str:
    """The serving.tokens entry for ``token``, as one YAML line (its hash, not the token)."""
    return f"- {{name: {name}, sha256: {hash_token(token)}, scopes: [{', '.join(scopes)}]}}"


def tokens_from_environment(environ: Mapping[str, str] | None = None) -> list[ServingToken]:
    """The tokens in ``WINE_ASSETS_SERVING_TOKENS``: a YAML or JSON list shaped as serving.tokens."""
    text = (os.environ if environ is None else environ).get(TOKENS_ENV, "")
    if not text.strip():
        return []
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TokenConfigError(f"{TOKENS_ENV} is not YAML or JSON: {exc}".splitlines()[0]) from None
    try:
        return TypeAdapter(list[ServingToken]).validate_python(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'the value'}: {error['msg']}"
            for error in exc.errors()[:5]
        )
        raise TokenConfigError(
            f"{TOKENS_ENV} must be a list of {{name, sha256, scopes}} as serving.tokens takes: {problems}"
        ) from None


@dataclass(frozen=True)
class Caller:
    """The holder of a token that was shown: its name (recorded with its labels) and its scopes."""

    name: str
    scopes: frozenset[str]


class Tokens:
    """The configured tokens, as hashes: ``authorize`` answers who is calling, or raises 401/403."""

    def __init__(self, tokens: Sequence[ServingToken]):
        names = [token.name for token in tokens]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise TokenConfigError(
                f"token name(s) {', '.join(repeated)} are in both serving.tokens and {TOKENS_ENV}: name each once"
            )
        self._tokens = [(bytes.fromhex(token.sha256), Caller(token.name, frozenset(token.scopes))) for token in tokens]

    @classmethod
    def from_settings(cls, settings: ServingParams, environ: Mapping[str, str] | None = None) -> Tokens:
        return cls([*settings.tokens, *tokens_from_environment(environ)])

    def holders(self, scope: str) -> list[str]:
        return [caller.name for _, caller in self._tokens if scope in caller.scopes]

    def authorize(self, authorization: str | None, scope: str) -> Caller:
        assert scope in TOKEN_SCOPES
        if not self.holders(scope):
            raise RequestError(
                403,
                "PERMISSION_DENIED",
                f"no token with the scope {scope!r} is configured, so this server accepts none: {HOW_TO_CONFIGURE}",
                reason="unauthorized",
            )
        presented = _bearer(authorization)
        if presented is None:
            raise RequestError(
                401,
                "UNAUTHENTICATED",
                f"this endpoint needs a token with the scope {scope!r}: send 'Authorization: Bearer <token>'",
                reason="unauthorized",
                headers={"WWW-Authenticate": REALM},
            )
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found: Caller | None = None
        for stored, caller in self._tokens:  # every hash is compared: the time does not say which matched
            if hmac.compare_digest(stored, digest):
                found = caller
        if found is None:
            raise RequestError(
                401,
                "UNAUTHENTICATED",
                "the bearer token is not one this server knows (revoked, mistyped, or from another server)",
                reason="unauthorized",
                headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
            )
        if scope not in found.scopes:
            raise RequestError(
                403,
                "PERMISSION_DENIED",
                f"the token {found.name!r} does not have the scope {scope!r} (it has: "
                f"{', '.join(sorted(found.scopes))}); add the scope to its serving.tokens entry",
                reason="unauthorized",
                headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{scope}"'},
            )
        return found


def _bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case, RFC 7235)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS or not token.isascii():
        return None
    return token


# -- the Host header ---------------------------------------------------------------------------
def allowed_hosts(settings: ServingParams) -> list[str]:
    """``serving.allowed_hosts``, or by default the bind host (unless a wildcard address), localhost, 127.0.0.1."""
    if settings.allowed_hosts is not None:
        return list(settings.allowed_hosts)
    bound = settings.host if settings.host not in _ANY_ADDRESS else None
    if bound is not None and ":" in bound and not bound.startswith("["):
        bound = f"[{bound}]"  # an IPv6 address, as a Host header writes it
    return list(dict.fromkeys(name for name in (bound, "localhost", "127.0.0.1", "[::1]") if name))


class AllowedHosts:
    """ASGI middleware: requests whose ``Host`` is not allowed get 400 with the JSON error body.

    Starlette's TrustedHostMiddleware makes the decision (name parsing, ports, IPv6, ``*.`` patterns);
    it is given an inner app that only marks the request as allowed, because its own refusal is
    plain text and this API answers every error in JSON.
    """

    def __init__(self, app: Any, hosts: Sequence[str]):
        self.app = app
        self.hosts = list(hosts)
        self._decide = TrustedHostMiddleware(_mark_allowed, allowed_hosts=self.hosts, www_redirect=False)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or "*" in self.hosts:
            await self.app(scope, receive, send)
            return
        await self._decide(scope, receive, _discard)
        if scope.pop(_HOST_OK, False):
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        shown = repr(host[:100]) if host else "(none)"
        error = RequestError(
            400,
            "BAD_REQUEST",
            f"the Host header {shown} is not a name this server answers to; to serve it, add it to "
            "serving.allowed_hosts",
            reason="host",
        )
        body = json.dumps(error.body(), separators=(",", ":")).encode()
        await Response(body, status_code=error.status, media_type="application/json")(scope, receive, send)


async def _mark_allowed(scope: dict, receive: Any, send: Any) -> None:
    scope[_HOST_OK] = True


async def _discard(message: dict) -> None:
    """Where TrustedHostMiddleware's plain-text refusal goes: nowhere (a JSON one is sent instead)."""
