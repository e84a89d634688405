"""A streaming response that stops the moment the client goes away.

Two tasks race: one pumps the body generator to the socket, one waits for ``http.disconnect``.
Whichever ends first cancels the other; then the generator is closed and ``on_close`` (which
aborts the engine requests) runs, even when the client leaves before the first byte.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.responses import Response

from fleetlm.entrypoints.openai.serving import wait_disconnect


class SSEResponse(Response):
    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.body = body
        self.on_close = on_close  # runs even if the body never started

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (pump, watch):
                t.cancel()
            for t in (pump, watch):
                with contextlib.suppress(BaseException):
                    await t
            with contextlib.suppress(BaseException):
                await self.body.aclose()
            self.on_close()

    async def _pump(self, send) -> None:
        try:
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the socket is gone
            pass
