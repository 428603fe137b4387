"""uvicorn's httptools protocol with limits on request heads and deadlines for slow clients.

uvicorn with httptools bounds neither the size nor the number of request headers (a 10 MB header was
answered 200; httptools joins a header's pieces as they arrive, so 4 x 60 MB headers cost 5.4 s of CPU) and
closes no connection that is slow to send its head or its body, or that never sends anything (2,000 idle
sockets stayed open). Its h11 protocol has a head-size limit but parses in Python, several times slower.
This subclass keeps httptools and adds, per connection:
  - a limit on the bytes of each request head (request line and headers), checked as the bytes arrive,
    before the parser sees them, and on the number of headers: 431 and the connection closed;
  - a deadline for each request head, from the connection's opening or the request's first byte: 408;
  - a deadline for each request body, from the end of its head: 408 (the app sees a disconnect).
Idle keep-alive connections are closed by uvicorn's own `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

TIMED_OUT_STATUS = "vae.timed_out_status"
"""Scope key set when the server gave up on a request's body: the status the metrics count it under."""
HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    """Limits on what one client connection may send, and how slowly."""

    max_header_bytes: int = 16 << 10
    """Most bytes in a request's head (request line and all headers); 431 past it."""
    max_headers: int = 100
    """Most header lines in one request; 431 past it."""
    header_timeout_s: float = 10.0
    """Longest time from a connection's opening (or a request's first byte) to the end of the request's head; 408."""
    body_timeout_s: float = 30.0
    """Longest time from the end of a request's head to the end of its body; 408."""

    def problems(self) -> list[str]:
        return [f"{name} must be > 0, got {value}" for name, value in self.__dict__.items() if not value > 0]


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a request whose head is over a limit."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with ConnectionLimits (build one per server with `limited_protocol(limits)`)."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._reading_head = True  # between a request's end (or the connection's start) and its head's end
        self._head_bytes = 0
        self._tail = b""  # last bytes of the previous chunk, for a head end split across two reads
        self._num_headers = 0
        self._deadline: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ deadlines

    def _arm(self, delay_s: float, callback) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:  # not while a response is still on its way
            self._refuse(408, f"request head not received within {self.limits.header_timeout_s:g} s")

    def _body_too_slow(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is None or self.transport.is_closing():
            return
        if not cycle.response_started:
            cycle.scope[TIMED_OUT_STATUS] = 408  # the app sees a disconnect; the metrics count a 408
            self._refuse(408, f"request body not received within {self.limits.body_timeout_s:g} s")
        else:  # answered already (e.g. 401 before the body was read): just stop waiting for the rest
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with `message` straight on the socket and close the connection."""
        if self.transport.is_closing():
            return
        body = message.encode()
        self.transport.write(b"".join([
            STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n", body]))
        self.transport.close()

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._head_too_slow)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._reading_head:  # counted before the parser buffers any of it
            end = (self._tail + data).find(HEAD_END)
            self._head_bytes += len(data) if end < 0 else max(0, end + len(HEAD_END) - len(self._tail))
            self._tail = data[-3:]
            if self._head_bytes > self.limits.max_header_bytes:
                return self._refuse(431, f"request head exceeds {self.limits.max_header_bytes} bytes")
        # HttpToolsProtocol.data_received, with a refused head answered 431 rather than 400
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            if isinstance(error.__context__, _HeadRefused):
                return self._refuse(431, str(error.__context__))
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._num_headers = 0
        self._arm(self.limits.header_timeout_s, self._head_too_slow)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._num_headers += 1
        if self._num_headers > self.limits.max_headers:
            raise _HeadRefused(f"request has more than {self.limits.max_headers} headers")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head, self._head_bytes, self._tail = False, 0, b""
        self._arm(self.limits.body_timeout_s, self._body_too_slow)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading_head = True
        super().on_message_complete()


def limited_protocol(limits: ConnectionLimits):
    """The protocol factory to pass as uvicorn.Config(http=...)."""
    return functools.partial(LimitedHttpToolsProtocol, limits=limits)
