"""A recorded call (the dict :func:`~callbrain.records.read.load_call` gives) as
the call page shows it: a waterfall per turn on one scale for the whole call,
the worst turn marked, and what was cut off by a barge-in.

Pure: no I/O, no HTML. The template draws bars at the percentages given here,
so the page needs no script to show the waterfall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from callbrain.records.read import Call

STEPS = (
    ("llm_request", "server", "our server, until the model was asked"),
    ("first_token", "model", "waiting for the model's first token"),
    ("first_frame", "frame", "from that token to the first words sent"),
    ("complete", "reply", "the rest of the reply, until content_complete"),
)
"""Each step of a turn: its timing, its short name (a CSS class) and what it means."""


@dataclass
class Bar:
    """One bar of a waterfall lane: where it starts and how wide it is, in % of the scale."""

    name: str
    start_ms: float
    end_ms: float
    left: float = 0.0
    width: float = 0.0
    label: str = ""
    outcome: str = ""


@dataclass
class TurnView:
    turn: dict[str, Any]
    label: str
    anchor: str
    steps: list[Bar] = field(default_factory=list)
    lanes: list[Bar] = field(default_factory=list)
    """Tool runs and model requests, each a bar of its own."""
    unsaid: str = ""
    """What the model had said that was never sent: the barge-in cut it off."""
    worst: bool = False


@dataclass
class CallView:
    call: Call
    turns: list[TurnView]
    scale_ms: float
    worst: TurnView | None
    playground: bool


def call_view(call: Call) -> CallView:
    several = call["reconnects"] > 0
    turns = [_turn_view(turn, several) for turn in call["turns"]]
    scale = max((bar.end_ms for view in turns for bar in (*view.steps, *view.lanes)), default=0.0)
    for view in turns:
        for bar in (*view.steps, *view.lanes):
            _place(bar, scale)
    worst = _worst(turns)
    if worst is not None:
        worst.worst = True
    tags = call.get("tags") or {}
    return CallView(call, turns, scale, worst, bool(tags.get("playground")))


def _turn_view(turn: dict[str, Any], several_sockets: bool) -> TurnView:
    rid = str(turn["response_id"])
    label = f"{turn['socket_number']}:{rid}" if several_sockets else rid
    view = TurnView(turn, label, f"turn-{turn['socket_number']}-{rid}")
    drawn = 0.0
    for name, short, meaning in STEPS:
        at = turn["timings_ms"][name]
        if at is None:
            continue
        # Steps are drawn in order, each from where the last one ended (a holding line
        # can be the first frame before the model's first token: then no new bar).
        view.steps.append(Bar(short, drawn, max(at, drawn), label=f"{meaning}: {_ms(at)} ms"))
        drawn = max(at, drawn)
    for n, model in enumerate(turn["models"]):
        end = model["first_token_ms"]
        view.lanes.append(
            Bar(
                "model-request",
                model["requested_ms"],
                end if end is not None else model["requested_ms"],
                label=f"model request {n + 1} ({model['provider']}/{model['model']}): "
                f"first token {_ms(None if end is None else end - model['requested_ms'])} ms",
                outcome=model["outcome"],
            )
        )
    for tool in turn["tools"]:
        duration = tool["duration_ms"] or 0.0
        view.lanes.append(
            Bar(
                "tool",
                tool["started_ms"],
                tool["started_ms"] + duration,
                label=f"tool {tool['name']}: {_ms(tool['duration_ms'])} ms",
                outcome="replayed" if tool["replayed"] else tool["outcome"],
            )
        )
    if turn["outcome"] == "superseded" and turn["models"]:
        view.unsaid = unsaid(turn["spoken"], turn["models"][-1]["text"])
    return view


def unsaid(spoken: str, model_text: str) -> str:
    """The end of ``model_text`` that ``spoken`` does not have: chunks go out in
    order, so what was sent of it is a prefix of it at the end of what was spoken
    (after any holding line)."""
    if not model_text:
        return ""
    for start in range(len(spoken)):
        if model_text.startswith(spoken[start:]):
            return model_text[len(spoken) - start :]
    return model_text


def _worst(turns: list[TurnView]) -> TurnView | None:
    """The asked turn slowest to its first frame (or to its end, if none came)."""

    def cost(view: TurnView) -> float:
        timings = view.turn["timings_ms"]
        first = timings["first_frame"]
        return first if first is not None else (timings["complete"] or 0.0)

    asked = [view for view in turns if view.turn["kind"] != "begin"]
    return max(asked, key=cost, default=None)


def _place(bar: Bar, scale: float) -> None:
    if scale <= 0:
        return
    bar.left = round(min(bar.start_ms, scale) / scale * 100, 2)
    bar.width = round(max(bar.end_ms - bar.start_ms, 0.0) / scale * 100, 2)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def when(iso: str | None) -> str:
    """An ISO time as the pages show it (UTC)."""
    if iso is None:
        return "-"
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


def ms(value: float | None) -> str:
    return _ms(value)
