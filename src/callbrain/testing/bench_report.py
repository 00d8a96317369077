"""How ``callbrain bench`` shows a run: a table with one column per server.

The same row definitions serve the terminal table and the curve's Markdown
table, so a number is worded and rounded one way wherever it appears.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

Run = dict[str, Any]

_COUNTED = ("ping_missed", "stale_frame", "turn_incomplete")
"""Violations with rows of their own; the rest are listed under "other violations"."""
BENCH_LAG_LIMIT_MS = 50.0
"""Above this p99 of the bench's own loop lag, its latencies are partly the bench's."""
BENCH_CPU_LIMIT = 0.9
"""At this share of one core the bench (one event loop, one thread) is saturated."""
BUSY_MACHINE_CORES = 0.5
"""When the rest of the machine keeps this many cores busy, the server, the fake
model and the bench compete with it for CPU, and the latencies say so."""


def ms(values: dict[str, float | None], keys: tuple[str, ...] | None = None) -> str:
    chosen = [values[k] for k in (keys or tuple(values))]
    return " / ".join("-" if v is None else f"{v:,.1f}" for v in chosen)


def other_violations(run: Run) -> str:
    shown = [f"{rule} {n:,}" for rule, n in run["violations"].items() if rule not in _COUNTED]
    return ", ".join(shown) or "0"


def bench_core_share(run: Run) -> float:
    """The bench's CPU as a share of one core over the run."""
    return float(run["bench_cpu_s"]) / run["wall_s"] if run["wall_s"] else 0.0


def server_core_share(run: Run) -> float | None:
    """The server's CPU as a share of one core over the run, when it was measured."""
    cpu = run.get("server_cpu_s")
    return None if cpu is None or not run["wall_s"] else float(cpu) / run["wall_s"]


def others_cores(run: Run) -> float:
    """How many cores the rest of the machine kept busy, on average, during the run."""
    return float(run["others_cpu_s"]) / run["wall_s"] if run["wall_s"] else 0.0


def machine_busy(run: Run) -> bool:
    """Did other work on the machine take a share of the CPU during the run?"""
    return others_cores(run) >= BUSY_MACHINE_CORES


def bench_bound(run: Run) -> bool:
    """Did the bench client itself fall behind, so its figures measure the bench too?"""
    lag = run["client_loop_lag_ms"]["p99"]
    return (lag is not None and lag >= BENCH_LAG_LIMIT_MS) or bench_core_share(run) >= (
        BENCH_CPU_LIMIT
    )


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _opt(run: Run, key: str, unit: str = "") -> str:
    value = run.get(key)
    return "-" if value is None else f"{value:,}{unit}"


ROWS: list[tuple[str, Callable[[Run], str]]] = [
    ("calls (connected)", lambda r: f"{r['calls']:,} ({r['connected']:,})"),
    ("turns (interrupted)", lambda r: f"{r['turns']:,} ({r['interrupted_turns']:,})"),
    ("added latency p50 / p95 / p99 ms", lambda r: ms(r["added_latency_ms"])),
    ("first words p50 / p95 / p99 ms", lambda r: ms(r.get("first_words_ms", {}))),
    ("speculation: hits / misses / requests", lambda r: _speculation(r)),
    ("ping RTT p50 / p99 ms", lambda r: ms(r["ping_rtt_ms"])),
    ("missed pings", lambda r: f"{r['missed_pings']:,}"),
    ("stale frames", lambda r: f"{r['stale_frames']:,}"),
    ("incomplete turns", lambda r: f"{r['incomplete_turns']:,}"),
    ("other violations", other_violations),
    ("errors", lambda r: f"{r['errors']:,}"),
    ("server CPU s", lambda r: _opt(r, "server_cpu_s")),
    ("server CPU per turn ms", lambda r: _opt(r, "server_cpu_ms_per_turn")),
    ("server CPU share of a core", lambda r: _share(server_core_share(r))),
    ("server peak RSS MB", lambda r: _opt(r, "server_peak_rss_mb")),
    ("fake model CPU s", lambda r: _opt(r, "fake_llm_cpu_s")),
    ("bench CPU s (share of a core)", lambda r: f"{r['bench_cpu_s']} ({bench_core_share(r):.0%})"),
    ("bench loop lag p50 / p99 ms", lambda r: ms(r["client_loop_lag_ms"])),
    (
        "rest of the machine CPU s (cores)",
        lambda r: f"{r['others_cpu_s']} ({others_cores(r):.2f})",
    ),
]


def _speculation(run: Run) -> str:
    counts = run.get("speculation")
    if not counts:
        return "-"
    return f"{counts['hits']:,.0f} / {counts['misses']:,.0f} / {counts['requests']:,.0f}"


def runs_of(result: Run) -> list[Run]:
    """The main run and the compared one, if any."""
    return [result, *([result["compare"]] if "compare" in result else [])]


def by_server(point: dict[str, Any]) -> dict[str, list[Run]]:
    """A point's runs, grouped by server, in the order they ran."""
    grouped: dict[str, list[Run]] = {}
    for result in point["runs"]:
        for run in runs_of(result):
            grouped.setdefault(run["server"], []).append(run)
    return grouped


def by_p99(runs: list[Run]) -> list[Run]:
    """Fastest first by p99 added latency; runs without a sample last."""

    def p99(run: Run) -> float:
        value = run["added_latency_ms"]["p99"]
        return math.inf if value is None else float(value)

    return sorted(runs, key=p99)


def median_run(runs: list[Run]) -> Run:
    """The repeat whose p99 added latency is the median (of an even count, the
    slower middle one). A whole run, so every figure on its row is from one run."""
    return by_p99(runs)[len(runs) // 2]


def print_report(result: Run, console: Console, *, title: str = "callbrain bench") -> None:
    """The report as a table: one column per server run, then errors and ratios."""
    runs = runs_of(result)
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for run in runs:
        table.add_column(run["server"], justify="right", overflow="fold")
    for label, cell in ROWS:
        table.add_row(label, *(cell(run) for run in runs))
    console.print(table)
    for run in runs:
        for sample in run["error_samples"]:
            line = Text(f"{run['server']}: ", style="red") + Text(sample)
            console.print(line, highlight=False)
        if run["errors"] > len(run["error_samples"]):
            console.print(f"... {run['errors']:,} errors in all", highlight=False)
        if bench_bound(run):
            console.print(
                f"{run['server']}: the bench itself fell behind (loop lag p99 "
                f"{ms(run['client_loop_lag_ms'], ('p99',))} ms, "
                f"{bench_core_share(run):.0%} of a core): its latencies are partly the bench's",
                style="yellow",
                highlight=False,
            )
        if machine_busy(run):
            console.print(
                f"{run['server']}: the rest of the machine kept {others_cores(run):.2f} cores busy "
                "meanwhile: the server, the fake model and the bench shared what was left",
                style="yellow",
                highlight=False,
            )
    if "ratios" in result:
        shown = ", ".join(f"{k} x{v}" for k, v in result["ratios"].items() if v is not None)
        console.print(f"second / first: {shown}", highlight=False)
