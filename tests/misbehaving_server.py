"""A Retell Custom LLM server that breaks one protocol rule on purpose.

The call id in the URL picks the rule it breaks (``/llm-websocket/stale_frame``
streams on after a barge-in, like the official demos); ``good`` breaks none.
For many calls of one kind (a bench), the rule can come first instead:
``/stale_frame/llm-websocket/{any call id}``.
The protocol checker, ``callbrain test`` and ``callbrain bench`` are tested
against it: a checker that cannot catch a broken server is no checker.

It misbehaves on events, not on timing: the stale server streams its old
answer on only once the newer answer has started (so the stale frames are
provably stale, however slow the machine), and every answer ends with a
``metadata`` frame ``{"finished": <response_id>}``, which a test waits for
instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

MODES = (
    "good",
    "binary_frame",
    "not_json",
    "unknown_response_type",
    "invalid_frame",
    "null_field",
    "config_not_first",
    "unrequested_response",
    "duplicate_complete",
    "frame_after_complete",
    "stale_frame",
    "ping_missed",
    "unexpected_pong",
    "exclusive_actions",
    "unmatched_tool_result",
    "turn_incomplete",
)
CLOSES = "closes"
"""Not a protocol rule: answers one request, then closes the socket with 1011."""

_CHUNKS = ("Sure, ", "let me ", "see. ", "We are ", "open ", "until six.")


class _Call:
    def __init__(self, ws: WebSocket, mode: str) -> None:
        self.ws = ws
        self.mode = mode
        self.turn: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.newer_spoke = asyncio.Event()
        """Set once an answer has spoken after superseding another (the stale mode's cue)."""
        self.superseding = False

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        async with self.lock:
            if isinstance(frame, bytes):
                await self.ws.send_bytes(frame)
            elif isinstance(frame, str):
                await self.ws.send_text(frame)
            else:
                await self.ws.send_text(orjson.dumps(frame).decode())

    async def start(self) -> None:
        config = {"response_type": "config", "config": {"auto_reconnect": True}}
        greeting = {"response_type": "response", "response_id": 0, "content": "Hello."}
        if self.mode == "config_not_first":
            await self.send({**greeting, "content_complete": True})
            await self.send(config)
            return
        await self.send(config)
        await self.send({**greeting, "content_complete": True})
        if self.mode == "unrequested_response":
            await self.send(
                {
                    "response_type": "response",
                    "response_id": 7,
                    "content": "Hi",
                    "content_complete": True,
                }
            )

    async def on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("interaction_type")
        if kind == "ping_pong":
            if self.mode == "ping_missed":
                return
            stamp = frame["timestamp"] + (1 if self.mode == "unexpected_pong" else 0)
            await self.send({"response_type": "ping_pong", "timestamp": stamp})
        elif kind in ("response_required", "reminder_required"):
            # The stale server is the official demos' bug: the old answer keeps going.
            self.superseding = self.turn is not None and not self.turn.done()
            if self.turn is not None and self.mode != "stale_frame":
                self.turn.cancel()
            self.turn = asyncio.create_task(self.answer(frame["response_id"], self.superseding))

    async def answer(self, rid: int, superseding: bool) -> None:
        def frame(content: str, complete: bool, **extra: Any) -> dict[str, Any]:
            base = {"response_type": "response", "response_id": rid, "content": content}
            return {**base, "content_complete": complete, **extra}

        mode = self.mode
        special = {
            "binary_frame": b'{"response_type":"response"}',
            "not_json": "Sure thing!",
            "unknown_response_type": {"response_type": "speech", "content": "Hi"},
            "invalid_frame": frame("Sure.", False, no_interruption_allowed="yes"),
            "null_field": frame("Sure.", False, transfer_number=None),
            "exclusive_actions": frame("Bye.", False, end_call=True, digit_to_press="1"),
            "unmatched_tool_result": {
                "response_type": "tool_call_result",
                "tool_call_id": "nope",
                "content": "done",
            },
        }
        if mode in special:
            await self.send(special[mode])
        for index, chunk in enumerate(_CHUNKS):
            await self.send(frame(chunk, False))
            if superseding:
                self.newer_spoke.set()
            if mode == "stale_frame" and index == 0 and not superseding:
                await self.newer_spoke.wait()  # stream on once the newer answer has started
            await asyncio.sleep(0)
        if mode != "turn_incomplete":
            await self.send(frame("", True))
        if mode == CLOSES:
            await self.ws.close(1011)
            return
        if mode == "duplicate_complete":
            await self.send(frame("", True))
        if mode == "frame_after_complete":
            await self.send(frame("One more thing.", False))
        await self.send({"response_type": "metadata", "metadata": {"finished": rid}})


async def _endpoint(ws: WebSocket) -> None:
    await ws.accept()
    call = _Call(ws, ws.path_params.get("mode") or ws.path_params["call_id"])
    await call.start()
    try:
        while True:
            await call.on_frame(orjson.loads(await ws.receive_text()))
    except WebSocketDisconnect:
        pass
    finally:
        if call.turn is not None:
            call.turn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call.turn


app = Starlette(
    routes=[
        WebSocketRoute("/llm-websocket/{call_id}", _endpoint),
        WebSocketRoute("/{mode}/llm-websocket/{call_id}", _endpoint),
    ]
)
