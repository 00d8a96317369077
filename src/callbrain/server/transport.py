"""Starlette's WebSocket as the session's :class:`~callbrain.call.session.Transport`."""

from __future__ import annotations

import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

logger = logging.getLogger("callbrain.server")

CLOSE_MESSAGE_TOO_BIG = 1009


class StarletteTransport:
    """Reads and writes text frames; a disconnect (polite or not) reads as None."""

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket
        self.close_code: int | None = None

    async def receive(self) -> str | bytes | None:
        try:
            message = await self._ws.receive()
        except WebSocketDisconnect as exc:
            self.close_code = exc.code
            return None
        except RuntimeError:
            return None
        if message["type"] == "websocket.disconnect":
            self.close_code = message.get("code")
            if self.close_code == CLOSE_MESSAGE_TOO_BIG:  # else the call ends without a word why
                logger.warning("socket closed with 1009: a frame over the server's ws_max_size")
            return None
        text: str | None = message.get("text")
        if text is not None:
            return text
        data: bytes | None = message.get("bytes")
        return data if data is not None else b""

    async def send_text(self, text: str) -> None:
        await self._ws.send_text(text)

    async def close(self, code: int) -> None:
        await self._ws.close(code)
