"""The console's routes under ``/console``, and what they share: the agents,
the login, the live feed and the call records.

``create_app`` makes a :class:`WebConsole` (with ``server.console`` on), puts
its live feed among the call observers and mounts :meth:`WebConsole.routes`.
Every route but the login page and the static files wants a session (or
loopback, when allowed), and every one refuses a request from another site
first (:mod:`callbrain.console.auth`). Pages are rendered here from templates;
the scripts only make them live (events) and play the caller (playground).

The agents are a list so that a server of several agents drops in; the
playground's socket is ``/console/agents/{agent}/socket/{call_id}``, served by
that agent's runtime like a call from Retell, tagged ``playground``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.requests import HTTPConnection, Request
from starlette.responses import (
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from callbrain.console import ConsoleAgent
from callbrain.console.auth import COOKIE, ConsoleAuth
from callbrain.console.live import LiveFeed
from callbrain.console.settings import PATH, ConsoleSettings
from callbrain.records.read import Call
from callbrain.records.settings import settings_of
from callbrain.server.access import AccessGuard
from callbrain.server.settings import ServerSettings

logger = logging.getLogger("callbrain.console")

HERE = Path(__file__).parent
PLAYGROUND_PREFIX = "playground-"
"""Every playground call's id starts so: it can never be taken for (or resume) a Retell call."""
_PLAYGROUND_ID = re.compile(re.escape(PLAYGROUND_PREFIX) + r"[A-Za-z0-9_-]{6,64}")
READ_TIMEOUT_S = 5.0
MAX_FORM_BYTES = 4096
_CHECK_DRAIN_S = 1.0
_KEEPALIVE_S = 15.0
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Handler = Callable[[Request], Awaitable[Response]]


class WebConsole:
    """The console of one app (see the module docstring)."""

    def __init__(self, settings: ConsoleSettings, server: ServerSettings) -> None:
        records = settings_of(server.records)
        self.settings = settings
        self.feed = LiveFeed(records.redact if records is not None else "none")
        self.observers = [self.feed]
        self.agents: dict[str, ConsoleAgent] = {}
        self.auth: ConsoleAuth | None = None
        self._guard: AccessGuard | None = None

    def routes(self, agents: Sequence[ConsoleAgent], guard: AccessGuard) -> list[BaseRoute]:
        """The ``/console`` mount for ``agents``; ``guard`` is the call socket's
        (its client address rule, its trusted proxies, ``max_calls``)."""
        from callbrain.console import pages

        self.agents = {agent.name: agent for agent in agents}
        self._guard = guard
        self.auth = ConsoleAuth(
            self.settings,
            guard.client_address,
            is_trusted_proxy=guard.is_trusted_proxy,
            rejections_per_minute=guard.settings.rejections_per_minute,
        )
        if self.auth.generated_token is not None:
            # The one place this token is ever shown; set server.console.token to choose it.
            logger.warning(
                "console: no server.console.token is set; log in at %s/ with this token, "
                "made for this process: %s",
                PATH,
                self.auth.generated_token,
            )
        page = self._page
        return [
            Mount(
                PATH,
                routes=[
                    Route("/", page(pages.home)),
                    Route("/login", self._login_page, methods=["GET"]),
                    Route("/login", self._login, methods=["POST"]),
                    Route("/logout", page(self._logout), methods=["POST"]),
                    Route("/calls", page(pages.calls_page)),
                    Route("/calls/{call_id}", page(pages.call_page)),
                    Route("/calls/{call_id}/view", page(pages.call_fragment)),
                    Route("/calls/{call_id}/scenario.yaml", page(pages.scenario)),
                    Route("/playground", page(pages.playground_page)),
                    Route("/protocol.json", page(pages.protocol)),
                    Route("/events", page(self._events)),
                    WebSocketRoute("/agents/{agent}/socket/{call_id}", self._playground_socket),
                    Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
                ],
            )
        ]

    # ------------------------------------------------------------------ guards

    def _page(self, handler: Handler) -> Handler:
        """``handler`` for those signed in; others go to the login page (a page)
        or get 401 (anything a script asks for)."""

        async def guarded(request: Request) -> Response:
            auth = self._auth
            if not auth.same_site(request):
                return secured(PlainTextResponse("cross-site request refused", 403))
            if not auth.signed_in(request):
                if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                    return secured(RedirectResponse(login_url(request), 303))
                return secured(PlainTextResponse("log in first", 401))
            request.state.console = self
            return secured(await handler(request))

        return guarded

    @property
    def _auth(self) -> ConsoleAuth:
        assert self.auth is not None, "routes() sets up the login"
        return self.auth

    # ------------------------------------------------------------------- login

    async def _login_page(self, request: Request) -> Response:
        from callbrain.console.pages import render

        if not self._auth.same_site(request):
            return secured(PlainTextResponse("cross-site request refused", 403))
        if self._auth.signed_in(request):
            return secured(RedirectResponse(_next(request.query_params.get("next")), 303))
        return secured(render("login.html", request, next=request.query_params.get("next", "")))

    async def _login(self, request: Request) -> Response:
        from callbrain.console.pages import render

        auth = self._auth
        if not auth.same_site(request):
            return secured(PlainTextResponse("cross-site request refused", 403))
        if not auth.may_try_login(request):
            return secured(PlainTextResponse("too many failed logins; wait a minute", 429))
        form = await _small_form(request)
        token, target = form.get("token"), _next(form.get("next"))
        if token is None or not auth.token_matches(token.strip()):
            auth.login_failed(request)
            page = render("login.html", request, error="That token is not right.", next=target)
            page.status_code = 401
            return secured(page)
        response = RedirectResponse(target, 303)
        response.set_cookie(COOKIE, auth.new_session(), **auth.cookie_options(request))  # type: ignore[arg-type]
        return secured(response)

    async def _logout(self, request: Request) -> Response:
        self._auth.revoke(request.cookies.get(COOKIE))
        response = RedirectResponse(f"{PATH}/login", 303)
        response.delete_cookie(COOKIE, path=PATH)
        return response

    # ------------------------------------------------------------------- calls

    @property
    def draining(self) -> bool:
        return any(agent.runtime.draining for agent in self.agents.values())

    async def find_call(self, call_id: str) -> Call | None:
        """A call in progress from memory; else the database's record (which has
        every socket of it), unless it is behind what this server kept of a call
        that ended moments ago (records are written within about a second)."""
        from callbrain.records.read import load_call

        record = self.feed.find(call_id)
        if record is not None and record.end == "open":
            return self.feed.call(call_id)
        kept = self.feed.call(call_id)
        for recorder in self.recorders():
            found: Call | None = await self.read(recorder, lambda c: load_call(c, call_id))
            if found is None:
                continue
            behind = found["end"] == "open" or len(found["turns"]) < len(
                kept["turns"] if kept else []
            )
            return kept if kept is not None and behind else found
        return kept

    def recorders(self) -> list[Any]:
        """The agents' recorders, one per database."""
        seen: dict[str, Any] = {}
        for agent in self.agents.values():
            recorder = agent.runtime.recorder
            if recorder is not None:
                seen.setdefault(recorder.url, recorder)
        return list(seen.values())

    async def read(self, recorder: Any, query: Callable[[Any], Awaitable[Any]]) -> Any:
        """``query`` on ``recorder``'s database; None (logged) when it cannot answer."""
        from callbrain.records.database import has_tables

        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                if not await has_tables(recorder.engine):
                    return None
                async with recorder.engine.connect() as connection:
                    return await query(connection)
        except Exception as exc:
            logger.warning("console: could not read the call records (%s)", type(exc).__name__)
            return None

    # ------------------------------------------------------------------ events

    async def _events(self, request: Request) -> Response:
        watcher = self.feed.watch()
        if watcher is None:
            return PlainTextResponse("too many live views open", 503)
        feed = self.feed

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 2000\n\n" + feed.snapshot()
                quiet = 0.0
                while not self.draining:
                    event = await watcher.next(_CHECK_DRAIN_S)
                    if watcher.lagged:
                        watcher.lagged = False
                        yield feed.snapshot()
                    elif event is not None:
                        quiet = 0.0
                        yield event
                    else:
                        quiet += _CHECK_DRAIN_S
                        if quiet >= _KEEPALIVE_S:
                            quiet = 0.0
                            yield b": keep-alive\n\n"
            finally:
                feed.unwatch(watcher)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
        )

    # -------------------------------------------------------------- playground

    async def _playground_socket(self, websocket: WebSocket) -> None:
        """A playground call: the browser plays Retell over this socket, which the
        agent's runtime serves exactly like Retell's (refused before accept: 403)."""
        auth = self._auth
        agent = self.agents.get(websocket.path_params["agent"])
        call_id = websocket.path_params["call_id"]
        refusal = None
        if not auth.same_site(websocket):
            refusal = "not from the console's own page"
        elif not auth.signed_in(websocket):
            refusal = "not logged in"
        elif agent is None:
            refusal = "no such agent"
        elif not _PLAYGROUND_ID.fullmatch(call_id):
            refusal = f"a playground call id is {PLAYGROUND_PREFIX} and 6 to 64 letters or digits"
        elif self._guard is not None and self._guard.full(agent.runtime.active_calls):
            refusal = "max_calls calls are in progress"
        if refusal is not None or agent is None:
            auth.log_refusal(websocket, f"a playground socket: {refusal}")
            await websocket.close(1008)  # before accept: HTTP 403
            return
        await agent.runtime.serve_call(
            websocket, call_id, agent.on_call_start, tags={"playground": True}
        )


async def _small_form(request: Request) -> dict[str, str]:
    """The login form's fields (urlencoded, a few hundred bytes: more is not a login)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    except ValueError:  # more fields than a login has
        return {}
    return {name: values[0] for name, values in fields.items() if values}


def secured(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def login_url(connection: HTTPConnection) -> str:
    path = connection.url.path
    query = connection.url.query
    return f"{PATH}/login?next=" + quote(path + (f"?{query}" if query else ""), safe="")


def _next(target: str | None) -> str:
    """Where to go after the login: a console path, never another site."""
    if target and target.startswith(PATH + "/") and "//" not in target and "\\" not in target:
        return target
    return f"{PATH}/calls"
