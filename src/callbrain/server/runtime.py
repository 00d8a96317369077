"""What one agent's calls share: its tools, its model client, the store, the
observers, and the sessions in progress (which is what a drain works on).

Tools and the model client are built at once (unless a model was given), so
a broken tool reference, a missing API key or model file, or a missing extra
fails ``create_app`` with an :class:`~callbrain.errors.AgentConfigError`, before
anything is served. The model is warmed up once, before the first call that
needs it. A model passed in belongs to the caller and is not closed here.

A drain happens here, in one place: stop taking calls, let those in progress
go on for a while, then have each session finish its open turn
(:meth:`~callbrain.call.session.CallSession.finish_turns`). Dropping the
sockets that are still open is the process's part
(:mod:`callbrain.server.process`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from starlette.websockets import WebSocket

from callbrain.agent import Agent
from callbrain.call.control import CallHook
from callbrain.call.conversation import build_chat_request, render_template
from callbrain.call.record import Observers
from callbrain.call.session import CLOSE_INTERNAL_ERROR, CallSession
from callbrain.errors import AgentConfigError
from callbrain.extras import MissingExtraError
from callbrain.llm import LLM, ChatRequest, LLMError, create_llms
from callbrain.logs import call_id_var
from callbrain.records import open_recorder
from callbrain.retell.frames import Utterance
from callbrain.server.transport import StarletteTransport
from callbrain.stores import GuardedStore, Store, open_store
from callbrain.tools.idempotency import ResultStore
from callbrain.tools.runner import Toolbox

logger = logging.getLogger("callbrain.server")

CLOSE_TRY_AGAIN_LATER = 1013


def _build_llm(agent: Agent) -> LLM:
    """The agent's model client (and its fallbacks), or the configuration error."""
    try:
        return create_llms([agent.llm, *agent.fallback_llms])
    except (ValueError, LLMError, MissingExtraError) as exc:
        raise AgentConfigError(f"agent {agent.name!r}: llm: {exc}") from exc


class AgentRuntime:
    """The shared state of one agent's calls (see the module docstring)."""

    def __init__(
        self,
        agent: Agent,
        llm: LLM | None = None,
        store: Store | None = None,
        observers: Observers | None = None,
    ) -> None:
        self.agent = agent
        settings = agent.server.store
        self.backend: Store = store or open_store(
            settings.redis_url,
            prefix=settings.redis_prefix,
            max_bytes=int(settings.max_memory_mb * 2**20),
        )
        self._owns_store = store is None
        self.store = GuardedStore(self.backend, ttl_s=settings.ttl_s, timeout_s=settings.timeout_s)
        self.toolbox = Toolbox(agent.build_tools(), ResultStore(self.store))
        self.observers = observers or Observers()
        self.recorder = open_recorder(agent.server.records)
        """The call records observer (None with ``server.records: false``)."""
        if self.recorder is not None:
            self.observers.observers.append(self.recorder)
        self._owns_llm = llm is None
        self.llm = llm if llm is not None else _build_llm(agent)
        self._ready = False
        self._lock = asyncio.Lock()
        self.sessions: set[CallSession] = set()
        self.active_calls = 0
        """Sockets admitted and not yet closed (counted from before the model is ready)."""
        self.draining = False
        """Set by :meth:`drain`: health turns 503 and new calls are refused."""
        self.idle = asyncio.Event()
        """Set while no call is in progress."""
        self.idle.set()

    async def start(self) -> LLM:
        """Check the store and load the model: a server that cannot serve calls
        fails here, at start-up, not on its first call."""
        await self.backend.ping()
        if self.recorder is not None:
            await self.recorder.start()
        return await self.get_llm()

    async def get_llm(self) -> LLM:
        """The model, warmed up once (by the first caller; the others wait)."""
        if not self._ready:
            async with self._lock:
                if not self._ready:
                    await self.llm.warmup(self._typical_request())
                    self._ready = True
        return self.llm

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

    async def serve_call(
        self,
        websocket: WebSocket,
        call_id: str,
        on_call_start: CallHook | None = None,
        *,
        tags: dict[str, Any] | None = None,
    ) -> None:
        """Serve one call socket that its route has admitted (the agent's route
        after the access guard, or the console's playground after its login),
        from ``accept`` to the close. ``tags`` go on the call's record."""
        token = call_id_var.set(call_id)
        if self.draining:
            logger.warning("refused a call: the server is shutting down")
            self.observers.socket_refused("draining")
            await websocket.close(CLOSE_TRY_AGAIN_LATER)  # before accept: HTTP 403
            call_id_var.reset(token)
            return
        self.call_opened()
        try:
            await websocket.accept()
            try:
                model = await self.get_llm()
            except Exception:
                logger.exception("cannot start the model for this call")
                await websocket.close(CLOSE_INTERNAL_ERROR)
                return
            session = CallSession(
                self.agent,
                model,
                StarletteTransport(websocket),
                call_id,
                toolbox=self.toolbox,
                on_call_start=on_call_start,
                limits=self.agent.server.access,
                store=self.store,
                observers=self.observers,
                tags=tags,
            )
            self.sessions.add(session)
            try:
                await session.run()
            finally:
                self.sessions.discard(session)
        finally:
            self.call_closed()
            call_id_var.reset(token)

    def call_opened(self) -> None:
        """A socket was admitted (before its session exists: the model may still load)."""
        self.active_calls += 1
        self.idle.clear()

    def call_closed(self) -> None:
        self.active_calls -= 1
        if self.active_calls == 0:
            self.idle.set()

    async def drain(self, timeout: float, *, grace: float = 10.0) -> int:
        """Stop taking calls; let those in progress go on for up to ``timeout`` s,
        then finish their open turns (each may take ``grace`` s more to end by
        itself). Returns how many calls were still up; their sockets stay open
        for the caller to close or drop."""
        self.draining = True
        logger.info("draining: %d call(s) in progress, up to %.0f s", len(self.sessions), timeout)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.idle.wait()
        left = list(self.sessions)
        if left:
            logger.info("drain time is up; finishing the open turns of %d call(s)", len(left))
            await asyncio.gather(*(s.finish_turns(grace) for s in left))
        return len(left)

    async def aclose(self) -> None:
        if self._owns_llm:
            await self.llm.aclose()
        await self.toolbox.aclose()
        if self._owns_store:
            await self.backend.aclose()
        if self.recorder is not None:
            await self.recorder.aclose()
