"""What a call knows beyond Retell's transcript, kept so a reconnect can go on.

With ``auto_reconnect`` Retell opens a *new* socket for the same call id after a
dropped connection, and behind a load balancer it may reach another instance.
Retell resends the transcript, but not what only we knew: the call object
(and its dynamic variables), the tool calls that ran and what they returned,
the ``agent_interrupt`` numbering and the turn-taking settings we changed. A
:class:`CallStore` keeps that :class:`CallMemory` under the call id; the
session saves it as it changes and loads it when a socket opens. Results of
side-effecting tools are kept separately, in the
:class:`~callbrain.tools.idempotency.IdempotencyStore`, which the same
backend provides (in memory here, Redis in :mod:`callbrain.redis_store`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from callbrain.conversation import ToolExchange
from callbrain.expiring import ExpiringDict
from callbrain.llm.chat import ToolCall, ToolOutput

CALL_TTL_S = 6 * 3600
"""How long a call's memory outlives its last change: longer than any call."""


@dataclass
class CallMemory:
    call: dict[str, Any] | None = None
    """The ``call`` object of ``call_details``."""
    tool_history: list[ToolExchange] = field(default_factory=list)
    interrupt_id: int = 0
    """The last ``agent_interrupt`` id sent, so a new socket does not reuse it."""
    agent_overrides: dict[str, Any] = field(default_factory=dict)
    """The ``update_agent`` settings sent, latest value of each."""

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "call": self.call,
                "interrupt_id": self.interrupt_id,
                "agent_overrides": self.agent_overrides,
                "tool_history": [
                    {
                        "anchor": e.anchor,
                        "call": [e.call.id, e.call.name, e.call.arguments],
                        "output": [e.output.content, e.output.is_error],
                    }
                    for e in self.tool_history
                ],
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> CallMemory:
        raw = orjson.loads(data)
        history = []
        for entry in raw.get("tool_history") or ():
            call_id, name, arguments = entry["call"]
            content, is_error = entry["output"]
            call = ToolCall(call_id, name, arguments)
            history.append(
                ToolExchange(entry["anchor"], call, ToolOutput(call_id, name, content, is_error))
            )
        return cls(
            call=raw.get("call"),
            tool_history=history,
            interrupt_id=int(raw.get("interrupt_id") or 0),
            agent_overrides=dict(raw.get("agent_overrides") or {}),
        )


class CallStore(Protocol):
    """Where calls' memories live, by call id."""

    async def load(self, call_id: str) -> CallMemory | None: ...

    async def save(self, call_id: str, memory: CallMemory) -> None: ...


class MemoryCallStore:
    """In this process, bounded and expiring: reconnects that come back to the
    same instance find their call (the usual case with one instance)."""

    def __init__(self, *, ttl_s: float = CALL_TTL_S, max_calls: int = 50_000) -> None:
        # Serialised, so a later change to the session's objects cannot leak in.
        self._calls: ExpiringDict[bytes] = ExpiringDict(ttl_s=ttl_s, max_entries=max_calls)

    async def load(self, call_id: str) -> CallMemory | None:
        data = self._calls.get(call_id)
        return None if data is None else CallMemory.from_json(data)

    async def save(self, call_id: str, memory: CallMemory) -> None:
        self._calls.put(call_id, memory.to_json())

    def __len__(self) -> int:
        return len(self._calls)
