"""Scenario files: one simulated call each, written in YAML.

A scenario says what the caller does (turns with their timing, barge-ins,
silences) and what must be true of the agent (phrases, tools, how the call
ends). The protocol itself is always checked (:mod:`callbrain.testing.checker`);
a scenario only adds what is specific to an agent. Unknown keys are errors, so
a misspelt expectation cannot silently pass::

    name: books a cleaning
    call:
      retell_llm_dynamic_variables: {first_name: Sam}
    greeting:
      said: [Sunrise Clinic]
    steps:
      - caller: I'd like a cleaning on Tuesday.
        speak_ms: 800
      - caller: Actually, make it Wednesday.
        interrupts: first_chunk
      - silence_ms: 4000
    expect:
      tools: [{name: book_appointment, arguments: {day: Wednesday}}]
      not_tools: [transfer_call]
      action: end_call
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from callbrain.errors import describe
from callbrain.testing.fake_llm import FakeToolCall, Reply


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolExpectation(_Strict):
    """A tool call the agent must make: its name and a subset of its arguments.

    String arguments match ignoring case and surrounding spaces, since models
    vary in both; nested objects match as subsets too.
    """

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Expect(_Strict):
    """What must be true of one turn (under a step) or of the whole call."""

    said: list[str] = Field(default_factory=list)
    """Phrases the agent must say (case-insensitive, anywhere in its text)."""
    not_said: list[str] = Field(default_factory=list)
    tools: list[str | ToolExpectation] = Field(default_factory=list)
    """Tools that must be called (from ``tool_call_invocation`` frames)."""
    not_tools: list[str] = Field(default_factory=list)
    action: Literal["end_call", "transfer", "press_digit", "none"] | None = None
    """The call action that must happen (``none``: no action at all)."""
    transfer_to: str | None = None
    digits: str | None = None
    """The digits pressed, in order."""
    ends_sentence: bool = False
    """The reply ends with a whole sentence (``.``, ``!``, ``?`` or ``…``, maybe
    then a closing quote), so it was not cut off mid-sentence. For the whole
    call: every reply that was not interrupted."""
    differs_from_previous: bool = False
    """(Steps only.) The reply is not the agent's previous reply again (the
    greeting, for the first step), ignoring case and spacing."""
    distinct_replies: bool = False
    """(Whole call only.) No two replies of the call are the same, ignoring
    case and spacing: the agent did not give one answer to different turns."""


class CallerTurn(_Strict):
    """The caller says ``caller``; Retell then asks for a response.

    The words arrive as ``update_only`` frames spread over ``speak_ms`` (one
    update if 0), then ``response_required``. The turn starts ``pause_ms``
    after the previous reply completed, or, with ``interrupts``, while that
    reply is still streaming: ``first_chunk`` right after its first text, a
    number that many milliseconds after its request.
    """

    caller: str
    speak_ms: int = Field(default=0, ge=0)
    pause_ms: int = Field(default=0, ge=0)
    interrupts: Literal["first_chunk"] | int | None = None
    expect: Expect | None = None

    @model_validator(mode="after")
    def _interrupts_is_positive(self) -> CallerTurn:
        if isinstance(self.interrupts, int) and self.interrupts < 0:
            raise ValueError("interrupts: milliseconds must be >= 0 (or 'first_chunk')")
        return self


class Silence(_Strict):
    """The caller says nothing for ``silence_ms``: Retell asks for a reminder."""

    silence_ms: int = Field(ge=0)
    expect: Expect | None = None


Step = CallerTurn | Silence


class ScriptedCall(_Strict):
    """A tool call in a scripted model reply."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ScriptedReply(_Strict):
    """One model answer, in order, when the scenario runs on a scripted model."""

    text: str = ""
    tool_calls: list[ScriptedCall] = Field(default_factory=list)
    ttft_ms: int = Field(default=0, ge=0)
    """Milliseconds before the first word."""
    chunk_ms: int = Field(default=0, ge=0)
    """Milliseconds between later words: a slow reply the caller can barge in on."""

    def to_reply(self) -> Reply:
        calls = [FakeToolCall(call.name, call.arguments) for call in self.tool_calls]
        return Reply(
            self.text, tool_calls=calls, ttft=self.ttft_ms / 1000, chunk_delay=self.chunk_ms / 1000
        )


class Scenario(_Strict):
    name: str = ""
    """Shown in the report; the file name if empty."""
    description: str = ""
    call: dict[str, Any] = Field(default_factory=dict)
    """The call object sent as ``call_details`` (when the server asks for it)."""
    pings: bool | None = None
    """Ping every 2 s; by default only when the server's config turns on
    ``auto_reconnect``, as Retell does."""
    greeting: Expect | None = None
    """Expectations on the begin message."""
    steps: list[Step] = Field(default_factory=list)
    expect: Expect = Field(default_factory=Expect)
    """Expectations on the whole call."""
    script: list[ScriptedReply] | None = None
    """Model replies in order. When ``callbrain test`` starts the agent itself,
    the agent's model is replaced by a fake that answers with these, so the
    scenario tests the agent's tools and flow without a model's variance. Against
    a URL the server's own model answers and the script is ignored."""
    reply_timeout_s: float = Field(default=20.0, gt=0)
    """How long to wait for a reply to complete before calling it incomplete."""
    greeting_timeout_s: float = Field(default=5.0, gt=0)
    """How long to wait for a begin message (a server need not send one)."""

    @model_validator(mode="after")
    def _first_step_cannot_interrupt(self) -> Scenario:
        first = self.steps[0] if self.steps else None
        if isinstance(first, CallerTurn) and first.interrupts is not None:
            raise ValueError("steps[0]: the first step has no reply to interrupt")
        return self

    @model_validator(mode="after")
    def _reply_comparisons_where_they_mean_something(self) -> Scenario:
        whole_call = "only for the whole call (under the top-level expect)"
        greeting = self.greeting or Expect()
        if greeting.differs_from_previous:
            raise ValueError("greeting.differs_from_previous: the greeting has no previous reply")
        if greeting.distinct_replies:
            raise ValueError(f"greeting.distinct_replies: {whole_call}")
        for index, step in enumerate(self.steps):
            if step.expect is not None and step.expect.distinct_replies:
                raise ValueError(f"steps[{index}].expect.distinct_replies: {whole_call}")
        if self.expect.differs_from_previous:
            raise ValueError(
                "expect.differs_from_previous: only under a step (for the whole call, "
                "distinct_replies)"
            )
        return self

    @property
    def call_id(self) -> str:
        return str(self.call.get("call_id") or "scenario-" + _slug(self.name))


def load_scenario(path: Path) -> Scenario:
    """Read one scenario file; :class:`ScenarioError` names what is wrong."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: expected a mapping at the top level")
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"{path}: {describe(exc, Scenario)}") from None
    return scenario if scenario.name else scenario.model_copy(update={"name": path.stem})


def find_scenarios(paths: list[Path]) -> list[Path]:
    """The files named, and every ``*.yaml`` / ``*.yml`` under the directories named."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")))
        elif path.exists():
            found.append(path)
        else:
            raise ScenarioError(f"{path}: no such file or directory")
    if not found:
        raise ScenarioError("no scenario files found in " + ", ".join(map(str, paths)))
    return found


def example_scenarios_path() -> Path:
    """The scenarios shipped with the example clinic agent."""
    return Path(__file__).resolve().parent.parent / "examples" / "scenarios"


def _slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())[:40]
