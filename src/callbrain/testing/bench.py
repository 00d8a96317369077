"""The load behind ``callbrain bench``: many simulated Retell calls at once.

Every call behaves like Retell on a real line: it connects, answers the
``config`` (sending ``call_details`` when asked), pings every 2 s, waits for
the greeting, then speaks a turn every few seconds, sometimes barging in on
the agent's reply. Every frame goes through the protocol checker, so the
report counts stale frames, missed pings and unfinished turns as well as
latency.

What the bench measures is the server, not its model: the server's model is
a fake with a fixed time to first token, and *added latency* is the time from
``response_required`` to the first response frame with text in it (what
Retell can start to speak), minus that fixed time. A frame with no text does
not count: a server that forwards the model's empty first chunk at once would
otherwise look faster than its model. The bench client shares the machine, so
it also reports its own event-loop lag: when that is high, the latencies are
the client's as much as the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from callbrain.retell.frames import PING_INTERVAL_S
from callbrain.testing.checker import ProtocolChecker, TurnRecord
from callbrain.testing.client import RetellClient, user

_LINES = (
    "Hi, I'd like to book an appointment for next week.",
    "What time do you open on Saturday?",
    "Can you tell me where you are?",
    "Do you have anything on Tuesday afternoon?",
    "Great, thanks. One more question.",
)


@dataclass(frozen=True)
class LoadOptions:
    calls: int = 100
    """Concurrent calls."""
    duration_s: float = 30.0
    """How long every call keeps talking once all calls are connected."""
    ramp_s: float | None = None
    """Spread the connects over this long (default: 200 calls a second)."""
    pause_s: float = 8.0
    """Mean time from the end of a reply's text to the caller's next turn. A reply
    streams in well under a second but takes seconds to speak, and the caller then
    talks, so 8 s is about the pace of a phone conversation."""
    interrupt_rate: float = 0.2
    """Share of turns the caller barges in on, after the reply's first words."""
    ttft_s: float = 0.3
    """The fake model's time to first token, subtracted from the latency."""
    final_update_s: float = 0.0
    """How long before each request the caller's finished words arrive in an
    ``update_only``, as Retell sends them (it asks for a response only once its
    turn-taking decides the caller is done). 0: together, as before."""
    continue_rate: float = 0.2
    """With ``final_update_s``: share of turns where the caller pauses after one
    finished sentence and then says another, as people do (what an answer
    started early on the first sentence gets wrong)."""
    reply_timeout_s: float = 15.0
    seed: int | None = None

    @property
    def ramp(self) -> float:
        return self.ramp_s if self.ramp_s is not None else max(1.0, self.calls / 200)


@dataclass
class LoadReport:
    """What one bench run saw, from the callers' side."""

    calls: int = 0
    connected: int = 0
    turns: int = 0
    interrupted: int = 0
    added_latency_ms: list[float] = field(default_factory=list)
    first_words_ms: list[float] = field(default_factory=list)
    """From each request to the reply's first words, the model's own time included."""
    ping_rtt_ms: list[float] = field(default_factory=list)
    missed_pings: int = 0
    stale_frames: int = 0
    incomplete_turns: int = 0
    errors: int = 0
    """Calls that failed to connect or were closed by the server, plus every
    protocol violation other than those counted above."""
    violations: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    client_lag_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    _sampled: set[str] = field(default_factory=set, repr=False)

    def error(self, text: str, kind: str) -> None:
        """Count an error; keep the first sample of each ``kind`` (ten at most), so one
        error repeated on every frame does not hide the others."""
        self.errors += 1
        if len(self.error_samples) < 10 and kind not in self._sampled:
            self._sampled.add(kind)
            self.error_samples.append(text)

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "connected": self.connected,
            "turns": self.turns,
            "interrupted_turns": self.interrupted,
            "added_latency_ms": percentiles(self.added_latency_ms, (50, 95, 99)),
            "first_words_ms": percentiles(self.first_words_ms, (50, 95, 99)),
            "ping_rtt_ms": percentiles(self.ping_rtt_ms, (50, 99)),
            "missed_pings": self.missed_pings,
            "stale_frames": self.stale_frames,
            "incomplete_turns": self.incomplete_turns,
            "errors": self.errors,
            "violations": dict(sorted(self.violations.items())),
            "error_samples": self.error_samples,
            "client_loop_lag_ms": percentiles(self.client_lag_ms, (50, 99)),
            "wall_s": round(self.wall_s, 1),
        }


def percentiles(values: list[float], which: tuple[int, ...]) -> dict[str, float | None]:
    """Nearest-rank percentiles, rounded to 0.1 ms; None without samples."""
    ordered = sorted(values)
    result: dict[str, float | None] = {}
    for p in which:
        if not ordered:
            result[f"p{p}"] = None
            continue
        rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
        result[f"p{p}"] = round(ordered[rank], 1)
    return result


async def run_load(url: str, options: LoadOptions) -> LoadReport:
    """Run ``options.calls`` simulated calls against ``url`` and collect the report."""
    report = LoadReport(calls=options.calls)
    rng = random.Random(options.seed)
    started = time.monotonic()
    stop_at = started + options.ramp + options.duration_s
    lag = asyncio.create_task(_measure_lag(report))
    step = options.ramp / max(1, options.calls)
    tasks = [
        asyncio.create_task(
            _call(url, f"bench-{n}", n * step, stop_at, options, rng.random(), report)
        )
        for n in range(options.calls)
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        lag.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lag
    report.wall_s = time.monotonic() - started
    return report


async def _call(
    url: str,
    call_id: str,
    delay: float,
    stop_at: float,
    options: LoadOptions,
    seed: float,
    report: LoadReport,
) -> None:
    rng = random.Random(seed)
    await asyncio.sleep(delay)
    try:
        async with RetellClient.connect(url, call_id, open_timeout=30, keep_sent=False) as call:
            report.connected += 1
            try:
                await _converse(call, stop_at, options, rng, report)
            except (ConnectionError, ConnectionClosed):
                closed = f"{call_id}: the server closed the socket (code {call.close_code})"
                report.error(closed, "closed")
            _collect(call.checker, options, report)
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        report.error(f"{call_id}: could not connect: {exc!r}", "connect")


async def _converse(
    call: RetellClient, stop_at: float, options: LoadOptions, rng: random.Random, report: LoadReport
) -> None:
    first = await call.next_frame(timeout=options.reply_timeout_s)
    if first.get("response_type") == "config" and first.get("config", {}).get("call_details"):
        await call.send_call_details({"call_id": "bench", "call_type": "web_call"})
    call.start_pinging(PING_INTERVAL_S)
    checker = call.checker
    with contextlib.suppress(TimeoutError):
        await call.wait_for(_completed(checker.begin), options.reply_timeout_s)
    last: int | None = None
    barge = False  # the next turn cuts into the reply to the last one
    while time.monotonic() < stop_at:
        if not barge:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * options.pause_s)
            if time.monotonic() >= stop_at:
                break
        elif last is not None and checker.turns[last].text:
            # Retell's transcript keeps what the agent said before the caller cut in.
            call.transcript.append({"role": "agent", "content": checker.turns[last].text})
        more = rng.choice(_LINES) if rng.random() < options.continue_rate else None
        last = await _speak(call, rng.choice(_LINES), options.final_update_s, more)
        report.turns += 1
        report.interrupted += barge
        barge = rng.random() < options.interrupt_rate
        turn = checker.turns[last]
        try:
            if barge:
                await call.wait_for(_started(turn), options.reply_timeout_s)
                await asyncio.sleep(rng.uniform(0.0, 0.3))
            else:
                await call.wait_for(_completed(turn), options.reply_timeout_s)
                if turn.text:
                    call.transcript.append({"role": "agent", "content": turn.text})
                call.forget_frames()  # the checker has them; memory stays flat
        except TimeoutError:
            barge = False
    # Let the last reply finish and every frame arrive before judging.
    if last is not None:
        final = checker.turns[last]
        with contextlib.suppress(TimeoutError):
            await call.wait_for(_completed(final), options.reply_timeout_s)
    with contextlib.suppress(TimeoutError):
        await call.ping(timeout=options.reply_timeout_s)
    call.stop_pinging()


async def _speak(call: RetellClient, text: str, final_update_s: float, more: str | None) -> int:
    """The caller says ``text``: its words in an ``update_only`` ``final_update_s``
    before the request (0: the two at once, as :meth:`RetellClient.say`); with
    ``more``, a pause after ``text`` and then ``more`` too."""
    if final_update_s <= 0:
        return await call.say(text if more is None else f"{text} {more}")
    call.transcript.append(user(text))
    await call.update()
    await asyncio.sleep(final_update_s)
    if more is not None:
        call.transcript[-1] = user(f"{text} {more}")
        await call.update()
        await asyncio.sleep(final_update_s)
    await call.update(turntaking="agent_turn")
    return await call.request()


def _started(turn: TurnRecord) -> Callable[[object], bool]:
    """The agent has begun to speak (or finished without a word): a caller can cut in."""
    return lambda _: turn.first_text_at is not None or turn.completes > 0


def _completed(turn: TurnRecord) -> Callable[[object], bool]:
    return lambda _: turn.completes > 0


def _collect(checker: ProtocolChecker, options: LoadOptions, report: LoadReport) -> None:
    checker.finish(time.monotonic())
    for turn in checker.turns.values():
        # A reply that is deliberately silent (complete, no text) is timed by its frame.
        answered = turn.first_text_at
        if answered is None and turn.completes:
            answered = turn.first_frame_at
        if answered is not None:
            waited = (answered - turn.requested_at - options.ttft_s) * 1000
            report.added_latency_ms.append(waited)
            report.first_words_ms.append((answered - turn.requested_at) * 1000)
    report.ping_rtt_ms.extend(rtt * 1000 for rtt in checker.ping_rtts)
    report.missed_pings += checker.missed_pings
    report.stale_frames += checker.stale_frames
    for violation in checker.violations:
        report.violations[violation.rule] += 1
        if violation.rule == "turn_incomplete":
            report.incomplete_turns += 1
        elif violation.rule not in ("ping_missed", "stale_frame"):
            report.error(str(violation), violation.rule)


async def _measure_lag(report: LoadReport, interval: float = 0.1) -> None:
    """How late the client's own event loop wakes up: its share of the latencies."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(interval)
        report.client_lag_ms.append(max(0.0, (time.monotonic() - before - interval) * 1000))
