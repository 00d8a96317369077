"""What one agent's calls share: its tools, its model client, the store, the
observers, and the sessions in progress (which is what a drain works on). A
server of several agents has a runtime each, sharing the store and observers.

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
from callbrain.call.variables import call_variables, turn_variables
from callbrain.errors import AgentConfigError, StartupError
from callbrain.extras import MissingExtraError
from callbrain.llm import LLM, ChatRequest, LLMConfig, LLMError, create_llm
from callbrain.llm.failover import FailoverLLM
from callbrain.logs import call_id_var
from callbrain.records.recorder import CallRecorder
from callbrain.retell.frames import Utterance
from callbrain.server.settings import ServerSettings
from callbrain.server.transport import StarletteTransport
from callbrain.stores import GuardedStore, Store, open_store
from callbrain.tools.idempotency import ResultStore
from callbrain.tools.runner import Toolbox

logger = logging.getLogger("callbrain.server")

CLOSE_TRY_AGAIN_LATER = 1013


def llm_entries(agent: Agent) -> list[tuple[str, LLMConfig]]:
    """The agent's models in order of preference, each with its key in the file."""
    fallbacks = [(f"fallback_llms[{i}]", c) for i, c in enumerate(agent.fallback_llms)]
    return [("llm", agent.llm), *fallbacks]


def build_llm(key: str, config: LLMConfig, source: str) -> LLM:
    """One model client, or the configuration error naming ``source`` and ``key``
    (a missing API key names the variable to set, a missing model file the file)."""
    try:
        return create_llm(config)
    except (ValueError, LLMError, MissingExtraError) as exc:
        # The providers' messages name the primary's keys (llm.api_key); a fallback's
        # are its own.
        message = str(exc) if key == "llm" else str(exc).replace("llm.", f"{key}.")
        raise AgentConfigError(f"{source}: {key}: {message}") from exc


def _build_llm(agent: Agent) -> LLM:
    """The agent's model client, behind a failover when it has fallbacks."""
    llms = [build_llm(key, config, agent.source) for key, config in llm_entries(agent)]
    return llms[0] if len(llms) == 1 else FailoverLLM(llms)


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class AgentRuntime:
    """The shared state of one agent's calls (see the module docstring)."""

    def __init__(
        self,
        agent: Agent,
        llm: LLM | None = None,
        store: Store | None = None,
        observers: Observers | None = None,
        *,
        settings: ServerSettings | None = None,
        recorder: CallRecorder | None = None,
    ) -> None:
        """``settings``: the process's ``server:`` block, when it serves several
        agents (default: this agent's own). ``recorder``: the process's call
        records, which the app owns (it is one of ``observers``)."""
        self.agent = agent
        self.settings = settings or agent.server
        stored = self.settings.store
        self.backend: Store = store or open_store(
            stored.redis_url,
            prefix=stored.redis_prefix,
            max_bytes=int(stored.max_memory_mb * 2**20),
            path=stored.path,
        )
        self._owns_store = store is None
        self.store = GuardedStore(self.backend, ttl_s=stored.ttl_s, timeout_s=stored.timeout_s)
        self.toolbox = Toolbox(agent.build_tools(), ResultStore(self.store))
        self.observers = observers or Observers()
        self.recorder = recorder
        """The call records observer (None with ``server.records: false``)."""
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
        fails here, at start-up, not on its first call, with a
        :class:`~callbrain.errors.StartupError` saying which of the two it was."""
        where = self.agent.source
        try:
            await self.backend.ping()
        except Exception as exc:
            stored = self.settings.store
            store = (
                "server.store.redis_url"
                if stored.redis_url
                else f"the store file {stored.path}"
                if stored.path
                else "the store"
            )
            raise StartupError(f"{where}: {store} does not answer: {_said(exc)}") from exc
        try:
            return await self.get_llm()
        except Exception as exc:
            raise StartupError(f"{where}: the model did not start: {_said(exc)}") from exc

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
        variables = turn_variables(
            call_variables(self.agent.dynamic_variables, "", None), None, self.agent.zone
        )
        greeting, _ = render_template(self.agent.begin_message, variables)
        request, _ = build_chat_request(
            system_prompt=self.agent.system_prompt,
            transcript=[Utterance(role="agent", content=greeting)] if greeting.strip() else [],
            variables=variables,
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
                limits=self.settings.access,
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
