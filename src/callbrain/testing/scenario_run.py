"""Play a scenario against a server, as Retell would, and judge the result.

One scenario is one call on a real WebSocket. The caller's side follows
Retell's timing (``update_only`` while the caller speaks, then
``response_required``; ``reminder_required`` after a silence; ``ping_pong``
every 2 s), every frame goes through the protocol checker, and the scenario's
expectations are judged on the frames that came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from callbrain.retell.frames import PING_INTERVAL_S
from callbrain.testing.checker import Frame, TurnRecord
from callbrain.testing.client import RetellClient, agent, user
from callbrain.testing.scenario import CallerTurn, Expect, Scenario, Silence, ToolExpectation

_SENTENCE_END = re.compile(r"[.!?…][\"')\]\u2019\u201d]*\s*$")
"""Text that ends a sentence: a full stop, ``!``, ``?`` or ``…``, perhaps closing
quotes or brackets, then nothing but space."""
_UPDATES_PER_UTTERANCE = 4
"""At most this many ``update_only`` frames while the caller speaks."""


@dataclass
class TurnTiming:
    response_id: int
    kind: str
    """``greeting``, ``caller`` or ``reminder``."""
    first_chunk_ms: float | None
    first_sentence_ms: float | None
    complete_ms: float | None
    interrupted: bool


@dataclass
class ScenarioResult:
    name: str
    path: str
    violations: list[str] = field(default_factory=list)
    """Protocol rules the server broke."""
    failures: list[str] = field(default_factory=list)
    """Expectations of the scenario that did not hold."""
    notes: list[str] = field(default_factory=list)
    turns: list[TurnTiming] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.violations and not self.failures

    def timing(self, attribute: str) -> tuple[float | None, float | None]:
        """p50 and max of a per-turn time over the caller's answered turns."""
        values = [
            getattr(t, attribute)
            for t in self.turns
            if t.kind != "greeting" and not t.interrupted and getattr(t, attribute) is not None
        ]
        if not values:
            return None, None
        return statistics.median(values), max(values)

    def to_json(self) -> dict[str, Any]:
        chunk, sentence = self.timing("first_chunk_ms"), self.timing("first_sentence_ms")
        return {
            "name": self.name,
            "path": self.path,
            "passed": self.passed,
            "violations": self.violations,
            "failures": self.failures,
            "notes": self.notes,
            "first_chunk_ms": {"p50": _round(chunk[0]), "max": _round(chunk[1])},
            "first_sentence_ms": {"p50": _round(sentence[0]), "max": _round(sentence[1])},
            "duration_s": round(self.duration_s, 3),
            "turns": [
                {
                    "response_id": t.response_id,
                    "kind": t.kind,
                    "first_chunk_ms": _round(t.first_chunk_ms),
                    "first_sentence_ms": _round(t.first_sentence_ms),
                    "complete_ms": _round(t.complete_ms),
                    "interrupted": t.interrupted,
                }
                for t in self.turns
            ],
        }


@dataclass
class _StepRun:
    """A request the scenario sent, and which expectations apply to its reply."""

    response_id: int
    sent_at: float
    expect: Expect | None
    label: str


class ScenarioRunner:
    """Runs one :class:`Scenario` on one connection."""

    def __init__(self, scenario: Scenario, call: RetellClient) -> None:
        self.scenario = scenario
        self.call = call
        self.runs: list[_StepRun] = []
        self.ended: str | None = None
        """Why the call ended early (the agent hung up, transferred, or closed)."""

    async def run(self, result: ScenarioResult) -> None:
        call, scenario = self.call, self.scenario
        first = await self._first_frame()
        config = first.get("config", {}) if first.get("response_type") == "config" else {}
        if config.get("call_details") is True:
            await call.send_call_details({"call_id": scenario.call_id, **scenario.call})
        pings = scenario.pings if scenario.pings is not None else config.get("auto_reconnect")
        if pings is True:
            call.start_pinging(PING_INTERVAL_S)
        await self._wait_for_greeting(result)
        for index, step in enumerate(scenario.steps):
            if self.ended:
                result.failures.append(
                    f"steps[{index}]: not run, the call had ended ({self.ended})"
                )
                break
            following = scenario.steps[index + 1] if index + 1 < len(scenario.steps) else None
            if isinstance(step, Silence):
                await asyncio.sleep(step.silence_ms / 1000)
                rid = await call.request(reminder=True)
            else:
                rid = await self._speak(step)
            self.runs.append(_StepRun(rid, time.monotonic(), step.expect, f"steps[{index}]"))
            await self._await_reply(rid, following)
        await self._settle()

    async def _first_frame(self) -> Frame:
        """The server's first frame, if it sends one soon (``config`` must come first)."""
        with contextlib.suppress(TimeoutError, ConnectionError):
            return await self.call.next_frame(timeout=self.scenario.greeting_timeout_s)
        return {}

    async def _wait_for_greeting(self, result: ScenarioResult) -> None:
        try:
            await self.call.wait_for(
                lambda _: self.call.checker.begin.completes > 0,
                timeout=self.scenario.greeting_timeout_s,
            )
        except (TimeoutError, ConnectionError):
            result.notes.append("no begin message: the caller speaks first")
            return
        greeting = self.call.checker.begin.text
        if greeting:
            self.call.transcript.append(agent(greeting))
        self._note_end(self.call.checker.begin)

    async def _speak(self, step: CallerTurn) -> int:
        call = self.call
        if step.interrupts is None and step.pause_ms:
            await asyncio.sleep(step.pause_ms / 1000)
        self._add_interrupted_reply()
        words = step.caller.split()
        updates = max(1, min(_UPDATES_PER_UTTERANCE, len(words)))
        call.transcript.append(user(""))
        for n in range(1, updates + 1):
            spoken = " ".join(words[: round(len(words) * n / updates)])
            call.transcript[-1] = user(spoken)
            await call.update(turntaking="user_turn" if n < updates else "agent_turn")
            if n < updates:
                await asyncio.sleep(step.speak_ms / 1000 / updates)
        call.transcript[-1] = user(step.caller)
        return await call.request()

    def _add_interrupted_reply(self) -> None:
        """Retell's transcript keeps what the agent said before the caller cut in."""
        if not self.runs:
            return
        turn = self.call.checker.turns.get(self.runs[-1].response_id)
        if turn is not None and turn.completes == 0 and turn.text:
            self.call.transcript.append(agent(turn.text))

    async def _await_reply(self, rid: int, following: object) -> None:
        """Wait for the reply to ``rid`` or, if the next step barges in, for its moment."""
        checker = self.call.checker
        barge = following.interrupts if isinstance(following, CallerTurn) else None
        try:
            if barge == "first_chunk":
                await self.call.wait_for(
                    lambda _: _started(checker.turns[rid]), self.scenario.reply_timeout_s
                )
                return
            if isinstance(barge, int):
                await asyncio.sleep(barge / 1000)
                return
            await self.call.wait_for(
                lambda _: checker.turns[rid].completes > 0, self.scenario.reply_timeout_s
            )
        except TimeoutError:
            return  # reported by the checker as turn_incomplete
        except ConnectionError:
            self.ended = self.ended or f"the server closed the socket (code {self.call.close_code})"
            return
        turn = checker.turns[rid]
        if turn.text:
            self.call.transcript.append(agent(turn.text))
        self._note_end(turn)

    def _note_end(self, turn: TurnRecord) -> None:
        if turn.actions.get("end_call") is True:
            self.ended = "the agent hung up"
        elif "transfer_number" in turn.actions:
            self.ended = f"the agent transferred to {turn.actions['transfer_number']}"

    async def _settle(self) -> None:
        """Make sure every frame the server sent has arrived before judging."""
        if self.call.closed:
            return
        with contextlib.suppress(TimeoutError, ConnectionError):
            await self.call.ping(timeout=self.scenario.reply_timeout_s)


def judge(runner: ScenarioRunner, result: ScenarioResult) -> None:
    """Turn what happened into the result's violations, failures and timings."""
    call, scenario = runner.call, runner.scenario
    checker = call.checker
    checker.finish(time.monotonic())
    result.violations = [str(v) for v in checker.violations]
    frames = list(zip(call.received_at, call.frames, strict=True))
    if scenario.greeting is not None:
        greeting_frames = [f for _, f in frames if _is_response(f, 0)]
        _check(scenario.greeting, "greeting", greeting_frames, checker.begin.text, result)
        if scenario.greeting.ends_sentence:
            _check_sentence_end("greeting", checker.begin.text, result)
    previous = checker.begin.text
    for n, run in enumerate(runner.runs):
        turn = checker.turns.get(run.response_id)
        reply = turn.text if turn else ""
        if run.expect is not None:
            until = runner.runs[n + 1].sent_at if n + 1 < len(runner.runs) else float("inf")
            window = [
                f
                for at, f in frames
                if _is_response(f, run.response_id)
                or (run.sent_at <= at < until and f.get("response_type") != "response")
            ]
            _check(run.expect, run.label, window, reply, result)
            _check_reply(run.expect, run.label, reply, previous, result)
        previous = reply
    everything = " ".join(t.text for t in [checker.begin, *checker.turns.values()])
    everything += " " + " ".join(
        str(f.get("content", "")) for _, f in frames if f.get("response_type") == "agent_interrupt"
    )
    _check(scenario.expect, "call", [f for _, f in frames], everything, result)
    _check_call_replies(scenario.expect, runner, result)
    result.turns = [_timing(checker.begin, "greeting")] if checker.begin.first_frame_at else []
    result.turns += [
        _timing(t, "reminder" if t.reminder else "caller") for t in checker.turns.values()
    ]


def _check(
    expect: Expect, where: str, frames: list[Frame], text: str, result: ScenarioResult
) -> None:
    said = " ".join(text.split()).lower()
    for phrase in expect.said:
        if " ".join(phrase.split()).lower() not in said:
            result.failures.append(f"{where}: never said {phrase!r} (said: {_clip(text)!r})")
    for phrase in expect.not_said:
        if " ".join(phrase.split()).lower() in said:
            result.failures.append(f"{where}: said {phrase!r}")
    calls = [_invocation(f) for f in frames if f.get("response_type") == "tool_call_invocation"]
    names = [name for name, _ in calls]
    for wanted in expect.tools:
        want = wanted if isinstance(wanted, ToolExpectation) else ToolExpectation(name=wanted)
        if not any(name == want.name and _subset(want.arguments, args) for name, args in calls):
            shown = ", ".join(f"{n}({orjson.dumps(a).decode()})" for n, a in calls) or "none"
            result.failures.append(
                f"{where}: no call of {want.name} with {want.arguments or 'any arguments'}"
                f" (calls: {shown})"
            )
    for name in expect.not_tools:
        if name in names:
            result.failures.append(f"{where}: called {name}, which it must not")
    _check_actions(expect, where, frames, result)


def _check_actions(expect: Expect, where: str, frames: list[Frame], result: ScenarioResult) -> None:
    spoken = [f for f in frames if f.get("response_type") in ("response", "agent_interrupt")]
    ended = any(f.get("end_call") is True for f in spoken)
    transfers = [str(f["transfer_number"]) for f in spoken if "transfer_number" in f]
    digits = "".join(str(f["digit_to_press"]) for f in spoken if "digit_to_press" in f)
    happened = {"end_call": ended, "transfer": bool(transfers), "press_digit": bool(digits)}
    if expect.action == "none" and any(happened.values()):
        chosen = [name for name, done in happened.items() if done]
        result.failures.append(f"{where}: expected no call action, got {', '.join(chosen)}")
    elif expect.action is not None and expect.action != "none" and not happened[expect.action]:
        result.failures.append(f"{where}: expected {expect.action}, it never happened")
    if expect.transfer_to is not None and expect.transfer_to not in transfers:
        result.failures.append(
            f"{where}: expected a transfer to {expect.transfer_to}, got {transfers or 'none'}"
        )
    if expect.digits is not None and digits != expect.digits:
        result.failures.append(f"{where}: expected digits {expect.digits!r}, got {digits!r}")


def _check_reply(
    expect: Expect, where: str, reply: str, previous: str, result: ScenarioResult
) -> None:
    if expect.ends_sentence:
        _check_sentence_end(where, reply, result)
    if expect.differs_from_previous and _normalized(reply) == _normalized(previous):
        result.failures.append(f"{where}: said its previous reply again ({_clip(reply)!r})")


def _check_call_replies(expect: Expect, runner: ScenarioRunner, result: ScenarioResult) -> None:
    """The whole call's ``ends_sentence`` and ``distinct_replies``, over every
    reply that ran its course (a reply the caller talked over is cut by design)."""
    checker = runner.call.checker
    replies: list[tuple[str, TurnRecord | None]] = [("greeting", checker.begin)]
    replies += [(run.label, checker.turns.get(run.response_id)) for run in runner.runs]
    finished = [(label, turn.text) for label, turn in replies if turn and turn.completes]
    if expect.ends_sentence:
        for label, text in finished:
            _check_sentence_end(f"call: {label}", text, result)
    if expect.distinct_replies:
        first_said: dict[str, str] = {}
        for label, text in finished:
            key = _normalized(text)
            if key in first_said:
                result.failures.append(
                    f"call: {label}: said the same as {first_said[key]} ({_clip(text)!r})"
                )
            else:
                first_said[key] = label


def _check_sentence_end(where: str, text: str, result: ScenarioResult) -> None:
    if not text.strip():
        result.failures.append(f"{where}: said nothing, so no sentence ended")
    elif not _SENTENCE_END.search(text):
        result.failures.append(f"{where}: stopped mid-sentence (...{text.rstrip()[-60:]!r})")


def _normalized(text: str) -> str:
    """What two replies must share to count as the same: all but case and spacing."""
    return " ".join(text.lower().split())


def _invocation(frame: Frame) -> tuple[str, dict[str, Any]]:
    try:
        arguments = orjson.loads(str(frame.get("arguments", "{}")))
    except orjson.JSONDecodeError:
        arguments = {}
    return str(frame.get("name")), arguments if isinstance(arguments, dict) else {}


def _subset(expected: object, actual: object) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and _subset(value, actual[key]) for key, value in expected.items()
        )
    if isinstance(expected, str) and isinstance(actual, str):
        return expected.strip().lower() == actual.strip().lower()
    return expected == actual


def _is_response(frame: Frame, rid: int) -> bool:
    return frame.get("response_type") == "response" and frame.get("response_id") == rid


def _started(turn: TurnRecord) -> bool:
    return turn.first_text_at is not None or turn.completes > 0


def _timing(turn: TurnRecord, kind: str) -> TurnTiming:
    return TurnTiming(
        response_id=turn.response_id,
        kind=kind,
        first_chunk_ms=turn.ms(turn.first_text_at),
        first_sentence_ms=turn.ms(turn.first_sentence_at),
        complete_ms=turn.ms(turn.completed_at),
        interrupted=not turn.live and turn.completes == 0,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
