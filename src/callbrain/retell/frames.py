"""Retell's Custom LLM WebSocket protocol: every frame, typed. Pure: no I/O.

Inbound frames (Retell to us) are parsed leniently, because real traffic varies
from the documented shape: unknown fields and utterance roles, ``words`` arrays,
missing optional fields, a stray ``timestamp`` on requests. Outbound frames (us to
Retell) are strict, because Retell silently drops a frame with a wrong JSON type
(``"content_complete": "true"``) and a silent drop means dead air on a phone
line: every outbound model forbids unknown fields, refuses type coercion and is
serialised without nulls.

Two things are bounded at parse time, so that no frame can cost more than it
is worth: the nesting of the free-form objects (the ``call`` object, the woven
transcript), which Retell fills from the caller's own data, and the
``words`` timing arrays, which nothing here reads and so are never turned into
objects (they are most of a long transcript's bytes).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from callbrain.errors import describe

# --------------------------------------------------------------------------- inbound

MAX_ID = 2**63 - 1
"""Ids and timestamps go back out in our frames: no larger than JSON encoders carry.
They are strict integers too: a lax "5" or 5.0 or true would be answered under an
id Retell never sent."""

PING_INTERVAL_S = 2.0
"""How often Retell pings when ``auto_reconnect`` is on."""

MAX_NESTING = 32
"""Deepest nesting accepted inside the free-form objects of a frame (the ``call``
object and its dynamic variables, ``transcript_with_tool_calls``). Retell's own
objects are a few levels deep; a deeper one is refused like any malformed
frame, before it can exhaust the stack of whatever walks it later (the
validator, a template, the JSON encoder that saves the call for a reconnect,
whose limit is 254)."""

Id = Annotated[int, Field(strict=True, ge=0, le=MAX_ID)]
"""A ``response_id``, ``interrupt_id`` or ping ``timestamp``: a strict JSON integer."""


class _Inbound(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Utterance(_Inbound):
    """One transcript entry. Any role that is not ``agent`` counts as the caller's side.

    Retell's per-word timings (``words``) are ignored: nothing reads them, and
    at about twelve bytes a word they are most of what a long transcript costs
    to parse.
    """

    role: str
    content: str = ""

    @field_validator("content", mode="before")
    @classmethod
    def _none_is_empty(cls, value: object) -> object:
        return "" if value is None else value

    @property
    def is_agent(self) -> bool:
        return self.role == "agent"


class PingPong(_Inbound):
    """Keep-alive, every 2 s when ``auto_reconnect`` is on; echo ``timestamp`` at once."""

    interaction_type: Literal["ping_pong"]
    timestamp: Id
    """Echoed as is, so it must be an integer JSON can carry back (not "5", 5.0, true)."""


class CallDetails(_Inbound):
    """The call object, sent right after connect when ``config.call_details`` is on."""

    interaction_type: Literal["call_details"]
    call: dict[str, Any]

    @property
    def dynamic_variables(self) -> dict[str, str]:
        """``retell_llm_dynamic_variables``; values become strings, as Retell types them."""
        return dynamic_variables(self.call)


def dynamic_variables(call: dict[str, Any]) -> dict[str, str]:
    """A call object's ``retell_llm_dynamic_variables``, values as strings."""
    raw = call.get("retell_llm_dynamic_variables")
    if not isinstance(raw, dict):
        return {}
    return {str(k): v if isinstance(v, str) else str(v) for k, v in raw.items() if v is not None}


class _WithTranscript(_Inbound):
    transcript: list[Utterance] = Field(default_factory=list)
    transcript_with_tool_calls: list[dict[str, Any]] | None = None


class UpdateOnly(_WithTranscript):
    """The transcript changed or the turn moved; no reply is expected."""

    interaction_type: Literal["update_only"]
    turntaking: str | None = None


class ResponseRequired(_WithTranscript):
    """Retell wants the agent's answer, under ``response_id``."""

    interaction_type: Literal["response_required"]
    response_id: Id


class ReminderRequired(_WithTranscript):
    """The caller has been silent; Retell wants a short check-in under ``response_id``."""

    interaction_type: Literal["reminder_required"]
    response_id: Id


InboundFrame = PingPong | CallDetails | UpdateOnly | ResponseRequired | ReminderRequired
TurnRequest = ResponseRequired | ReminderRequired

_INBOUND: dict[str, type[InboundFrame]] = {
    "ping_pong": PingPong,
    "call_details": CallDetails,
    "update_only": UpdateOnly,
    "response_required": ResponseRequired,
    "reminder_required": ReminderRequired,
}


class FrameError(ValueError):
    """An inbound frame could not be used. The message is safe to log (no frame content)."""


class UnknownInteraction(FrameError):
    """A well-formed frame with an ``interaction_type`` this version does not know."""

    def __init__(self, interaction_type: str) -> None:
        shown = interaction_type if len(interaction_type) <= 40 else interaction_type[:40] + "..."
        super().__init__(f"unknown interaction_type {shown!r}")
        self.interaction_type = interaction_type


def parse_inbound(raw: str | bytes) -> InboundFrame:
    """Parse one text frame from Retell.

    Raises :class:`UnknownInteraction` for a frame type we do not know (log and
    ignore it) and :class:`FrameError` for anything malformed. Never raises
    anything else, whatever the input.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FrameError(f"expected a JSON object, got {type(data).__name__}")
    itype = data.get("interaction_type")
    if not isinstance(itype, str):
        raise FrameError("missing or non-string interaction_type")
    model = _INBOUND.get(itype)
    if model is None:
        raise UnknownInteraction(itype)
    for key in ("call", "transcript_with_tool_calls"):
        if key in data and _too_deep(data[key], MAX_NESTING):
            raise FrameError(f"invalid {itype} frame: {key} nested deeper than {MAX_NESTING}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise FrameError(f"invalid {itype} frame: {describe(exc, model)}") from None


def _too_deep(value: object, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` deep.

    Iterative, so the check itself cannot run out of stack, and it stops at
    the first branch that is too deep.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


# -------------------------------------------------------------------------- outbound


class _Outbound(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ConfigFlags(_Outbound):
    """Per-socket switches; any left unset are omitted and take Retell's default (off)."""

    auto_reconnect: bool | None = None
    call_details: bool | None = None
    transcript_with_tool_calls: bool | None = None


class ConfigFrame(_Outbound):
    response_type: Literal["config"] = "config"
    config: ConfigFlags


class PingPongFrame(_Outbound):
    response_type: Literal["ping_pong"] = "ping_pong"
    timestamp: Id


class _Actions(_Outbound):
    """Call actions carried by spoken content; Retell runs at most one per response."""

    no_interruption_allowed: bool | None = None
    end_call: bool | None = None
    transfer_number: str | None = None
    digit_to_press: str | None = None

    @model_validator(mode="after")
    def _one_action(self) -> _Actions:
        chosen = (
            self.end_call is True,
            self.transfer_number is not None,
            self.digit_to_press is not None,
        )
        if sum(chosen) > 1:
            raise ValueError("end_call, transfer_number and digit_to_press are mutually exclusive")
        return self


class ResponseFrame(_Actions):
    """Content for ``response_id`` (0 is the begin message); ``content_complete`` ends it."""

    response_type: Literal["response"] = "response"
    response_id: Id
    content: str
    content_complete: bool
    show_transferee_as_caller: bool | None = None


class AgentInterruptFrame(_Actions):
    """The agent speaks unprompted; a new ``interrupt_id`` discards earlier interrupts."""

    response_type: Literal["agent_interrupt"] = "agent_interrupt"
    interrupt_id: Id
    content: str
    content_complete: bool


class AgentConfigUpdate(_Outbound):
    responsiveness: float | None = Field(default=None, ge=0, le=1)
    interruption_sensitivity: float | None = Field(default=None, ge=0, le=1)
    reminder_trigger_ms: float | None = Field(default=None, gt=0)
    reminder_max_count: int | None = Field(default=None, ge=0)


class UpdateAgentFrame(_Outbound):
    response_type: Literal["update_agent"] = "update_agent"
    agent_config: AgentConfigUpdate


class ToolCallInvocationFrame(_Outbound):
    response_type: Literal["tool_call_invocation"] = "tool_call_invocation"
    tool_call_id: str
    name: str
    arguments: str
    """The arguments as a JSON string, as Retell expects."""


class ToolCallResultFrame(_Outbound):
    response_type: Literal["tool_call_result"] = "tool_call_result"
    tool_call_id: str
    content: str
    successful: bool | None = None
    """Omitted means "not reported", not "failed"."""


class MetadataFrame(_Outbound):
    """Forwarded by Retell to a web call's frontend as a metadata event."""

    response_type: Literal["metadata"] = "metadata"
    metadata: dict[str, Any]


OutboundFrame = (
    ConfigFrame
    | PingPongFrame
    | ResponseFrame
    | AgentInterruptFrame
    | UpdateAgentFrame
    | ToolCallInvocationFrame
    | ToolCallResultFrame
    | MetadataFrame
)


def encode(frame: OutboundFrame) -> str:
    """Serialise an outbound frame to the text of one WebSocket text frame, without nulls."""
    return orjson.dumps(frame.model_dump(exclude_none=True)).decode()
