"""The ASGI app: Retell's WebSocket route and a health check.

``create_app(agent)`` returns a small Starlette app. Run it with uvicorn (the
``callbrain serve`` command does), or mount it inside an existing FastAPI or
Starlette app::

    api = FastAPI()
    api.mount("/retell", create_app(Agent.from_yaml("clinic.yaml")))
    # Retell URL: wss://host/retell/llm-websocket

A mounted app's lifespan is not run by its parent, so the model is also created
lazily on the first call; the lifespan only pre-loads it when it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from callbrain.agent import Agent
from callbrain.call_control import CallHook
from callbrain.conversation import build_chat_request, render_template
from callbrain.llm import LLM, ChatRequest, create_llm
from callbrain.logs import call_id_var
from callbrain.protocol import Utterance
from callbrain.session import CLOSE_INTERNAL_ERROR, CallSession
from callbrain.tools.idempotency import IdempotencyStore
from callbrain.tools.runner import Toolbox

logger = logging.getLogger("callbrain.server")

DEFAULT_PREFIX = "/llm-websocket"


class AgentRuntime:
    """What the app shares between calls: the agent, its tools, its idempotency
    store and its one model client.

    Tools are built at once, so a broken reference fails the start-up. The model
    is built (unless one was given) and warmed up once, before the first call
    that needs it. A model passed in belongs to the caller and is not closed here.
    """

    def __init__(
        self, agent: Agent, llm: LLM | None = None, store: IdempotencyStore | None = None
    ) -> None:
        self.agent = agent
        tools = agent.build_tools()
        self.toolbox = Toolbox(tools) if store is None else Toolbox(tools, store)
        self._given = llm
        self._ready: LLM | None = None
        self._lock = asyncio.Lock()
        self.active_calls = 0

    async def get_llm(self) -> LLM:
        if self._ready is None:
            async with self._lock:
                if self._ready is None:
                    llm = self._given or create_llm(self.agent.llm)
                    try:
                        await llm.warmup(self._typical_request())
                    except BaseException:
                        if self._given is None:
                            await llm.aclose()
                        raise
                    self._ready = llm
        return self._ready

    def _typical_request(self) -> ChatRequest:
        """The agent's first turn as most calls will send it, for prefix caches."""
        greeting, _ = render_template(self.agent.begin_message, self.agent.dynamic_variables)
        request, _ = build_chat_request(
            system_prompt=self.agent.system_prompt,
            transcript=[Utterance(role="agent", content=greeting)] if greeting.strip() else [],
            variables=self.agent.dynamic_variables,
            max_messages=self.agent.max_history_messages,
            tools=[tool.spec for tool in self.toolbox.tools.values()],
        )
        return request

    async def aclose(self) -> None:
        ready, self._ready = self._ready, None
        if ready is not None and self._given is None:
            await ready.aclose()
        await self.toolbox.aclose()


class _StarletteTransport:
    """Adapts Starlette's WebSocket to the session's :class:`~callbrain.session.Transport`."""

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket

    async def receive(self) -> str | bytes | None:
        try:
            message = await self._ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        if message["type"] == "websocket.disconnect":
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


def create_app(
    agent: Agent,
    *,
    prefix: str = DEFAULT_PREFIX,
    llm: LLM | None = None,
    store: IdempotencyStore | None = None,
    on_call_start: CallHook | None = None,
) -> Starlette:
    """An ASGI app serving ``agent`` at ``{prefix}/{call_id}``, plus ``GET /healthz``.

    Pass ``llm`` to supply a ready model client (shared, or customised in code);
    otherwise one is built from ``agent.llm``. ``store`` keeps side-effecting
    tools' results (in memory by default). ``on_call_start`` is run for every
    call with its :class:`~callbrain.call_control.CallControl`, e.g. to start
    a background job that speaks up (``agent_interrupt``) when it is done.
    """
    runtime = AgentRuntime(agent, llm, store)
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""

    async def llm_websocket(websocket: WebSocket) -> None:
        call_id = websocket.path_params["call_id"]
        token = call_id_var.set(call_id)
        runtime.active_calls += 1
        try:
            await websocket.accept()
            try:
                model = await runtime.get_llm()
            except Exception:
                logger.exception("cannot start the model for this call")
                await websocket.close(CLOSE_INTERNAL_ERROR)
                return
            session = CallSession(
                agent,
                model,
                _StarletteTransport(websocket),
                call_id,
                toolbox=runtime.toolbox,
                on_call_start=on_call_start,
            )
            await session.run()
        finally:
            runtime.active_calls -= 1
            call_id_var.reset(token)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse(
            {"status": "ok", "agent": agent.name, "active_calls": runtime.active_calls}
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        model = await runtime.get_llm()
        logger.info("agent %r ready on %s/%s", agent.name, model.provider, model.model)
        try:
            yield
        finally:
            await runtime.aclose()

    app = Starlette(
        routes=[
            WebSocketRoute(prefix + "/{call_id}", llm_websocket),
            Route("/healthz", healthz),
        ],
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    return app
