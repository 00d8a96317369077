"""A recorded call as a scenario file (:mod:`callbrain.testing.scenario`) that
``callbrain test`` replays: the caller's side of the call, checked against
what the agent did then.

* Each request becomes a step: the caller's last utterance, after the pause
  the caller left once the previous reply had completed; a reminder becomes
  a silence of that length.
* A turn that was superseded becomes a barge-in: the next step
  ``interrupts`` it as many milliseconds after its request as the caller did.
* The tools a completed turn called (with their arguments) and its call
  action are that step's expectations. A turn that was cut off expects
  nothing: whether its tools run again depends on where the cut lands.
* With ``script`` (the default), the model's answers are the scenario's
  script, so the replay takes the same path through the agent's tools
  without a model's variance: one reply per model request, with its text,
  its tool calls and its time to first token, so that a barge-in lands in
  the same step of the turn as it did. The reply that was cut streams its
  words a second apart, so the cut comes while it is still speaking.

The sockets of a reconnected call are replayed as one connection, in order.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import yaml

from callbrain.records.read import Call
from callbrain.testing.scenario import Scenario

_CALL_FIELDS = ("call_type", "direction", "from_number", "to_number", "agent_id")
_CUT_WORDS_MS = 1000
"""Between the words of the reply that was cut off, so the barge-in lands in it."""

Turn = dict[str, Any]
Step = dict[str, Any]


def export_scenario(call: Call, *, script: bool = True) -> dict[str, Any]:
    """The scenario (as the mapping a YAML file holds) replaying ``call``."""
    offsets = _socket_offsets(call)
    timed = [(offsets.get(t["socket_number"], 0.0) + t["at_ms"], t) for t in call["turns"]]
    begin = next((at + _last_timing(t) for at, t in timed if t["kind"] == "begin"), 0.0)
    asked = [(at, t) for at, t in timed if t["kind"] != "begin"]
    steps: list[Step] = []
    replies: list[dict[str, Any]] = []
    for n, (at, turn) in enumerate(asked):
        previous = asked[n - 1] if n else None
        heard = begin if previous is None else previous[0] + _last_timing(previous[1])
        cut = previous is not None and previous[1]["outcome"] == "superseded"
        steps.append(_step(turn, at - previous[0] if cut and previous else None, at - heard))
        cut_at = asked[n + 1][0] - at if n + 1 < len(asked) else None
        replies += _replies(turn, cut_at if turn["outcome"] == "superseded" else None)
    scenario: dict[str, Any] = {
        "name": f"replay of call {call['call_id']}",
        "description": (
            f"Exported by `callbrain calls export` from the call of agent {call['agent']!r} "
            f"that started at {call['started_at']}."
        ),
    }
    details = _call_details(call["variables"])
    if details:
        scenario["call"] = details
    scenario["steps"] = steps
    if script:
        scenario["script"] = replies
    Scenario.model_validate(scenario)  # what we print must load
    return scenario


def scenario_yaml(scenario: dict[str, Any]) -> str:
    header = (
        "# A recorded call, replayed: `callbrain test THIS_FILE --agent YOUR_AGENT.yaml`.\n"
        "# The script replaces the agent's model with what it answered then; remove it\n"
        "# to replay the caller's side against the model itself.\n"
    )
    body = yaml.safe_dump(scenario, sort_keys=False, allow_unicode=True, width=100)
    return header + body


def _step(turn: Turn, barged_after: float | None, pause: float) -> Step:
    """The caller's step for ``turn``: ``barged_after`` is how long after the
    previous request it came, if it cut that reply off; ``pause``, how long
    after the previous reply was last heard from."""
    step: Step
    if turn["kind"] == "reminder":
        step = {"silence_ms": max(0, round(pause))}
    else:
        step = {"caller": turn["caller_text"]}
        if barged_after is not None:
            step["interrupts"] = max(0, round(barged_after))
        elif pause >= 1:
            step["pause_ms"] = round(pause)
    expect = _expectations(turn)
    if expect:
        step["expect"] = expect
    return step


def _expectations(turn: Turn) -> dict[str, Any]:
    """What a completed turn did: its tools and its call action."""
    if turn["outcome"] != "completed":
        return {}
    expect: dict[str, Any] = {}
    if turn["tools"]:
        expect["tools"] = [
            {"name": t["name"], "arguments": _arguments(t["arguments"])} for t in turn["tools"]
        ]
    if turn["action"]:
        expect["action"] = turn["action"]
    return expect


def _replies(turn: Turn, cut_at: float | None) -> list[dict[str, Any]]:
    """The model's answers in this turn as scripted replies; ``cut_at``: ms after
    the request when a newer one cut the turn off."""
    models = turn["models"]
    if not models:
        # No model request (a turn ended for a shutdown): the replay's will ask one.
        return [] if cut_at is not None else [{"text": turn["spoken"]}]
    replies = []
    for n, model in enumerate(models):
        later = models[n + 1]["requested_ms"] if n + 1 < len(models) else float("inf")
        reply: dict[str, Any] = {"text": model["text"]}
        calls = [
            {"name": t["name"], "arguments": _arguments(t["arguments"])}
            for t in turn["tools"]
            if model["requested_ms"] <= t["started_ms"] < later
        ]
        if calls:
            reply["tool_calls"] = calls
        first = model["first_token_ms"]
        if cut_at is not None and n + 1 == len(models):
            if first is None:  # cut while waiting for the model: wait past the cut
                first = cut_at + _CUT_WORDS_MS
            reply["chunk_ms"] = _CUT_WORDS_MS
        if first is not None and round(first - model["requested_ms"]) > 0:
            reply["ttft_ms"] = round(first - model["requested_ms"])
        replies.append(reply)
    return replies


def _arguments(text: str) -> dict[str, Any]:
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _last_timing(turn: Turn) -> float:
    """When the turn was last heard from (ms after its request)."""
    known = [v for v in turn["timings_ms"].values() if v is not None]
    return max(known, default=0.0)


def _socket_offsets(call: Call) -> dict[int, float]:
    """Each socket's start, in ms from the call's."""
    first = datetime.fromisoformat(call["started_at"])
    offsets: dict[int, float] = {}
    for socket in call["sockets"]:
        started = datetime.fromisoformat(socket["started_at"])
        offsets.setdefault(socket["socket_number"], (started - first).total_seconds() * 1000)
    return offsets


def _call_details(variables: dict[str, Any]) -> dict[str, Any]:
    """The call object Retell would send: its fields, and the rest as dynamic variables."""
    details: dict[str, Any] = {k: variables[k] for k in _CALL_FIELDS if k in variables}
    dynamic = {k: v for k, v in variables.items() if k not in _CALL_FIELDS and k != "call_id"}
    if dynamic:
        details["retell_llm_dynamic_variables"] = dynamic
    return details
