"""The curve's plot: p99 added latency and ping RTT p99 against calls.

matplotlib is the ``bench`` extra, imported only when a plot is drawn, and
draws to a file (no display). Each server is a line through its median runs,
with a bar from the best to the worst repeat when a point ran more than once.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from callbrain.extras import missing_extra
from callbrain.testing.bench_report import Run, bench_bound, by_server, median_run

RETELL_PING_DEADLINE_MS = 5000


def require_plotting() -> ModuleType:
    """matplotlib's pyplot, drawing to files; MissingExtraError without the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: the plot goes to a file
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise missing_extra("bench", "callbrain bench --curve's plot") from exc
    return plt


def _p99(run: Run, metric: str) -> float:
    # A log axis has no zero; a p99 of 0.0 ms is drawn at 0.1 ms.
    return max(float(run[metric]["p99"]), 0.1)


def plot_curve(curve: dict[str, Any], path: Path) -> None:
    """One line per server through the median runs (``curve`` as ``run_curve`` makes it)."""
    plt = require_plotting()
    series: dict[str, list[tuple[Run, list[Run]]]] = {}
    for point in curve["points"]:
        for name, runs in by_server(point).items():
            series.setdefault(name, []).append((median_run(runs), runs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    panels = (("added_latency_ms", "p99 added latency (ms)"), ("ping_rtt_ms", "ping RTT p99 (ms)"))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for name, points in series.items():
            shown = [(m, [r for r in rs if r[metric]["p99"] is not None]) for m, rs in points]
            shown = [(m, rs) for m, rs in shown if m[metric]["p99"] is not None]
            xs = [m["calls"] for m, _ in shown]
            ys = [_p99(m, metric) for m, _ in shown]
            low = [
                y - min(_p99(r, metric) for r in rs) for y, (_, rs) in zip(ys, shown, strict=True)
            ]
            high = [
                max(_p99(r, metric) for r in rs) - y for y, (_, rs) in zip(ys, shown, strict=True)
            ]
            bars = ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=name)
            color = bars.lines[0].get_color()
            for m, _ in shown:
                if m["connected"] < m["calls"]:
                    ax.annotate(
                        f"{m['connected']:,} connected",
                        (m["calls"], _p99(m, metric)),
                        textcoords="offset points",
                        xytext=(4, -12),
                        fontsize=7,
                        color=color,
                    )
            bound = [m for m, _ in shown if bench_bound(m)]
            if bound:
                ax.scatter(
                    [m["calls"] for m in bound],
                    [_p99(m, metric) for m in bound],
                    s=160,
                    facecolors="none",
                    edgecolors=color,
                )
        if metric == "ping_rtt_ms":
            ax.axhline(RETELL_PING_DEADLINE_MS, color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                "Retell reconnects after 5 s",
                (0.02, RETELL_PING_DEADLINE_MS),
                xycoords=("axes fraction", "data"),
                va="bottom",
                fontsize=8,
                color="grey",
            )
        ax.set_xscale("log")  # 100 to 2,000 calls: a linear axis crowds the small counts
        ax.set_yscale("log")
        calls = [point["calls"] for point in curve["points"]]
        ax.set_xticks(calls, [f"{n:,}" for n in calls])
        ax.minorticks_off()
        ax.set_xlabel("concurrent calls")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    repeats = f", median of {curve['repeat']} runs (bars: all runs)" if curve["repeat"] > 1 else ""
    fig.suptitle(
        f"callbrain bench, {curve['machine']['cores']} cores, {curve['started']}{repeats}; "
        "circled: the bench itself fell behind",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
