"""``callbrain bench --curve``: the same load at several call counts, as a
Markdown table and a PNG plot.

Each point is a whole ``callbrain bench`` run (:func:`run_bench`): a fresh fake
model, then each server started, loaded and stopped in turn, so no point
inherits another's connections or memory. The table goes between two marker
comments in the Markdown file, so a page's own prose around it survives a
rerun; the command that produced it is written with it. The plot needs
matplotlib (the ``bench`` extra), imported only when a plot is drawn.
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
from types import ModuleType
from typing import Any

from rich.console import Console

from callbrain import __version__
from callbrain.extras import missing_extra
from callbrain.testing.bench import LoadOptions
from callbrain.testing.bench_report import (
    BENCH_CPU_LIMIT,
    BENCH_LAG_LIMIT_MS,
    BUSY_MACHINE_CORES,
    Run,
    bench_bound,
    bench_core_share,
    machine_busy,
    ms,
    other_violations,
    others_cores,
    print_report,
    runs_of,
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
    on_point: Callable[[Run], None] | None = None,
) -> dict[str, Any]:
    """One bench run per call count, in the order given."""
    curve: dict[str, Any] = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "ramp_s": options.ramp_s,
        "machine": machine(),
        "points": [],
    }
    for calls in points:
        result = await run_bench(None, replace(options, calls=calls), model, compare=compare)
        curve["points"].append(result)
        if on_point is not None:
            on_point(result)
    return curve


def _row(run: Run) -> list[str]:
    calls = f"{run['calls']:,}"
    if run["connected"] < run["calls"]:
        calls += f" ({run['connected']:,} connected)"
    share = server_core_share(run)
    return [
        calls + (" †" if bench_bound(run) else "") + (" ‡" if machine_busy(run) else ""),
        run["server"],
        f"{run['turns']:,}",
        ms(run["added_latency_ms"], ("p50", "p99")),
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


_HEADER = [
    "calls",
    "server",
    "turns",
    "added latency p50 / p99 ms",
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


def markdown_table(curve: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    for result in curve["points"]:
        for run in runs_of(result):
            lines.append("| " + " | ".join(_row(run)) + " |")
    return "\n".join(lines)


def markdown_block(curve: dict[str, Any], command: list[str], plot: Path) -> str:
    """The generated part of the page: how it was measured, the table, the plot."""
    first = curve["points"][0]
    o, fake, m = first["options"], first["fake_llm"], curve["machine"]
    given = curve.get("ramp_s")
    ramp = "at 200 a second" if given is None else f"over {given:g} s"
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
        "tokens/s. The servers run one after the other, each started fresh for its run.",
        "",
        markdown_table(curve),
        "",
    ]
    runs = [run for result in curve["points"] for run in runs_of(result)]
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


def require_plotting() -> ModuleType:
    """matplotlib's pyplot, drawing to files; MissingExtraError without the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: the plot goes to a file
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise missing_extra("bench", "callbrain bench --curve's plot") from exc
    return plt


async def curve_to_files(
    points: list[int],
    options: LoadOptions,
    model: FakeModel,
    compare: str | None,
    files: tuple[Path, Path],
    command: list[str],
    console: Console,
) -> dict[str, Any]:
    """``callbrain bench --curve``: every point (its table on the console as it
    ends), then the Markdown table and the plot in ``files``."""
    markdown, png = files
    console.print(
        f"bench --curve: {len(points)} points of {options.duration_s:g} s after the ramp-up",
        highlight=False,
    )

    def show(result: Run) -> None:
        print_report(result, console, title=f"callbrain bench: {result['calls']:,} calls")

    curve = await run_curve(points, options, model, compare=compare, on_point=show)
    write_files(curve, files, command)
    console.print(f"wrote {markdown} and {png}", highlight=False)
    return curve


def write_files(curve: dict[str, Any], files: tuple[Path, Path], command: list[str]) -> None:
    """The plot, and the table in the Markdown page with a link to the plot."""
    markdown, png = files
    plot_curve(curve, png)
    relative = Path(os.path.relpath(png.resolve(), markdown.resolve().parent))
    write_markdown(markdown, markdown_block(curve, command, relative))


def plot_curve(curve: dict[str, Any], path: Path) -> None:
    """p99 added latency and ping RTT p99 against calls, one line per server."""
    plt = require_plotting()
    series: dict[str, list[Run]] = {}
    for result in curve["points"]:
        for run in runs_of(result):
            series.setdefault(run["server"], []).append(run)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    panels = (("added_latency_ms", "p99 added latency (ms)"), ("ping_rtt_ms", "ping RTT p99 (ms)"))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for name, runs in series.items():
            shown = [r for r in runs if r[metric]["p99"] is not None]
            xs = [r["calls"] for r in shown]
            line = ax.plot(xs, [max(r[metric]["p99"], 0.1) for r in shown], marker="o", label=name)
            for r in shown:
                if r["connected"] < r["calls"]:
                    ax.annotate(
                        f"{r['connected']:,} connected",
                        (r["calls"], max(r[metric]["p99"], 0.1)),
                        textcoords="offset points",
                        xytext=(4, -12),
                        fontsize=7,
                        color=line[0].get_color(),
                    )
            bound = [r for r in shown if bench_bound(r)]
            if bound:
                ax.scatter(
                    [r["calls"] for r in bound],
                    [max(r[metric]["p99"], 0.1) for r in bound],
                    s=160,
                    facecolors="none",
                    edgecolors=line[0].get_color(),
                )
        if metric == "ping_rtt_ms":
            ax.axhline(5000, color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                "Retell reconnects after 5 s",
                (0.02, 5000),
                xycoords=("axes fraction", "data"),
                va="bottom",
                fontsize=8,
                color="grey",
            )
        ax.set_xscale("log")  # 100 to 2,000 calls: a linear axis crowds the small counts
        ax.set_yscale("log")
        calls = sorted({r["calls"] for runs in series.values() for r in runs})
        ax.set_xticks(calls, [f"{n:,}" for n in calls])
        ax.minorticks_off()
        ax.set_xlabel("concurrent calls")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = curve["machine"]
    fig.suptitle(
        f"callbrain bench, {m['cores']} cores, {curve['started']} "
        "(circled: the bench itself fell behind)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
