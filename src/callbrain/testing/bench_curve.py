"""``callbrain bench --curve``: the same load at several call counts, as a
Markdown table and a PNG plot.

Each point is one or more whole ``callbrain bench`` runs (:func:`run_bench`): a
fresh fake model, then each server started, loaded and stopped in turn, so no
point inherits another's connections or memory. On a shared machine one run's
p99 can be another process's doing, so ``--repeat`` runs each point again,
alternating which server goes first, and the table shows the median run (a
whole run, so a row's figures belong together) next to every run's p99. The
table goes between two marker comments in the Markdown file, so a page's own
prose around it survives a rerun; the command that produced it is written with
it. The plot is :mod:`callbrain.testing.bench_plot`.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from callbrain import __version__
from callbrain.testing.bench import LoadOptions
from callbrain.testing.bench_plot import plot_curve
from callbrain.testing.bench_report import (
    BENCH_CPU_LIMIT,
    BENCH_LAG_LIMIT_MS,
    BUSY_MACHINE_CORES,
    Run,
    bench_bound,
    bench_core_share,
    by_p99,
    by_server,
    machine_busy,
    median_run,
    ms,
    other_violations,
    others_cores,
    print_report,
    server_core_share,
)
from callbrain.testing.bench_run import FakeModel, run_bench

BEGIN = "<!-- callbrain bench --curve: begin (generated: rerun the command below to refresh) -->"
END = "<!-- callbrain bench --curve: end -->"
_BLOCK = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)


def parse_points(text: str) -> list[int]:
    """``"100,250,500"`` -> ``[100, 250, 500]``; a ValueError says what is wrong."""
    try:
        points = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--curve takes call counts like 100,250,500, got {text!r}") from None
    if not points or min(points) < 1:
        raise ValueError(f"--curve takes call counts of at least 1, got {text!r}")
    return points


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:  # not Linux
        cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return {
        "cores": os.cpu_count(),
        "cpu": model.group(1).strip() if model else platform.processor() or "unknown CPU",
        "python": platform.python_version(),
        "callbrain": __version__,
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }


async def run_curve(
    points: list[int],
    options: LoadOptions,
    model: FakeModel,
    *,
    compare: str | None,
    repeat: int = 1,
    on_point: Callable[[Run], None] | None = None,
) -> dict[str, Any]:
    """``repeat`` bench runs per call count, in the order given; the repeats
    alternate which server goes first, so neither always gets the quieter slot."""
    curve: dict[str, Any] = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "ramp_s": options.ramp_s,
        "repeat": repeat,
        "machine": machine(),
        "points": [],
    }
    for calls in points:
        point: dict[str, Any] = {"calls": calls, "runs": []}
        for n in range(repeat):
            result = await run_bench(
                None,
                replace(options, calls=calls),
                model,
                compare=compare,
                compare_first=n % 2 == 1,
            )
            point["runs"].append(result)
            if on_point is not None:
                on_point(result)
        curve["points"].append(point)
    return curve


def _row(run: Run, repeats: list[Run]) -> list[str]:
    calls = f"{run['calls']:,}"
    if run["connected"] < run["calls"]:
        calls += f" ({run['connected']:,} connected)"
    share = server_core_share(run)
    row = [
        calls + (" †" if bench_bound(run) else "") + (" ‡" if machine_busy(run) else ""),
        run["server"],
        f"{run['turns']:,}",
        ms(run["added_latency_ms"], ("p50", "p99")),
    ]
    if len(repeats) > 1:
        row.append(" / ".join(ms(r["added_latency_ms"], ("p99",)) for r in by_p99(repeats)))
    row += [
        ms(run["ping_rtt_ms"], ("p50", "p99")),
        f"{run['missed_pings']:,}",
        f"{run['stale_frames']:,}",
        f"{run['incomplete_turns']:,}",
        other_violations(run),
        str(run.get("server_cpu_ms_per_turn", "-")),
        "-" if share is None else f"{share:.0%}",
        str(run.get("server_peak_rss_mb", "-")),
        f"{ms(run['client_loop_lag_ms'], ('p99',))} ms, {bench_core_share(run):.0%}",
        f"{others_cores(run):.2f}",
    ]
    return row


def _header(repeat: int) -> list[str]:
    spread = [f"p99 of each of the {repeat} runs ms"] if repeat > 1 else []
    return [
        "calls",
        "server",
        "turns",
        "added latency p50 / p99 ms",
        *spread,
        "ping RTT p50 / p99 ms",
        "missed pings",
        "stale frames",
        "incomplete turns",
        "other violations",
        "server CPU per turn ms",
        "server CPU (of a core)",
        "server peak RSS MB",
        "bench loop lag p99, bench CPU (of a core)",
        "rest of the machine (cores busy)",
    ]


def shown_runs(curve: dict[str, Any]) -> list[Run]:
    """One run per point and server: the median repeat."""
    return [median_run(runs) for point in curve["points"] for runs in by_server(point).values()]


def markdown_table(curve: dict[str, Any]) -> str:
    header = _header(curve["repeat"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point in curve["points"]:
        for runs in by_server(point).values():
            lines.append("| " + " | ".join(_row(median_run(runs), runs)) + " |")
    return "\n".join(lines)


def markdown_block(curve: dict[str, Any], command: list[str], plot: Path) -> str:
    """The generated part of the page: how it was measured, the table, the plot."""
    first = curve["points"][0]["runs"][0]
    o, fake, m = first["options"], first["fake_llm"], curve["machine"]
    given = curve.get("ramp_s")
    ramp = "at 200 a second" if given is None else f"over {given:g} s"
    repeat = curve["repeat"]
    repeats = (
        f" Each point ran {repeat} times, alternating which server went first; each row is "
        "the run with the median p99 added latency, and the next column has every run's p99."
        if repeat > 1
        else ""
    )
    lines = [
        BEGIN,
        f"Measured {curve['started']} with:",
        "",
        "```sh",
        shlex.join(command),
        "```",
        "",
        f"on {m['cores']} cores ({m['cpu']}), Python {m['python']}, callbrain {m['callbrain']}; "
        f"load average {m['load_average_at_start']} when it started. Each point: the calls "
        f"connect ({ramp}), then talk for {o['duration_s']:g} s: a turn {o['pause_s']:g} s "
        f"(on average) after each reply, {o['interrupt_rate']:.0%} of replies barged in on; the "
        f"fake model answers after {fake['ttft_s'] * 1000:g} ms, then {fake['token_rate']:g} "
        "tokens/s. The servers run one after the other, each started fresh for its run." + repeats,
        "",
        markdown_table(curve),
        "",
    ]
    runs = shown_runs(curve)
    if any(run["connected"] < run["calls"] for run in runs):
        lines += [
            "(N connected): the other calls did not finish their WebSocket handshake within "
            "30 s, so the figures on that row are those of the N calls that did.",
            "",
        ]
    if any(bench_bound(run) for run in runs):
        lines += [
            f"† The bench itself fell behind at this point (its loop lag p99 reached "
            f"{BENCH_LAG_LIMIT_MS:g} ms, or it used {BENCH_CPU_LIMIT:.0%} of a core): these "
            "latencies are partly the bench's own, not only the server's.",
            "",
        ]
    if any(machine_busy(run) for run in runs):
        lines += [
            f"‡ The rest of the machine kept at least {BUSY_MACHINE_CORES:g} of its "
            f"{curve['machine']['cores']} cores busy during this run (last column): the server, "
            "the fake model and the bench shared what was left.",
            "",
        ]
    lines += [f"![p99 added latency and ping RTT p99 against calls]({plot.as_posix()})", END]
    return "\n".join(lines)


def write_markdown(path: Path, block: str, title: str = "Performance") -> None:
    """Put ``block`` in ``path``: in place of the last generated block if there is
    one, else after the page's text, or as a new page."""
    if path.exists():
        text = path.read_text(encoding="utf-8")
        if _BLOCK.search(text):
            text = _BLOCK.sub(lambda _: block, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = f"# {title}\n\n{block}\n"
    path.write_text(text, encoding="utf-8")


async def curve_to_files(
    points: list[int],
    options: LoadOptions,
    model: FakeModel,
    compare: str | None,
    repeat: int,
    files: tuple[Path, Path],
    command: list[str],
    console: Console,
) -> dict[str, Any]:
    """``callbrain bench --curve``: every point (its table on the console as it
    ends), then the Markdown table and the plot in ``files``."""
    markdown, png = files
    console.print(
        f"bench --curve: {len(points)} points x {repeat} runs of {options.duration_s:g} s "
        "after the ramp-up",
        highlight=False,
    )

    def show(result: Run) -> None:
        print_report(result, console, title=f"callbrain bench: {result['calls']:,} calls")

    curve = await run_curve(points, options, model, compare=compare, repeat=repeat, on_point=show)
    write_files(curve, files, command)
    console.print(f"wrote {markdown} and {png}", highlight=False)
    return curve


def write_files(curve: dict[str, Any], files: tuple[Path, Path], command: list[str]) -> None:
    """The plot, and the table in the Markdown page with a link to the plot."""
    markdown, png = files
    plot_curve(curve, png)
    relative = Path(os.path.relpath(png.resolve(), markdown.resolve().parent))
    write_markdown(markdown, markdown_block(curve, command, relative))
