"""The baseline ``callbrain bench --compare baseline`` measures callbrain against.

A minimal Retell Custom LLM server of the kind a team writes on day one from
Retell's docs and its official Python demo: FastAPI, the official ``openai``
SDK, and the demo's handling of every message, reproduced as the demo does it.

* On connect: ``config`` (``auto_reconnect`` and ``call_details`` on), then the
  begin message (``response_id`` 0, complete) at once.
* Every incoming frame is handed to a fire-and-forget ``asyncio.create_task``,
  so the read loop never blocks and pings are answered while a reply streams.
* ``ping_pong``: echoed. ``call_details``: printed. ``update_only``: ignored.
* ``response_required`` / ``reminder_required``: the latest ``response_id`` is
  kept in a variable shared by the call's tasks; the transcript becomes chat
  messages (agent -> assistant, anything else -> user, a synthetic user line for
  a reminder); ``chat.completions`` streams, and every delta is sent as its own
  ``response`` frame, followed by an empty one with ``content_complete: true``.

The demo's flaws are kept on purpose, since they are what such a server does
under load and what callbrain is measured against:

1. **Barge-in cancels nothing.** A superseded reply's task is not cancelled:
   it waits for its next delta, *sends it* under the old id (a stale frame,
   which Retell drops) and only then stops. The model's stream is abandoned,
   not closed. The bench's checker counts these as ``stale_frame`` when it has
   proof the server had already read the newer request.
2. **Nulls on the wire.** Frames are pydantic models sent as ``model.__dict__``,
   so every ``response`` frame carries ``"transfer_number": null`` (the
   checker's ``null_field``). Retell tolerates it.
3. **One SDK client per call.** Each connection builds its own ``AsyncOpenAI``
   client (its own HTTP connection pool) and never closes it.
4. **A failed turn is silent.** If the model call raises, the exception dies
   with its unawaited task: no ``content_complete``, the agent says nothing
   until the caller speaks again. The SDK keeps its defaults (2 retries, a
   10-minute timeout).
5. **Defaults everywhere.** Plain ``uvicorn.run`` (permessage-deflate accepted
   when the client offers it, uvicorn's access and connection log lines at
   INFO), ``print`` per call, stdlib ``json`` through Starlette's ``send_json``.

Left out, because they are not on the socket's path: the demo's webhook route
and Retell API key, and its terminal view (it clears the screen with a shell
command on every turn and reprints the transcript). Run it with::

    python benchmarks/baseline/server.py --port 9000 --openai-base-url http://127.0.0.1:8090/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel

SYSTEM_PROMPT = "You are a receptionist. Answer in one or two short sentences."
"""The same prompt and greeting as the agent ``callbrain bench`` serves."""
BEGIN_MESSAGE = "Hi, thanks for calling. How can I help?"
REMINDER_LINE = "(Now the user has not responded in a while, you would say:)"


class Utterance(BaseModel):
    role: Literal["agent", "user", "system"]
    content: str


class ResponseRequiredRequest(BaseModel):
    interaction_type: Literal["reminder_required", "response_required"]
    response_id: int
    transcript: list[Utterance]


class ConfigResponse(BaseModel):
    response_type: Literal["config"] = "config"
    config: dict[str, bool]


class ResponseResponse(BaseModel):
    response_type: Literal["response"] = "response"
    response_id: int
    content: str
    content_complete: bool
    end_call: bool | None = False
    transfer_number: str | None = None


@dataclass(frozen=True)
class ModelSettings:
    base_url: str | None
    api_key: str
    model: str


class LlmClient:
    """One per call, as in the demo: a fresh SDK client each time."""

    def __init__(self, settings: ModelSettings) -> None:
        self.client = AsyncOpenAI(base_url=settings.base_url, api_key=settings.api_key)
        self.model = settings.model

    def draft_begin_message(self) -> ResponseResponse:
        return ResponseResponse(
            response_id=0, content=BEGIN_MESSAGE, content_complete=True, end_call=False
        )

    def prepare_prompt(self, request: ResponseRequiredRequest) -> list[ChatCompletionMessageParam]:
        messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": SYSTEM_PROMPT}]
        for utterance in request.transcript:
            if utterance.role == "agent":
                messages.append({"role": "assistant", "content": utterance.content})
            else:
                messages.append({"role": "user", "content": utterance.content})
        if request.interaction_type == "reminder_required":
            messages.append({"role": "user", "content": REMINDER_LINE})
        return messages

    async def draft_response(
        self, request: ResponseRequiredRequest
    ) -> AsyncIterator[ResponseResponse]:
        stream = await self.client.chat.completions.create(
            model=self.model,
            messages=self.prepare_prompt(request),
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices[0].delta.content is not None:
                yield ResponseResponse(
                    response_id=request.response_id,
                    content=chunk.choices[0].delta.content,
                    content_complete=False,
                    end_call=False,
                )
        yield ResponseResponse(
            response_id=request.response_id, content="", content_complete=True, end_call=False
        )


def create_app(settings: ModelSettings) -> FastAPI:
    app = FastAPI()

    @app.websocket("/llm-websocket/{call_id}")
    async def websocket_handler(websocket: WebSocket, call_id: str) -> None:
        try:
            await websocket.accept()
            llm_client = LlmClient(settings)
            config = ConfigResponse(config={"auto_reconnect": True, "call_details": True})
            await websocket.send_json(config.__dict__)
            response_id = 0
            await websocket.send_json(llm_client.draft_begin_message().__dict__)

            async def handle_message(request_json: dict[str, Any]) -> None:
                nonlocal response_id
                kind = request_json["interaction_type"]
                if kind == "call_details":
                    print(json.dumps(request_json, indent=2))
                    return
                if kind == "ping_pong":
                    await websocket.send_json(
                        {"response_type": "ping_pong", "timestamp": request_json["timestamp"]}
                    )
                    return
                if kind == "update_only":
                    return
                if kind in ("response_required", "reminder_required"):
                    response_id = request_json["response_id"]
                    request = ResponseRequiredRequest(
                        interaction_type=kind,
                        response_id=response_id,
                        transcript=request_json["transcript"],
                    )
                    async for event in llm_client.draft_response(request):
                        await websocket.send_json(event.__dict__)
                        if request.response_id < response_id:
                            break  # a newer request arrived: give up on this one

            async for data in websocket.iter_json():
                asyncio.create_task(handle_message(data))  # noqa: RUF006 - the demo's way
        except WebSocketDisconnect:
            print(f"LLM WebSocket disconnected for {call_id}")
        except Exception as exc:
            print(f"Error in LLM WebSocket: {exc} for {call_id}")
            await websocket.close(1011, "Server error")
        finally:
            print(f"LLM WebSocket connection closed for {call_id}")

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--openai-base-url",
        default=os.environ.get("OPENAI_BASE_URL"),
        help="The model's OpenAI-compatible API (default: $OPENAI_BASE_URL, else OpenAI's).",
    )
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused"))
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args(argv)
    settings = ModelSettings(args.openai_base_url, args.api_key, args.model)
    uvicorn.run(create_app(settings), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
