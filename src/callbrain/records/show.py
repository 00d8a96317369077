"""``callbrain calls list`` and ``show`` for people: tables and a text waterfall.

The waterfall draws each turn's steps on one scale for the whole call, so the
slow turn stands out: ``·`` from the request to the model request (our
server), ``░`` waiting for the model's first token, ``▒`` from that token to
the first frame sent, ``█`` the rest of the reply until it completed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from callbrain.records.read import Call

WATERFALL_WIDTH = 40
"""Columns of the widest bar; fewer on a narrow terminal."""
_OTHER_COLUMNS = 58
"""What the waterfall table's other columns take."""
_SEGMENTS = (
    ("llm_request", "·", "dim"),
    ("first_token", "░", "yellow"),
    ("first_frame", "▒", "cyan"),
    ("complete", "█", "green"),
)
_OUTCOME_STYLES = {"completed": "green", "superseded": "yellow", "fallback": "red"}
_END_STYLES = {"hangup": "green", "open": "cyan", "error": "red", "drop": "yellow"}


def render_list(calls: list[Call], console: Console) -> None:
    table = Table(title="calls, newest first", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("started (UTC)", no_wrap=True)
    table.add_column("call id", no_wrap=True)
    table.add_column("agent")
    table.add_column("duration", justify="right")
    table.add_column("turns", justify="right")
    table.add_column("worst first frame", justify="right")
    table.add_column("ended")
    for call in calls:
        end = call["end"] + (f" ({call['reconnects']} reconnects)" if call["reconnects"] else "")
        table.add_row(
            _when(call["started_at"]),
            Text(call["call_id"]),
            Text(call["agent"]),
            "-" if call["duration_s"] is None else f"{call['duration_s']:.1f} s",
            str(call["turns"]),
            "-"
            if call["worst_first_frame_ms"] is None
            else f"{call['worst_first_frame_ms']:.0f} ms",
            Text(end, style=_END_STYLES.get(call["end"], "")),
        )
    console.print(table)


def render_call(call: Call, console: Console) -> None:
    duration = "in progress" if call["duration_s"] is None else f"{call['duration_s']:.1f} s"
    console.print(
        Text.assemble(
            ("call ", "bold"),
            (call["call_id"], "bold cyan"),
            f"  agent {call['agent']}  started {_when(call['started_at'])} UTC  {duration}  ended ",
            (call["end"], _END_STYLES.get(call["end"], "")),
            f"  ({call['reconnects']} reconnects)" if call["reconnects"] else "",
        )
    )
    if call["variables"]:
        shown = ", ".join(f"{k}={v}" for k, v in call["variables"].items())
        console.print(Text(f"variables: {shown}", style="dim"))
    console.print(_waterfall(call, console))
    for turn in call["turns"]:
        _print_turn(turn, console, several_sockets=bool(call["reconnects"]))


def _waterfall(call: Call, console: Console) -> Table:
    scale = max(
        (v for t in call["turns"] for v in t["timings_ms"].values() if v is not None),
        default=0.0,
    )
    width = max(10, min(WATERFALL_WIDTH, console.width - _OTHER_COLUMNS))
    table = Table(
        title=f"ms from each request; the bars share one scale ({width} columns = {scale:.0f} ms)\n"
        "· our server  ░ model's first token  ▒ to the first frame  █ rest of the reply",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("turn", justify="right", no_wrap=True, min_width=8)
    table.add_column("outcome", no_wrap=True, min_width=10)
    for name in ("model", "token", "frame", "done"):
        table.add_column(name, justify="right", no_wrap=True, min_width=5)
    table.add_column("", no_wrap=True, min_width=width)
    for turn in call["turns"]:
        timings = turn["timings_ms"]
        kind = "" if turn["kind"] == "response" else f" {turn['kind']}"
        table.add_row(
            _label(turn, several_sockets=bool(call["reconnects"])) + kind,
            Text(turn["outcome"], style=_OUTCOME_STYLES.get(turn["outcome"], "")),
            *(_ms(timings[name]) for name, _, _ in _SEGMENTS),
            _bar(timings, scale, width),
        )
    return table


def _bar(timings: dict[str, float | None], scale: float, width: int) -> Text:
    bar = Text()
    if scale <= 0:
        return bar
    drawn = 0
    for name, char, style in _SEGMENTS:
        at = timings[name]
        if at is None:
            continue
        upto = round(at / scale * width)
        if upto > drawn:
            bar.append(char * (upto - drawn), style=style)
            drawn = upto
    return bar


def _print_turn(turn: dict[str, Any], console: Console, *, several_sockets: bool) -> None:
    console.print(
        Text.assemble(
            (f"\n[{_label(turn, several_sockets=several_sockets)}] ", "bold"),
            f"{turn['kind']} ",
            (turn["outcome"], _OUTCOME_STYLES.get(turn["outcome"], "")),
            f"  at {turn['at_ms'] / 1000:.1f} s",
        )
    )
    # Texts, not strings: a cell string is read as markup, and "[name]" is redacted text.
    lines = Table.grid(padding=(0, 2), pad_edge=True)
    lines.add_column(justify="right", style="dim", no_wrap=True)
    lines.add_column()

    def row(label: str, text: str, style: str = "") -> None:
        lines.add_row(label, Text(text, style=style))

    if turn["caller_text"]:
        row("caller", turn["caller_text"])
    spoken = turn["spoken"] or "(nothing)"
    row("agent", spoken + ("  ✂ cut off here" if turn["outcome"] == "superseded" else ""))
    for model in turn["models"]:
        tokens = ""
        if model["input_tokens"] is not None or model["output_tokens"] is not None:
            tokens = f", {model['input_tokens']} in / {model['output_tokens']} out tokens"
        failover = "".join(f"; failed over from {f}" for f in model["failovers"])
        row(
            "model",
            f"{model['provider']}/{model['model']} {model['outcome']}, first token "
            f"{_ms(model['first_token_ms'])} ms{tokens}{failover}",
        )
    for tool in turn["tools"]:
        outcome = "a repeat: its stored result" if tool["replayed"] else tool["outcome"]
        action = f" -> {tool['action']}" if tool["action"] else ""
        row(
            "tool",
            f"{tool['name']}({tool['arguments']}) {outcome} in "
            f"{_ms(tool['duration_ms'])} ms{action}",
        )
    if turn["action"]:
        row("action", turn["action"])
    if turn["error"]:
        row("error", turn["error"], style="red")
    console.print(Padding(lines, (0, 0, 0, 2)))


def _label(turn: dict[str, Any], *, several_sockets: bool) -> str:
    rid = str(turn["response_id"])
    return f"{turn['socket_number']}:{rid}" if several_sockets else rid


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _when(iso: str | None) -> str:
    if iso is None:
        return "-"
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
