"""What a tool is, what it gets when it runs, and how its result reaches the model.

A :class:`Tool` has a name, a description and a JSON schema for its arguments
(what the model sees, as a :class:`~callbrain.llm.ToolSpec`), plus the settings
the execution loop needs: a timeout, whether it has side effects (and so must
not run twice for the same arguments), and what the agent says while it runs.

Implementations override :meth:`Tool.run`. Everything else (argument repair and
validation, timeouts, idempotency, Retell's bookkeeping frames) happens once,
in :mod:`callbrain.tools.runner`, for every kind of tool.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from callbrain.call.control import CallControl
from callbrain.llm.chat import ToolSpec
from callbrain.retell.actions import Action, TurnActions

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What OpenAI and Anthropic both accept as a tool name."""

DEFAULT_TIMEOUT_S = 10.0


class ToolError(Exception):
    """Raise from a tool to report a failure the model should know about.

    The message goes to the model (and to Retell's transcript), never to the
    caller's ear directly; the model decides what to say. Write it for the model:
    "No slots left on Friday" helps it recover, a traceback does not.
    """


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a running tool may know about and do to its call.

    Declare a parameter annotated ``ToolContext`` on a Python tool to receive it;
    it is never part of the schema the model sees.
    """

    call_id: str
    tool_call_id: str
    variables: Mapping[str, str]
    """The call's template variables (agent defaults, call fields, dynamic variables)."""
    call: CallControl
    """Call-wide control: speak unprompted, update_agent, metadata."""
    turn: TurnActions = field(default_factory=TurnActions)

    def end_call(self, message: str = "") -> None:
        """Hang up once this turn's content, ending with ``message``, has been spoken."""
        self.request_action(Action("end_call", message=message))

    def transfer(
        self, number: str, *, message: str = "", show_transferee_as_caller: bool = False
    ) -> None:
        """Cold-transfer to ``number`` (E.164, a str such as ``"+14155550100"``) once
        this turn, ending with ``message``, has been spoken.

        Raises ValueError at once for a number that is not E.164 (an int, say).
        """
        self.request_action(
            Action(
                "transfer",
                message=message,
                transfer_number=number,
                show_transferee_as_caller=show_transferee_as_caller,
            )
        )

    def press_digit(self, digits: str, *, message: str = "") -> None:
        """Send DTMF ``digits`` (a str of 0-9, * and #) once this turn, ending with
        ``message``, has been spoken. Raises ValueError at once for anything else."""
        self.request_action(Action("press_digit", message=message, digits=digits))

    def request_action(self, action: Action) -> None:
        """Ask for ``action`` after this turn (the highest-ranked of several wins)."""
        self.turn.request(action, by=self.tool_call_id)

    def no_interruption(self) -> None:
        """The rest of this turn cannot be interrupted by the caller."""
        self.turn.no_interruption_allowed = True


class Tool(ABC):
    """A tool the model can call. Subclasses set the fields and implement :meth:`run`."""

    def __init__(
        self,
        *,
        name: str,
        description: str,
        parameters: Mapping[str, Any] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        side_effects: bool = False,
        holding_message: str | None = None,
        instant: bool = False,
    ) -> None:
        if not TOOL_NAME.match(name):
            raise ValueError(
                f"tool name {name!r}: use 1-64 letters, digits, '_' or '-' "
                "(what OpenAI and Anthropic accept)"
            )
        if timeout_s <= 0:
            raise ValueError(f"tool {name!r}: timeout_s must be positive")
        schema = dict(parameters or {"type": "object", "properties": {}})
        from callbrain.tools.arguments import check_schema  # it imports this module

        try:
            check_schema(schema)
        except ValueError as exc:
            # The tool author's mistake: fail at start-up, not on a live call.
            raise ValueError(f"tool {name!r}: invalid parameters schema: {exc}") from None
        self.name = name
        self.description = description
        self.parameters: dict[str, Any] = schema
        self.timeout_s = timeout_s
        self.side_effects = side_effects
        """Changes the world (books, charges, sends): never run twice for the same
        arguments in one call; a repeat gets the first run's result."""
        self.holding_message = holding_message
        """Said before the tool runs when the model said nothing first; None picks
        one of the agent's varied default lines."""
        self.instant = instant
        """Returns at once: no holding line, no filler."""

    @property
    def spec(self) -> ToolSpec:
        """The tool as the model sees it."""
        return ToolSpec(self.name, self.description, self.parameters)

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Check parsed arguments; raise :class:`ToolError` with what is wrong.

        The default checks them against :attr:`parameters` (JSON schema);
        subclasses with typed signatures validate and convert instead.
        """
        from callbrain.tools.arguments import validate_against_schema

        validate_against_schema(arguments, self.parameters)
        return arguments

    @abstractmethod
    async def run(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        """Do the work. Return a string or anything JSON-serialisable; raise
        :class:`ToolError` for a failure the model should hear about."""

    async def aclose(self) -> None:  # noqa: B027 (optional hook)
        """Release clients the tool holds; called when the server stops."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def result_text(value: Any) -> str:
    """A tool's return value as the text the model and Retell receive."""
    if value is None:
        return "done"
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value, default=_jsonable).decode()
    except TypeError:
        return str(value)


def _jsonable(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump):
        return dump(mode="json")
    raise TypeError
