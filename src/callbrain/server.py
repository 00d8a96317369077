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

from callbrain.access import AccessGuard
from callbrain.agent import Agent
from callbrain.call_control import CallHook
from callbrain.call_store import CallStore, MemoryCallStore
from callbrain.conversation import build_chat_request, render_template
from callbrain.llm import LLM, ChatRequest, create_llms
from callbrain.logs import call_id_var
from callbrain.protocol import Utterance
from callbrain.redis_store import RedisStores
from callbrain.session import CLOSE_INTERNAL_ERROR, CallSession
from callbrain.tools.idempotency import IdempotencyStore
from callbrain.tools.runner import Toolbox
from callbrain.webhooks import WebhookHandler, webhook_routes

logger = logging.getLogger("callbrain.server")

DEFAULT_PREFIX = "/llm-websocket"
CLOSE_TRY_AGAIN_LATER = 1013


class AgentRuntime:
    """What the app shares between calls: the agent, its tools, its idempotency
    store and its one model client.

    Tools are built at once, so a broken reference fails the start-up. The model
    is built (unless one was given) and warmed up once, before the first call
    that needs it. A model passed in belongs to the caller and is not closed here.
    """

    def __init__(
        self,
        agent: Agent,
        llm: LLM | None = None,
        store: IdempotencyStore | None = None,
        call_store: CallStore | None = None,
    ) -> None:
        self.agent = agent
        tools = agent.build_tools()
        # Given stores win; else Redis when configured (several instances), else memory.
        settings = agent.server.store
        self.redis = (
            RedisStores(settings.redis_url, ttl_s=settings.ttl_s) if settings.redis_url else None
        )
        if store is None and self.redis is not None:
            store = self.redis.results
        self.toolbox = Toolbox(tools) if store is None else Toolbox(tools, store)
        self.call_store: CallStore = call_store or (
            self.redis.calls if self.redis is not None else MemoryCallStore(ttl_s=settings.ttl_s)
        )
        self._given = llm
        self._ready: LLM | None = None
        self._lock = asyncio.Lock()
        self.active_calls = 0
        self.sessions: set[CallSession] = set()
        self.draining = False
        """Set by :meth:`drain`: health turns 503 and new calls are refused."""
        self._idle = asyncio.Event()
        self._idle.set()

    async def get_llm(self) -> LLM:
        if self._ready is None:
            async with self._lock:
                if self._ready is None:
                    llm = self._given or create_llms([self.agent.llm, *self.agent.fallback_llms])
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

    def add_session(self, session: CallSession) -> None:
        self.sessions.add(session)
        self._idle.clear()

    def remove_session(self, session: CallSession) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._idle.set()

    async def drain(self, timeout: float, *, grace: float = 10.0) -> int:
        """Stop taking calls; let those in progress go on for up to ``timeout`` s,
        then finish their open turns (each may take ``grace`` s more to end by
        itself). Returns how many calls were still up; their sockets stay open
        for the caller to close or drop."""
        self.draining = True
        logger.info("draining: %d call(s) in progress, up to %.0f s", len(self.sessions), timeout)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        left = list(self.sessions)
        if left:
            logger.info("drain time is up; finishing the open turns of %d call(s)", len(left))
            await asyncio.gather(*(s.finish_turns(grace) for s in left))
        return len(left)

    async def aclose(self) -> None:
        ready, self._ready = self._ready, None
        if ready is not None and self._given is None:
            await ready.aclose()
        await self.toolbox.aclose()
        if self.redis is not None:
            await self.redis.aclose()


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
            if message.get("code") == 1009:  # else the call would end without a word why
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


def create_app(
    agent: Agent,
    *,
    prefix: str = DEFAULT_PREFIX,
    llm: LLM | None = None,
    store: IdempotencyStore | None = None,
    on_call_start: CallHook | None = None,
    on_webhook: WebhookHandler | None = None,
    call_store: CallStore | None = None,
) -> Starlette:
    """An ASGI app serving ``agent`` at ``{prefix}/{call_id}``, plus ``GET /healthz``.

    Pass ``llm`` to supply a ready model client (shared, or customised in code);
    otherwise one is built from ``agent.llm``. ``store`` keeps side-effecting
    tools' results and ``call_store`` what each call knows for a reconnect (in
    memory, or in Redis with ``server.store.redis_url``). ``on_call_start`` is run for every
    call with its :class:`~callbrain.call_control.CallControl`, e.g. to start
    a background job that speaks up (``agent_interrupt``) when it is done.
    With ``server.webhooks.api_key`` set, ``POST server.webhooks.path`` takes
    Retell's signed call events and hands verified ones to ``on_webhook`` (or
    the file's ``server.webhooks.handler``); see :mod:`callbrain.webhooks`.
    """
    runtime = AgentRuntime(agent, llm, store, call_store)
    webhooks = webhook_routes(agent, on_webhook)  # a bad handler reference fails here
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    guard = AccessGuard(agent.server.access)  # an empty secret fails here

    async def llm_websocket(websocket: WebSocket) -> None:
        # Secret, address and max_calls, before accept: a refusal is a bare HTTP 403.
        if not await guard.admit(websocket, active_calls=runtime.active_calls):
            return
        call_id = websocket.path_params["call_id"]
        token = call_id_var.set(call_id)
        if runtime.draining:
            logger.warning("refused a call: the server is shutting down")
            await websocket.close(CLOSE_TRY_AGAIN_LATER)  # before accept: HTTP 403
            call_id_var.reset(token)
            return
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
                limits=agent.server.access,
                call_store=runtime.call_store,
            )
            runtime.add_session(session)
            try:
                await session.run()
            finally:
                runtime.remove_session(session)
        finally:
            runtime.active_calls -= 1
            call_id_var.reset(token)

    async def healthz(request: Request) -> JSONResponse:
        # 503 while draining, so a load balancer sends new calls elsewhere.
        status = "draining" if runtime.draining else "ok"
        return JSONResponse(
            {"status": status, "agent": agent.name, "active_calls": runtime.active_calls},
            status_code=503 if runtime.draining else 200,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if runtime.redis is not None:
            await runtime.redis.ping()  # unreachable Redis: fail the start-up, not a call
        model = await runtime.get_llm()
        logger.info("agent %r ready on %s/%s", agent.name, model.provider, model.model)
        try:
            yield
        finally:
            await runtime.aclose()

    app = Starlette(
        routes=[
            WebSocketRoute(prefix + "/{call_id}", llm_websocket),
            # Retell's URL may be wss://host/llm-websocket/<secret>; it appends /{call_id}.
            *(
                [WebSocketRoute(prefix + "/{secret}/{call_id}", llm_websocket)]
                if guard.has_secret
                else []
            ),
            Route("/healthz", healthz),
            *webhooks,
        ],
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    return app
