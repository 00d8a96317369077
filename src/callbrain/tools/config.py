"""Tools as declared in an agent file, and how each declaration becomes a :class:`Tool`.

Every entry has a ``type``::

    tools:
      - type: python                 # a Python function, sync or async
        function: my_clinic.tools:book_appointment
        side_effects: true           # never run twice for the same arguments
      - type: http                   # a webhook: POST the arguments as JSON
        name: lookup_patient
        description: Find the caller's patient record.
        url: https://example.com/hooks/lookup
        secret: ${LOOKUP_SECRET}
        parameters: {type: object, properties: {phone: {type: string}}}
      - type: transfer_call
        number: "+14155550100"
      - type: end_call

Declarations are checked when the agent is loaded (unknown keys, bad numbers);
references to code are imported when the server starts, so a typo fails the
start-up, not a live call. A ``module:function`` reference is looked up beside
the agent file first, then on the Python import path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from callbrain.errors import describe
from callbrain.retell.actions import E164
from callbrain.tools.base import Tool
from callbrain.tools.builtin import EndCallTool, PressDigitTool, TransferCallTool


class _Settings(BaseModel):
    """Execution settings any tool may override."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float | None = Field(default=None, gt=0)
    """Seconds before the run is abandoned and the model told so (default 10)."""
    side_effects: bool | None = None
    """It changes the world: run once per call and arguments (idempotent)."""
    holding_message: str | None = None
    """Said first when the model calls it without a word; "" for none."""
    instant: bool | None = None
    """Returns at once: no holding line, no filler."""

    def overrides(self) -> dict[str, Any]:
        """The settings this declaration sets (subclasses' own fields excluded)."""
        return {
            key: value
            for key in _Settings.model_fields
            if (value := getattr(self, key)) is not None
        }


class PythonToolConfig(_Settings):
    type: Literal["python"]
    """A Python function, sync or async."""
    function: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    """``package.module:function``, looked up beside the agent file first, then on the
    Python import path; the function's signature and docstring give the schema."""
    name: str | None = None
    """The name the model calls it by; default: the function's."""
    description: str | None = None
    """What the model is told it does; default: the docstring's summary."""


class HttpToolConfig(_Settings):
    type: Literal["http"]
    """A webhook: the arguments are POSTed as JSON; the response body is the result."""
    name: str
    """The name the model calls it by."""
    description: str
    """What the model is told it does."""
    url: str = Field(pattern=r"^https?://")
    """Where the arguments are POSTed."""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    """JSON schema of the arguments the model must send."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Sent with every request (``${ENV}`` for tokens)."""
    secret: str | None = None
    """Signs each request so the receiver can tell it came from this agent."""


class EndCallConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["end_call"]
    """Hang up, after the turn's words have been spoken."""
    name: str = "end_call"
    """The name the model calls it by."""
    description: str | None = None
    """What the model is told it does; a sensible default when left out."""
    message: str = "Thanks for calling. Goodbye!"
    """Said before hanging up when the model has not said goodbye itself."""


class TransferCallConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["transfer_call"]
    """Cold-transfer the call to a phone number."""
    number: str = Field(pattern=E164.pattern)
    """E.164, e.g. ``+14155550100`` (Retell transfers to Retell or imported numbers only)."""
    name: str = "transfer_call"
    """The name the model calls it by."""
    description: str | None = None
    """What the model is told it does; a sensible default when left out."""
    message: str = "Let me transfer you now."
    """Said before the transfer when the model has said nothing itself."""
    show_transferee_as_caller: bool = False
    """The person transferred to sees the caller's number instead of the agent's."""
    no_interruption_allowed: bool = True
    """The caller cannot talk over the transfer line."""


class PressDigitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["press_digit"]
    """Press DTMF digits (to get through a phone menu)."""
    name: str = "press_digit"
    """The name the model calls it by."""
    description: str | None = None
    """What the model is told it does; a sensible default when left out."""
    message: str = ""
    """Said before the digits are pressed."""


ToolConfig = Annotated[
    PythonToolConfig | HttpToolConfig | EndCallConfig | TransferCallConfig | PressDigitConfig,
    Field(discriminator="type"),
]


def build_tool(config: ToolConfig, *, folder: Path | None = None) -> Tool:
    """The :class:`Tool` a declaration describes (imports Python references,
    looked up in ``folder``, the agent file's, first)."""
    if isinstance(config, PythonToolConfig):
        from callbrain.tools.function import function_tool_from_ref

        named = {"name": config.name, "description": config.description}
        overrides = {k: v for k, v in named.items() if v is not None}
        return function_tool_from_ref(
            config.function, folder=folder, **overrides, **config.overrides()
        )
    if isinstance(config, HttpToolConfig):
        from callbrain.tools.http import HttpTool

        return HttpTool(
            name=config.name,
            description=config.description,
            url=config.url,
            parameters=config.parameters,
            headers=config.headers,
            secret=config.secret,
            **config.overrides(),
        )
    described = {"description": config.description} if config.description else {}
    if isinstance(config, EndCallConfig):
        return EndCallTool(name=config.name, message=config.message, **described)
    if isinstance(config, TransferCallConfig):
        return TransferCallTool(
            number=config.number,
            name=config.name,
            message=config.message,
            show_transferee_as_caller=config.show_transferee_as_caller,
            no_interruption_allowed=config.no_interruption_allowed,
            **described,
        )
    return PressDigitTool(name=config.name, message=config.message, **described)


_CONFIG: TypeAdapter[ToolConfig] = TypeAdapter(ToolConfig)


def build_tools(
    entries: Sequence[ToolConfig | Tool | Mapping[str, Any]], *, folder: Path | None = None
) -> dict[str, Tool]:
    """Every tool by name; a name used twice is an error (the model could not tell them apart).
    Python references are looked up in ``folder`` (the agent file's) first.

    Plain mappings are validated here too: ``Agent.model_copy(update=...)`` does
    not validate, so a declaration can arrive as the dict it was written as.
    """
    tools: dict[str, Tool] = {}
    for entry in entries:
        if isinstance(entry, Mapping):
            try:
                entry = _CONFIG.validate_python(entry)
            except ValidationError as exc:
                problems = describe(exc, PythonToolConfig)
                raise ValueError(f"invalid tool declaration {dict(entry)!r}: {problems}") from None
        tool = entry if isinstance(entry, Tool) else build_tool(entry, folder=folder)
        if tool.name in tools:
            raise ValueError(f"two tools are named {tool.name!r}; tool names must be unique")
        tools[tool.name] = tool
    return tools
