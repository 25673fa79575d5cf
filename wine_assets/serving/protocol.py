"""uvicorn's httptools protocol with the limits uvicorn offers only for h11, or not at all.

``wine-assets serve`` runs uvicorn with httptools (the faster parser, measured in ``make bench``).
uvicorn 0.54 gives that protocol no limit on the size of a request head (its
``h11_max_incomplete_event_size`` applies to h11 only: a 150 MB header was read into memory
whole) and no timeout before a request's first response (``timeout_keep_alive`` starts only
after a response, under h11 as well: a connection that sends nothing stays open for ever).
This subclass adds the smallest guards for both, and keeps everything else uvicorn's:

* the request line plus headers may hold ``max_header_bytes``: beyond, 431 and the connection
  closes. A head still incomplete at the end of a read is counted as it arrives, so the memory
  a head can take is bounded by the limit plus one read, never by what the client sends;
* the head must arrive within ``header_timeout_seconds`` of the connection (or of the first
  byte of a later request): else 408 if part of it came, and the connection closes;
* the body must arrive within ``body_timeout_seconds`` of the head: else the connection closes
  (the app sees the client go, as for any disconnect);
* a request that is not HTTP gets the project's JSON error body rather than uvicorn's text.

Idle connections between requests are closed by uvicorn's own ``timeout_keep_alive``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

logger = logging.getLogger(__name__)

REQUEST_LINE_BYTES = len(b"OPTIONS  HTTP/1.1\r\n\r\n")  # what a head holds besides its target and headers
LINGER_SECONDS = 1.0  # after a refusal, input is discarded this long so the answer reaches the client


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 16384
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0


def error_bytes(status: int, error_code: str, message: str) -> bytes:
    """A complete HTTP response with the project's JSON error body; the connection closes after it."""
    body = json.dumps({"error_code": error_code, "message": message, "error": message}).encode()
    head = [STATUS_LINE[status], b"content-type: application/json\r\n"]
    head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    return b"".join(head) + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a head size limit and head and body timeouts (module docstring)."""

    def __init__(self, *args: Any, limits: HttpLimits = HttpLimits(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_bytes = 0
        self._reading_head = False  # between a request's first byte and the end of its headers
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # -- the connection ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_timer is None and self._body_timer is None and self._between_requests():
            self._arm_head_timer()  # bytes after a response (even blank lines) start the next head's clock
        super().data_received(data)
        if self._reading_head and not self._refused and not self.transport.is_closing():
            # The head is still incomplete after this read: count it now, before it can grow further.
            # (When a request starts mid-read, the bytes before it are counted too: a pipelined
            # request can only be refused a little early, never accepted above the limit.)
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        if self._refused:  # _refuse_head raised out of a parser callback: its answer is sent already
            return
        self._refused = True
        logger.warning("refused a request that is not valid HTTP/1.1 from %s", self.client)
        self._close_with(
            error_bytes(400, "BAD_REQUEST", "the request is not valid HTTP/1.1 (request line, headers or framing)")
        )

    # -- parser callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._reading_head = True
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        size = REQUEST_LINE_BYTES + len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._refuse_head()
            raise _Refused  # stops the parser: no request cycle starts
        self._cancel_head_timer()
        self._body_timer = self.loop.call_later(self.limits.body_timeout_seconds, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # -- guards ------------------------------------------------------------------------------
    def _between_requests(self) -> bool:
        return not self._reading_head and (self.cycle is None or self.cycle.response_complete)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_seconds, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered: its connection is not idle (keep-alive follows it)
        self._refused = True
        if self._reading_head:
            seconds = self.limits.header_timeout_seconds
            message = f"the request headers did not arrive within {seconds:g} s (serving.header_timeout_seconds)"
            self._close_with(error_bytes(408, "REQUEST_TIMEOUT", message))
        else:
            self.transport.close()  # nothing was sent: there is no one to answer

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing():
            logger.warning(
                "closed a connection from %s: its body did not arrive within %g s (serving.body_timeout_seconds)",
                self.client,
                self.limits.body_timeout_seconds,
            )
            self._refused = True
            self.transport.close()

    def _refuse_head(self) -> None:
        self._refused = True
        self._reading_head = False
        limit = self.limits.max_header_bytes
        logger.warning("refused a request head over %d bytes from %s", limit, self.client)
        self._close_with(
            error_bytes(
                431,
                "REQUEST_HEADER_FIELDS_TOO_LARGE",
                f"the request line and headers exceed {limit} bytes (serving.max_header_bytes)",
            )
        )

    def _close_with(self, response: bytes) -> None:
        """Answer, then close gently: a close with unread input sends a reset, and the client's TCP
        stack would drop the answer. So the write side is shut, input is read and discarded (not
        parsed: ``_refused``) for ``LINGER_SECONDS`` at most, then the connection closes."""
        self._cancel_timers()
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:  # pragma: no cover - TLS transports cannot half-close
            self.transport.close()


class _Refused(Exception):
    """Raised from a parser callback to stop httptools once a request has been refused."""
