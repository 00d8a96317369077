"""The baseline server callbrain is compared with, ``bench --compare baseline``
and ``bench --curve``. Nothing here asserts a latency: the numbers are only
reported; what is asserted is what the checker flags and what the files hold."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytest_asyncio
from test_bench import bench_command

from callbrain.extras import MissingExtraError
from callbrain.testing import FakeOpenAIServer, Reply, serve_asgi
from callbrain.testing.bench import LoadOptions, run_load
from callbrain.testing.bench_curve import (
    BEGIN,
    END,
    markdown_block,
    parse_points,
    write_markdown,
)
from callbrain.testing.bench_plot import require_plotting
from callbrain.testing.bench_report import bench_bound, median_run

BASELINE = Path(__file__).resolve().parents[1] / "benchmarks" / "baseline" / "server.py"
TINY = ["--duration", "1.5", "--ramp", "0.3", "--pause", "0.2", "--ttft", "0.05"]
TINY += ["--token-rate", "200", "--seed", "5"]


def load_baseline() -> ModuleType:
    """benchmarks/baseline/server.py as a module (it is a script, not a package)."""
    if "baseline_server" in sys.modules:
        return sys.modules["baseline_server"]
    spec = importlib.util.spec_from_file_location("baseline_server", BASELINE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up by name
    spec.loader.exec_module(module)
    return module


@pytest_asyncio.fixture
async def baseline() -> AsyncIterator[tuple[str, FakeOpenAIServer]]:
    """The baseline app on loopback, its model a fake that streams slowly after a
    first token at 0.2 s (and, like OpenAI, an empty role chunk at once)."""
    server = load_baseline()
    reply = Reply("One moment, let me look that up for you right now.", ttft=0.2, chunk_delay=0.1)
    async with FakeOpenAIServer(default=reply) as fake:
        settings = server.ModelSettings(fake.base_url, "k", "bench")
        async with serve_asgi(server.create_app(settings)) as http:
            yield "ws" + http.removeprefix("http") + "/llm-websocket", fake


async def test_the_baseline_can_be_benched_and_the_checker_flags_its_known_flaws(
    baseline: tuple[str, FakeOpenAIServer],
) -> None:
    url, fake = baseline
    options = LoadOptions(
        calls=4, duration_s=2.0, ramp_s=0.2, pause_s=0.1, ttft_s=0.2, interrupt_rate=1.0, seed=3
    )
    report = await run_load(url, options)
    # It speaks the protocol well enough: every call connects, greets, answers,
    # echoes every ping and completes every live turn.
    assert report.connected == 4 and report.turns >= 4 and report.interrupted > 0
    assert report.missed_pings == 0 and report.incomplete_turns == 0
    assert len(report.ping_rtt_ms) > 0 and len(report.added_latency_ms) > 0
    # Its flaws, and only those: a null transfer_number on every response frame,
    # and a barged-in reply that sends one more chunk under the superseded id.
    assert set(report.violations) == {"null_field", "stale_frame"}, report.violations
    assert report.stale_frames == report.violations["stale_frame"] > 0
    assert report.errors == report.violations["null_field"]
    assert report.error_samples == [report.error_samples[0]]  # one sample per kind
    assert "transfer_number" in report.error_samples[0]
    assert len(fake.requests) >= report.turns  # the model really was asked


async def test_added_latency_counts_the_first_words_not_an_empty_first_frame(
    baseline: tuple[str, FakeOpenAIServer],
) -> None:
    """The baseline forwards the model's empty role chunk at once, 0.2 s before any
    word: timed from that frame, its added latency would be about -200 ms."""
    url, _ = baseline
    options = LoadOptions(
        calls=2, duration_s=0.5, ramp_s=0.0, pause_s=0.1, ttft_s=0.2, interrupt_rate=0.0, seed=1
    )
    report = await run_load(url, options)
    assert report.turns > 0 and len(report.added_latency_ms) == report.turns
    # The fake waits 0.2 s after it got the request before the first word, so the
    # first words cannot come sooner than that after the request left.
    assert min(report.added_latency_ms) >= 0


async def test_compare_baseline_puts_both_servers_figures_in_the_json() -> None:
    code, report, err = await bench_command("--calls", "3", *TINY, "--compare", "baseline")
    assert code == 0, err
    first, second = report, report["compare"]
    assert (first["server"], second["server"]) == ("callbrain", "baseline")
    assert first["target"] != second["target"]
    for run in (first, second):
        assert run["connected"] == 3 and run["turns"] > 0, run
        assert run["server_cpu_s"] > 0 and run["server_peak_rss_mb"] > 10
        assert run["server_cpu_ms_per_turn"] == pytest.approx(
            run["server_cpu_s"] * 1000 / run["turns"], rel=0.05, abs=0.02
        )
        assert run["bench_cpu_s"] > 0 and run["others_cpu_s"] >= 0
        assert run["fake_llm_cpu_s"] >= 0
        assert run["incomplete_turns"] == 0 and run["missed_pings"] == 0
    assert first["errors"] == 0
    assert second["violations"]["null_field"] > 0  # the demo's nulls, seen by the checker
    assert report["options"]["seed"] == 5 and "server_cpu_ms_per_turn" in report["ratios"]
    assert "baseline" in err and "server CPU per turn ms" in err


async def test_the_curve_writes_a_table_and_a_png(tmp_path: Path) -> None:
    page = tmp_path / "docs" / "perf.md"
    page.parent.mkdir()
    page.write_text("# Perf\n\nOur own words.\n", encoding="utf-8")
    unseeded = [a for a in TINY if a not in ("--seed", "5")]  # one is drawn for both servers
    args = ["--curve", "2,3", "--repeat", "2", *unseeded, "--compare", "baseline"]
    code, report, err = await bench_command(*args, "--markdown", str(page), timeout=300)
    assert code == 0, err
    assert [p["calls"] for p in report["points"]] == [2, 3]
    for point in report["points"]:
        first, second = point["runs"]
        assert isinstance(first["options"]["seed"], int)
        assert first["compare"]["server"] == second["compare"]["server"] == "baseline"
        assert first["order"] == ["callbrain", "baseline"]
        assert second["order"] == ["baseline", "callbrain"]  # the repeat swaps who goes first
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# Perf\n\nOur own words.\n") and BEGIN in text and END in text
    assert "callbrain bench --curve 2,3 --repeat 2 --duration 1.5" in text  # the exact command
    assert "p99 of each of the 2 runs ms" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| 2", "| 3"))]
    assert [row[1] for row in rows] == ["callbrain", "baseline"] * 2
    point = report["points"][0]["runs"]
    p99s = sorted(run["added_latency_ms"]["p99"] for run in (point[0], point[1]))
    assert rows[0][4] == " / ".join(f"{v:,.1f}" for v in p99s)  # both runs of the point
    assert rows[0][3].endswith(f" / {p99s[1]:,.1f}")  # the median of two: the slower
    assert "![p99 added latency and ping RTT p99 against calls](perf.png)" in text
    png = page.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_a_rerun_replaces_the_generated_block_and_keeps_the_prose(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    write_markdown(page, f"{BEGIN}\nold table\n{END}")
    page.write_text("intro\n\n" + page.read_text(encoding="utf-8") + "\nnotes after\n")
    write_markdown(page, f"{BEGIN}\nnew table\n{END}")
    text = page.read_text(encoding="utf-8")
    assert "intro" in text and "notes after" in text and "new table" in text
    assert "old table" not in text and text.count(BEGIN) == 1


def test_the_block_says_how_it_was_measured() -> None:
    run = {
        "server": "callbrain",
        "calls": 10,
        "connected": 8,
        "turns": 40,
        "added_latency_ms": {"p50": 5.0, "p95": 8.0, "p99": 9.0},
        "ping_rtt_ms": {"p50": 0.5, "p99": 2.0},
        "missed_pings": 0,
        "stale_frames": 0,
        "incomplete_turns": 0,
        "violations": {},
        "server_cpu_s": 5.0,
        "server_cpu_ms_per_turn": 3.1,
        "others_cpu_s": 4.0,
        "server_peak_rss_mb": 80.0,
        "bench_cpu_s": 1.0,
        "wall_s": 10.0,
        "client_loop_lag_ms": {"p50": 0.2, "p99": 70.0},
        "options": {"duration_s": 30.0, "pause_s": 8.0, "interrupt_rate": 0.2},
        "fake_llm": {"ttft_s": 0.05, "token_rate": 50.0},
    }
    machine = {
        "cores": 2,
        "cpu": "X",
        "python": "3.11",
        "callbrain": "0",
        "load_average_at_start": 1,
    }
    point = {"calls": 10, "runs": [run]}
    curve = {"started": "today", "ramp_s": None, "repeat": 1, "machine": machine, "points": [point]}
    block = markdown_block(curve, ["callbrain", "bench", "--curve", "10"], Path("p.png"))
    assert "callbrain bench --curve 10" in block and "50 ms, then 50 tokens/s" in block
    row = "| 10 (8 connected) † | callbrain | 40 | 5.0 / 9.0 | 0.5 / 2.0 | 0 | 0 | 0 | 0 | 3.1 "
    assert row + "| 50% | 80.0 | 70.0 ms, 10% | 0.40 |" in block
    assert "† The bench itself fell behind" in block and "‡" not in block
    busy_point = {"calls": 10, "runs": [{**run, "others_cpu_s": 6.0}]}
    busy = markdown_block({**curve, "points": [busy_point]}, [], Path("p.png"))
    assert "| 10 (8 connected) † ‡ |" in busy and "‡ The rest of the machine kept" in busy
    assert "(N connected): the other calls did not finish their WebSocket handshake" in block


def test_bench_bound_reads_the_bench_lag_and_cpu() -> None:
    calm = {"client_loop_lag_ms": {"p99": 5.0}, "bench_cpu_s": 2.0, "wall_s": 10.0}
    assert not bench_bound(calm)
    assert bench_bound({**calm, "client_loop_lag_ms": {"p99": 60.0}})
    assert bench_bound({**calm, "bench_cpu_s": 9.5})


def test_curve_points_are_call_counts() -> None:
    assert parse_points("100, 250,500") == [100, 250, 500]
    for bad in ("", "ten", "0,5"):
        with pytest.raises(ValueError, match="--curve"):
            parse_points(bad)


def test_without_matplotlib_the_curve_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the ``bench`` extra were not installed (None in sys.modules fails the import)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'callbrain\[bench\]'"):
        require_plotting()


def test_the_median_run_is_a_whole_run_and_of_two_the_slower() -> None:
    def run(p99: float | None) -> dict[str, Any]:
        return {"added_latency_ms": {"p99": p99}}

    fast, middle, slow, empty = run(5.0), run(9.0), run(300.0), run(None)
    assert median_run([slow, fast, middle]) is middle
    assert median_run([fast, slow]) is slow
    assert median_run([fast, empty, middle]) is middle  # a run with no sample sorts last
