"""An agent: what it says, how it behaves on the call, and which model is its brain.

One YAML file per agent, or the same :class:`Agent` built in Python. Unknown
keys are errors, not silently ignored, because a misspelt ``begin_mesage`` would
otherwise give a mute agent on a live phone line.

String values may reference the environment as ``${NAME}`` or
``${NAME:-default}``, so secrets stay out of the file.
"""

from __future__ import annotations

import difflib
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    InstanceOf,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from callbrain.call.speculation import SpeculationSettings
from callbrain.errors import AgentConfigError, problems
from callbrain.llm.config import LLMConfig, LocalConfig
from callbrain.server.settings import ServerSettings
from callbrain.tools.base import Tool
from callbrain.tools.config import ToolConfig, build_tools

DEFAULT_HOLDING_MESSAGES = (
    "One moment.",
    "Let me check that.",
    "Just a second.",
    "Let me look that up.",
)
DEFAULT_FILLER_MESSAGE = "Thanks for waiting, this is taking a little longer than usual."

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


DEFAULT_REMINDER_PROMPT = (
    "(The caller has been silent for a while. Check in with one short, friendly sentence, "
    "such as asking whether they are still there. Do not answer a question nobody asked.)"
)

__all__ = ["Agent", "AgentConfigError", "RetellConfig", "example_agent_path"]


class RetellConfig(BaseModel):
    """The ``config`` frame sent first on every socket."""

    model_config = ConfigDict(extra="forbid")

    auto_reconnect: bool = True
    """Retell pings every 2 s and reconnects if we stop answering."""
    call_details: bool = True
    """Retell sends the call object (numbers, dynamic variables) right after connect."""
    transcript_with_tool_calls: bool = False
    """Retell sends its transcript with the tool calls woven in; the model then reads
    the calls from it instead of from callbrain's own record of the call."""


class Agent(BaseModel):
    """Everything callbrain needs to run one kind of call."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="agent", min_length=1)
    """Shown in logs, ``/healthz`` and the metrics; with several agents in one server,
    part of each one's URL (``/llm-websocket/agent/<name>``), so unique."""
    system_prompt: str = "You are a helpful, friendly phone agent. Keep every answer short."
    """Rendered with the call's dynamic variables, e.g. ``{{customer_name}}``."""
    begin_message: str = ""
    """Spoken first (templated like the system prompt); empty lets the caller speak first."""
    reminder_prompt: str = DEFAULT_REMINDER_PROMPT
    """Instruction for ``reminder_required``: a short check-in, not a new answer."""
    fallback_message: str = "Sorry, I'm having a little trouble. Could you say that again?"
    """Spoken when the model fails or times out; never the raw error."""
    dynamic_variables: dict[str, str] = Field(default_factory=dict)
    """Defaults for template variables; the built-in ones (``{{current_time}}``,
    ``{{caller_number}}``...) and the call's own dynamic variables win (see
    :mod:`callbrain.call.variables`)."""
    timezone: str = "UTC"
    """IANA time zone (``Europe/London``) of ``{{current_time}}``, ``{{current_date}}``
    and ``{{current_weekday}}``."""
    wait_for_call_details: bool = False
    """Hold the begin message until ``call_details`` arrives (for a templated greeting)."""
    call_details_timeout_s: float = Field(default=2.0, gt=0, le=6)
    """Greet anyway after this long, so the agent is never mute (Retell gives up at 7 s)."""
    max_history_messages: int = Field(default=40, ge=1)
    """Only the latest this many messages of the transcript go to the model."""
    tools: list[ToolConfig | InstanceOf[Tool]] = Field(default_factory=list)
    """Declarations (see :mod:`callbrain.tools.config`) or :class:`~callbrain.tools.Tool`
    objects, e.g. functions decorated with :func:`~callbrain.tools.tool`."""
    max_tool_steps: int = Field(default=5, ge=1, le=20)
    """Rounds of tool calls per turn; past it the fallback line ends the turn."""
    holding_messages: list[str] = Field(default_factory=lambda: list(DEFAULT_HOLDING_MESSAGES))
    """Said in turn when the model calls a tool without a word first; [] for silence."""
    tool_filler_after_s: float | None = Field(default=3.0, gt=0)
    """Tools still running after this long get one filler line; null for never."""
    tool_filler_message: str = DEFAULT_FILLER_MESSAGE
    """The filler line for slow tools."""
    retell_config: RetellConfig = Field(default_factory=RetellConfig)
    """The ``config`` frame sent to Retell first on every socket."""
    server: ServerSettings = Field(default_factory=ServerSettings)
    """Access control, limits, webhooks and shutdown (see :mod:`callbrain.server.settings`)."""
    llm: LLMConfig = Field(default_factory=lambda: LocalConfig(provider="local"))
    """The model: ``provider`` says which backend, and which other keys apply."""
    fallback_llms: list[LLMConfig] = Field(default_factory=list)
    """Tried in order when ``llm`` (or the one before) fails before its first chunk:
    a connection error, 429, 5xx, a missed first-token deadline or a stream it
    cannot read (docs/providers.md). Only the last provider tried uses its SDK
    retries; the ones before it fail over at once."""
    first_token_filler_after_s: float | None = Field(default=2.0, gt=0)
    """No word from the model after this long: say ``first_token_filler_message``
    once, so the caller knows the line is alive. null for never."""
    first_token_filler_message: str = "One moment."
    """Said once when the model is slow to start (``first_token_filler_after_s``)."""
    max_response_chars: int = Field(default=1500, ge=20)
    """A response is cut (and completed) once this much has been said: about two
    minutes of speech, so only a model that never stops reaches it."""
    max_response_s: float = Field(default=60.0, gt=0)
    """Likewise for time: no response streams for longer than this."""
    frame_coalesce_ms: float = Field(default=25.0, ge=0, le=200)
    """After a turn's first frame (always sent at once), text deltas arriving
    within this long of each other share one frame: fewer socket writes, the same
    words. 0: a frame per delta."""
    speculation: SpeculationSettings = Field(default_factory=SpeculationSettings)
    """Start the model on the caller's finished sentence, before Retell asks
    (see :mod:`callbrain.call.speculation`)."""

    _folder: Path | None = PrivateAttr(default=None)
    _source: str | None = PrivateAttr(default=None)

    @property
    def folder(self) -> Path | None:
        """The agent file's folder, where its ``module:function`` references are looked
        up first; None for an agent built in Python or from text without one."""
        return self._folder

    @property
    def source(self) -> str:
        """Where the agent came from, for messages: its file, or its name."""
        return self._source or f"agent {self.name!r}"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            close = difflib.get_close_matches(name, available_timezones(), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "e.g. Europe/London, UTC"
            raise ValueError(f"unknown time zone {name!r} ({hint})") from None
        return name

    @property
    def zone(self) -> ZoneInfo:
        """:attr:`timezone` as a ``ZoneInfo`` (zoneinfo keeps one per name)."""
        return ZoneInfo(self.timezone)

    @model_validator(mode="after")
    def _details_needed(self) -> Agent:
        if self.wait_for_call_details and not self.retell_config.call_details:
            raise ValueError(
                "wait_for_call_details needs retell_config.call_details: true "
                "(otherwise Retell never sends them)"
            )
        return self

    def build_tools(self) -> dict[str, Tool]:
        """The agent's tools by name, importing any Python references now.

        Raises :class:`AgentConfigError` naming the tool for a reference that does
        not import, a function that cannot be a tool, or a name used twice.
        """
        try:
            return build_tools(self.tools, folder=self.folder)
        except (ValueError, TypeError) as exc:
            raise AgentConfigError(f"{self.source}: tools: {exc}") from exc

    @classmethod
    def from_yaml(cls, path: str | Path) -> Agent:
        """Load an agent file, expanding ``${ENV}`` references."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AgentConfigError(f"{path}: cannot read agent file: {exc.strerror}") from None
        return cls.from_yaml_text(text, source=str(path), folder=path.parent)

    @classmethod
    def from_yaml_text(
        cls, text: str, *, source: str = "<agent>", folder: str | Path | None = None
    ) -> Agent:
        """An agent file's text; ``folder`` is where its ``module:function``
        references are looked up first (as ``from_yaml`` does with the file's own)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise AgentConfigError(f"{source}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise AgentConfigError(
                f"{source}: expected a mapping of keys, got {type(data).__name__}"
            )
        return cls.from_dict(_expand_env(data, source, ()), source=source, folder=folder)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, source: str = "<agent>", folder: str | Path | None = None
    ) -> Agent:
        """An agent from the mapping an agent file holds. Each problem is one line
        naming ``source`` and the key (``clinic.yaml: llm: unknown key 'temprature'
        (did you mean 'temperature'?)``)."""
        try:
            agent = cls.model_validate(data)
        except ValidationError as exc:
            lines = [f"{source}: {problem}" for problem in problems(exc, cls)]
            raise AgentConfigError("\n".join(lines)) from None
        agent._folder = None if folder is None else Path(folder).resolve()
        agent._source = None if source == "<agent>" else source
        return agent


def example_agent_path() -> Path:
    """The clinic receptionist agent that ships with the package."""
    return Path(str(resources.files("callbrain.examples").joinpath("clinic.yaml")))


def _expand_env(value: Any, source: str, where: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, source, (*where, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, source, (*where, str(i))) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is not None:
            return found
        if default is not None:
            return default
        raise AgentConfigError(
            f"{source}: {'.'.join(where)} refers to ${{{name}}}, which is not set "
            f"(set it, or write ${{{name}:-default}})"
        )

    return _ENV_REF.sub(substitute, value)
