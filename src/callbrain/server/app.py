"""The ASGI app: Retell's WebSocket route, a health check, and Retell's webhooks.

``create_app(agent)`` returns a small Starlette app. Run it with uvicorn (the
``callbrain serve`` command does, with the settings in
:mod:`callbrain.server.process`), or mount it inside an existing FastAPI or
Starlette app, running its lifespan from yours::

    retell = create_app(Agent.from_yaml("clinic.yaml"))
    api = FastAPI(lifespan=lambda _: retell.router.lifespan_context(retell))
    api.mount("/retell", retell)
    # Retell URL: wss://host/retell/llm-websocket

A parent does not run a mounted app's lifespan by itself. Without it the model
is still warmed up on the first call, but the store is not checked at start-up
and the model client is not closed at shutdown. Under your own uvicorn, pass
``proxy_headers=False``: who may set the client address is the
``trusted_proxies`` setting's business.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from callbrain.agent import Agent
from callbrain.call.control import CallHook
from callbrain.call.record import CallObserver, Observers
from callbrain.console import ConsoleAgent, open_console
from callbrain.llm import LLM
from callbrain.observe.telemetry import Telemetry
from callbrain.server.access import AccessGuard
from callbrain.server.handler_threads import HandlerThreads
from callbrain.server.runtime import AgentRuntime
from callbrain.server.webhooks import WebhookHandler, webhook_routes
from callbrain.stores import Store

logger = logging.getLogger("callbrain.server")

DEFAULT_PREFIX = "/llm-websocket"


def create_app(
    agent: Agent,
    *,
    prefix: str = DEFAULT_PREFIX,
    llm: LLM | None = None,
    store: Store | None = None,
    on_call_start: CallHook | None = None,
    on_webhook: WebhookHandler | None = None,
    observers: Sequence[CallObserver] = (),
) -> Starlette:
    """An ASGI app serving ``agent`` at ``{prefix}/{call_id}``, plus ``GET /healthz``
    and ``GET /metrics`` (see :mod:`callbrain.observe`).

    Pass ``llm`` to supply a ready model client (shared, or customised in code);
    otherwise one is built from ``agent.llm``. ``store`` keeps what each call
    knows for a reconnect and side-effecting tools' results (default: in
    memory, or Redis with ``server.store.redis_url``). ``on_call_start`` is run
    for every call with its :class:`~callbrain.call.control.CallControl`, e.g.
    to start a background job that speaks up (``agent_interrupt``) when it is
    done. ``observers`` are told about every call and turn as they go (see
    :mod:`callbrain.call.record`). With ``server.webhooks.api_key`` set,
    ``POST server.webhooks.path`` takes Retell's signed call events and hands
    verified ones to ``on_webhook`` (or the file's ``server.webhooks.handler``).
    With ``server.console`` on, the web console is at ``/console/`` (see
    :mod:`callbrain.console`).
    """
    telemetry = Telemetry(agent.server)  # tracing without its extra fails here
    console = open_console(agent.server)  # None unless server.console is on
    watchers = [*telemetry.observers, *(console.observers if console else ()), *observers]
    runtime = AgentRuntime(agent, llm, store, Observers(watchers))
    telemetry.know_tools(runtime.toolbox.tools)
    if telemetry.metrics is not None and runtime.recorder is not None:
        recorder = runtime.recorder
        telemetry.metrics.count_records_dropped(lambda: recorder.dropped)
    # Sync webhook handlers' own threads, never the calls' (hung ones must not starve tools).
    handler_threads = HandlerThreads(agent.server.webhooks.handler_threads)
    # A bad handler reference fails here.
    webhooks = webhook_routes(agent, on_webhook, threads=handler_threads)
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    guard = AccessGuard(agent.server.access, on_refusal=runtime.observers.socket_refused)

    async def llm_websocket(websocket: WebSocket) -> None:
        # Secret, address and max_calls, before accept: a refusal is a bare HTTP 403.
        if not await guard.admit(websocket, active_calls=runtime.active_calls):
            return
        await runtime.serve_call(websocket, websocket.path_params["call_id"], on_call_start)

    async def healthz(request: Request) -> JSONResponse:
        # 503 while draining, so a load balancer sends new calls elsewhere.
        status = "draining" if runtime.draining else "ok"
        return JSONResponse(
            {"status": status, "agent": agent.name, "active_calls": runtime.active_calls},
            status_code=503 if runtime.draining else 200,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        model = await runtime.start()  # an unreachable store or a broken model fails here
        logger.info("agent %r ready on %s/%s", agent.name, model.provider, model.model)
        handler_threads.start()
        try:
            yield
        finally:
            handler_threads.shutdown()
            await runtime.aclose()
            await telemetry.aclose()

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
            *telemetry.routes(guard.client_address),
            *webhooks,
            *(
                console.routes([ConsoleAgent(agent.name, runtime, on_call_start)], guard)
                if console
                else ()
            ),
        ],
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.telemetry = telemetry
    app.state.console = console
    return app
