"""A streaming response that stops the moment the client goes away.

Two tasks race: one pumps the body generator to the socket, one waits for ``http.disconnect``.
Whichever ends first cancels the other, and the generator is always closed, so its ``finally``
(which aborts the engine requests) runs even when the client leaves during a long prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.responses import Response

from fleetlm.entrypoints.openai.serving import wait_disconnect


class SSEResponse(Response):
    def __init__(self, body: AsyncIterator[bytes]) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.body = body

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

    async def _pump(self, send) -> None:
        try:
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the socket is gone
            pass
