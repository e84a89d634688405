"""uvicorn's h11 HTTP protocol with two guards against hostile clients.

1. A deadline per request, not per byte. A connection must deliver a complete request (head and
   body) within ``timeout_keep_alive`` seconds of opening, or of the end of its previous
   response; otherwise it is closed. Trickling bytes does not extend the deadline (slow-loris);
   uvicorn's own keep-alive timer is cancelled by any byte. Once a request has fully arrived no
   deadline runs: a long generation is bounded by ``--request-timeout`` instead.
2. Framing errors (an invalid chunk size, a bad ``Content-Length``, ...) get a 400 with an
   OpenAI error body and one warning line. If a handler already started for that request, it
   sees a disconnect: it never writes to a connection h11 has closed (which used to log a full
   traceback per request, for anyone without a key).
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fleetlm.entrypoints.openai.protocol import APIError


class GuardedH11Protocol(H11Protocol):
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._update_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    # -- the request deadline -----------------------------------------------------------------
    def _request_received(self) -> bool:
        """A request is in flight and all of it (head and body) has arrived."""
        c = self.cycle
        return c is not None and not c.response_complete and not c.more_body

    def _update_deadline(self) -> None:
        """Invariant: a deadline runs exactly while the connection owes us (part of) a request."""
        if self._request_received():
            self._cancel_deadline()
        elif self._deadline is None and not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.timeout_keep_alive, self._on_deadline)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        if self._request_received() or self.transport.is_closing():
            return
        self._detach_handler()
        self.transport.close()

    # -- framing errors ---------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        started = self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete
        self._detach_handler()
        if started:  # too late for a status line: just end the connection
            self.transport.close()
            return
        err = APIError(400, "the request is not valid HTTP/1.1 (malformed headers, Content-Length or chunked "
                            "framing)", code="invalid_http")
        body = json.dumps(err.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # h11 cannot send a response in this state
            pass
        self.transport.close()

    def _detach_handler(self) -> None:
        """The running request's handler (if any) sees a disconnect from now on; its writes are
        dropped instead of reaching h11."""
        c = self.cycle
        if c is not None and not c.response_complete:
            c.disconnected = True
            c.message_event.set()
