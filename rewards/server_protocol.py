"""The reward server's HTTP/1.1 connections: uvicorn's h11 protocol with a deadline per request head and a
lingering close.

Both close gaps in what uvicorn does for a hostile or merely unlucky client:

* **Head deadline.**  uvicorn times out idle keep-alive connections, but not a client that sends half a
  request line and stops (one open connection each, forever).
* **Lingering close.**  A refusal (413, 503, 408, ...) is sent while the client may still be sending its body.
  Closing a socket with unread bytes in its receive buffer makes the kernel send a TCP reset, and the reset
  can destroy the answer before the client reads it: the client sees "broken pipe" or "connection reset"
  instead of the 413 that names the limit (a 3 MB body over a 200 KB limit lost its 413 one time in ten on
  a loaded machine).  As nginx does, the server instead half-closes (the client reads the answer, then
  end of file), reads and drops what the client still sends, and closes when the client does, or after
  ``linger_seconds`` at most.  Only a connection whose request body is still arriving lingers.
* **An unread body after an answer.**  ``/health``, a 404 or a 405 answer without reading the request's body.
  uvicorn then keeps the connection for the next request while h11 still expects that body, and every byte
  that trickles in resets its keep-alive timer: a client sending one byte a second of a declared 1 GB body
  held the connection forever (1,024 such clients made every request a 503).  Once an answer is sent and the
  client is still sending a body nobody reads, the connection closes, lingering.
"""
from __future__ import annotations

import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("r3_rl.serve_reward")


class _LingeringTransport:
    """The socket transport as uvicorn sees it, with ``close()`` turned into a lingering close when a request
    body is still arriving; everything else is the real transport's."""

    def __init__(self, real: Any, protocol: "HardenedH11") -> None:
        self._real, self._protocol = real, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._real.is_closing()

    def close(self) -> None:
        proto = self._protocol
        if (not proto.lingering and not self._real.is_closing() and self._real.can_write_eof()
                and proto.conn.their_state is h11.SEND_BODY):
            proto.start_lingering(self._real)
        else:
            self._real.close()


class HardenedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a head deadline and a lingering close (see the module docstring).

    ``head_timeout`` and ``linger_seconds`` are set on a subclass per server."""

    head_timeout = 30.0
    linger_seconds = 5.0
    lingering = False
    _head_timer: Any = None
    _linger_timer: Any = None

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _head_too_slow(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.warning("client %s did not send a request within %gs; disconnected",
                        "%s:%s" % self.client if self.client else "?", self.head_timeout)
            self.transport.close()

    def start_lingering(self, real: Any) -> None:
        """Half-close once the answer is flushed, drop what still arrives, close for good later."""
        self.lingering = True
        real.write_eof()
        real.resume_reading()  # uvicorn pauses reading when an unread body fills its buffer
        self._linger_timer = self.loop.call_later(self.linger_seconds, real.close)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self.lingering:  # while lingering the bytes are dropped; the client's end of file closes
            super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.transport.close()  # the body is unread and will stay so: linger, then close
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)
