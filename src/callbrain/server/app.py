"""The ASGI app: Retell's WebSocket routes, a health check, and Retell's webhooks.

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

Several agents (``create_app([clinic, pizza])``) each get their own runtime
(tools, model client) and their own URL, and share the rest: the process-wide
``server:`` settings (the first agent's; see :func:`server_settings`), the
store, ``/healthz``, ``/metrics`` and the webhooks. The URLs
(:func:`retell_path`), under the prefix, by the number of path segments::

    {prefix}/{call_id}                          the only agent (one agent only)
    {prefix}/{secret}/{call_id}                 the same, secret in the path
    {prefix}/agent/{name}/{call_id}             agent ``name`` (any number of agents)
    {prefix}/agent/{name}/{secret}/{call_id}    the same, secret in the path

No path can match two of them, whatever the secret or the agent names. Any
other WebSocket path is answered 404, logged (rate-limited, without any part
that could be a secret), so a wrong URL is not mistaken for a refused secret.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from callbrain.agent import Agent
from callbrain.call.control import CallHook
from callbrain.call.record import CallObserver, Observers
from callbrain.console import ConsoleAgent, open_console
from callbrain.errors import AgentConfigError
from callbrain.llm import LLM
from callbrain.observe.telemetry import Telemetry
from callbrain.records import open_recorder
from callbrain.server.access import AccessGuard
from callbrain.server.handler_threads import HandlerThreads
from callbrain.server.runtime import AgentRuntime
from callbrain.server.settings import ServerSettings
from callbrain.server.webhooks import WebhookHandler, webhook_routes
from callbrain.stores import Store

logger = logging.getLogger("callbrain.server")

DEFAULT_PREFIX = "/llm-websocket"
AGENT_SEGMENT = "agent"
"""The literal path segment before an agent's name in its own URL."""


def normal_prefix(prefix: str) -> str:
    """``/llm-websocket`` whatever slashes were given; "" for the root."""
    return "/" + prefix.strip("/") if prefix.strip("/") else ""


def retell_path(prefix: str, agent: str | None = None, *, secret: bool = False) -> str:
    """The path of the URL to paste into Retell (which appends ``/{call_id}``):
    ``agent`` None for the short form a server of one agent also serves;
    ``secret`` puts a ``/<secret>`` placeholder where the secret goes."""
    path = normal_prefix(prefix)
    if agent is not None:
        path += f"/{AGENT_SEGMENT}/{agent}"
    return path + ("/<secret>" if secret else "")


def server_settings(agents: Sequence[Agent]) -> ServerSettings:
    """The ``server:`` block for a process serving ``agents``: the first agent's.

    It is process-wide (access, store, webhooks, drain, metrics), so a later
    agent file may leave it out or repeat it, but not differ from it: that is
    an :class:`AgentConfigError` naming the keys, never a quietly ignored setting.
    """
    first = agents[0]
    for other in agents[1:]:
        if "server" not in other.model_fields_set or other.server == first.server:
            continue
        keys = _differences(first.server.model_dump(), other.server.model_dump(), "server")
        raise AgentConfigError(
            f"{other.source}: {', '.join(keys)} differs from {first.source}; the server "
            f"block applies to the whole process: set it in the first agent file only "
            f"({first.source}), or make it the same"
        )
    return first.server


def _differences(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [*a, *(k for k in b if k not in a)]
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{where}.{k}")]
    return [] if a == b else [where]


def create_app(
    agent: Agent | Sequence[Agent],
    *,
    prefix: str = DEFAULT_PREFIX,
    llm: LLM | None = None,
    store: Store | None = None,
    on_call_start: CallHook | None = None,
    on_webhook: WebhookHandler | None = None,
    observers: Sequence[CallObserver] = (),
) -> Starlette:
    """An ASGI app serving ``agent`` (or several) at the URLs of the module
    docstring, plus ``GET /healthz`` and ``GET /metrics`` (see :mod:`callbrain.observe`).

    Pass ``llm`` to supply a ready model client (shared by every agent, or
    customised in code); otherwise each agent's is built from its ``llm``.
    ``store`` keeps what each call knows for a reconnect and side-effecting
    tools' results (default: in memory, or Redis with ``server.store.redis_url``).
    ``on_call_start`` is run for every call with its
    :class:`~callbrain.call.control.CallControl`, e.g. to start a background job
    that speaks up (``agent_interrupt``) when it is done. ``observers`` are told
    about every call and turn as they go (see :mod:`callbrain.call.record`). With
    ``server.webhooks.api_key`` set, ``POST server.webhooks.path`` takes Retell's
    signed call events and hands verified ones to ``on_webhook`` (or the file's
    ``server.webhooks.handler``). With ``server.console`` on, the web console is
    at ``/console/`` (see :mod:`callbrain.console`).

    Raises :class:`AgentConfigError` for anything that would fail a call: a tool
    that does not import, a missing API key or model file, two agents with one
    name, conflicting ``server:`` blocks.
    """
    agents = [agent] if isinstance(agent, Agent) else list(agent)
    if not agents:
        raise AgentConfigError("no agent to serve")
    settings = server_settings(agents)
    telemetry = Telemetry(settings)  # tracing without its extra fails here
    console = open_console(settings)  # None unless server.console is on
    # One recorder for the process (the records are the process's, not an agent's).
    recorder = open_recorder(settings.records)
    ours = [
        *telemetry.observers,
        *([recorder] if recorder is not None else []),
        *(console.observers if console else ()),
    ]
    shared = Observers([*ours, *observers])
    runtimes: dict[str, AgentRuntime] = {}
    for each in agents:
        if each.name in runtimes:
            raise AgentConfigError(
                f"{each.source}: another agent is also named {each.name!r}; each agent's "
                "URL is made from its name, so names must differ"
            )
        # One store for all (the first runtime opens it): a call is one call id.
        first = next(iter(runtimes.values()), None)
        runtimes[each.name] = AgentRuntime(
            each,
            llm,
            store or (first.backend if first else None),
            shared,
            settings=settings,
            recorder=recorder,
        )
    telemetry.know_tools({name for r in runtimes.values() for name in r.toolbox.tools})
    if telemetry.metrics is not None and recorder is not None:
        telemetry.metrics.count_records_dropped(lambda: recorder.dropped)
        recorder.on_drop = telemetry.metrics.records_dropped
    # Sync webhook handlers' own threads, never the calls' (hung ones must not starve tools).
    handler_threads = HandlerThreads(settings.webhooks.handler_threads)
    # A bad handler reference fails here.
    webhooks = webhook_routes(agents[0], on_webhook, threads=handler_threads)
    prefix = normal_prefix(prefix)
    guard = AccessGuard(settings.access, on_refusal=shared.socket_refused)
    only = next(iter(runtimes.values())) if len(runtimes) == 1 else None

    def active_calls() -> int:
        return sum(r.active_calls for r in runtimes.values())

    async def serve_call(websocket: WebSocket, runtime: AgentRuntime) -> None:
        # Secret, address and max_calls, before accept: a refusal is a bare HTTP 403.
        if not await guard.admit(websocket, active_calls=active_calls()):
            return
        await runtime.serve_call(websocket, websocket.path_params["call_id"], on_call_start)

    async def only_agent(websocket: WebSocket) -> None:
        assert only is not None  # the short routes exist with one agent only
        await serve_call(websocket, only)

    async def named_agent(websocket: WebSocket) -> None:
        runtime = runtimes.get(websocket.path_params["agent"])
        if runtime is None:
            names = ", ".join(runtimes)
            reason = f"no agent of that name here (agents: {names})"
            await guard.refuse(websocket, "path", reason, not_found=True)
            return
        await serve_call(websocket, runtime)

    async def unknown_path(websocket: WebSocket) -> None:
        paths = " or ".join(f"{retell_path(prefix, name)}/{{call_id}}" for name in runtimes)
        if only is not None:
            paths = f"{retell_path(prefix)}/{{call_id}} or {paths}"
        reason = f"no call socket at this path (calls go to {paths})"
        await guard.refuse(websocket, "path", reason, not_found=True)

    async def healthz(request: Request) -> JSONResponse:
        # 503 while draining, so a load balancer sends new calls elsewhere.
        draining = any(r.draining for r in runtimes.values())
        body: dict[str, Any] = {"status": "draining" if draining else "ok", "pid": os.getpid()}
        if only is not None:
            body["agent"] = only.agent.name
        body["active_calls"] = active_calls()
        body["agents"] = {name: {"active_calls": r.active_calls} for name, r in runtimes.items()}
        return JSONResponse(body, status_code=503 if draining else 200)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if recorder is not None:  # a records database that is down costs records, not calls
            await recorder.start()
        for runtime in runtimes.values():  # an unreachable store or a broken model fails here
            model = await runtime.start()
            logger.info("agent %r ready on %s/%s", runtime.agent.name, model.provider, model.model)
        handler_threads.start()
        try:
            yield
        finally:
            handler_threads.shutdown()
            for runtime in reversed(runtimes.values()):  # the store's owner last
                await runtime.aclose()
            if recorder is not None:
                await recorder.aclose()
            await telemetry.aclose()

    routes: list[BaseRoute] = []
    if only is not None:
        routes.append(WebSocketRoute(prefix + "/{call_id}", only_agent))
        if guard.has_secret:
            # Retell's URL may be wss://host/llm-websocket/<secret>; it appends /{call_id}.
            routes.append(WebSocketRoute(prefix + "/{secret}/{call_id}", only_agent))
    named = f"{prefix}/{AGENT_SEGMENT}/{{agent}}"
    routes.append(WebSocketRoute(named + "/{call_id}", named_agent))
    if guard.has_secret:
        routes.append(WebSocketRoute(named + "/{secret}/{call_id}", named_agent))
    app = Starlette(
        routes=[
            *routes,
            Route("/healthz", healthz),
            *telemetry.routes(guard.client_address),
            *webhooks,
            *(
                console.routes(
                    [ConsoleAgent(name, r, on_call_start) for name, r in runtimes.items()], guard
                )
                if console
                else ()
            ),
            WebSocketRoute("/{path:path}", unknown_path),  # last: whatever matched nothing
        ],
        lifespan=lifespan,
    )
    app.state.runtimes = list(runtimes.values())
    app.state.runtime = app.state.runtimes[0]
    app.state.telemetry = telemetry
    app.state.console = console
    return app
