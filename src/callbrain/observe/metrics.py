"""The Prometheus metrics of one app, counted from the calls' flight data.

:class:`CallMetrics` defines every metric on a registry of the app's own
(:func:`new_registry`), so several apps in one process (tests, a server with
two agents) never share or collide. :class:`MetricsObserver` is the
:class:`~callbrain.call.record.CallObserver` that counts: it reads each turn's
record when the turn ends, so the calls pay a few counter increments per turn
and nothing per frame.

Every label value comes from a fixed set or from the agent file (providers,
models, tool names), never from a call: a tool name the model made up is
counted as ``unknown``, so a misbehaving model cannot grow the series without
bound.

The seam for the call records database: it keeps a count of records it had to
drop, and plugs it in with :meth:`CallMetrics.count_records_dropped`; the
count is read at each scrape (``callbrain_records_dropped_total``, 0 until
something is plugged in).

Several worker processes (``callbrain serve --workers N``) use
prometheus_client's multiprocess mode: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` before a worker starts, every worker's metrics go
to files there, and a scrape of any worker reads them all
(:attr:`CallMetrics.scrape_registry`), so the totals are the server's. Read-at-
scrape collectors do not work there, so the records' drops are counted as they
happen instead (:meth:`CallMetrics.records_dropped`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Container, Iterator
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from callbrain.call.record import (
    CallRecord,
    IgnoredFrame,
    ModelRecord,
    RefusedSocket,
    ToolRecord,
    TurnRecord,
)

logger = logging.getLogger("callbrain.observe")

VOICE_LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)
"""Seconds. A caller notices a gap from about half a second; the buckets are
fine where a voice agent lives (50 ms to 1 s) and coarse beyond."""
TOOL_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds. Tools range from a dictionary lookup to a slow booking system."""
UNKNOWN_TOOL = "unknown"


def new_registry() -> CollectorRegistry:
    """The registry an app's metrics live in: the one place one is made.

    Not prometheus_client's global default, so apps in one process stay apart.
    """
    return CollectorRegistry()


def multiprocess_dir() -> str | None:
    """Where the workers' metrics files are, when this process is one of several
    workers (prometheus_client reads the same variable when it is imported)."""
    return os.environ.get(MULTIPROC_VARIABLE) or None


MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class CallMetrics:
    """Every callbrain metric, on ``registry`` (see the docs page for their meaning)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        shared = multiprocess_dir()
        self.scrape_registry = registry
        """What ``GET /metrics`` serves: this registry, or with several workers
        one that reads every worker's files."""
        if shared is not None:
            self.scrape_registry = CollectorRegistry()
            MultiProcessCollector(self.scrape_registry, path=shared)  # type: ignore[no-untyped-call]
        self.calls_active = Gauge(
            "callbrain_calls_active",
            "Call sockets being served now.",
            registry=registry,
            multiprocess_mode="livesum",  # the live workers' sum; a dead one's calls are gone
        )
        self.calls = Counter(
            "callbrain_calls", "Calls started (a reconnect is not a new call).", registry=registry
        )
        self.reconnects = Counter(
            "callbrain_reconnects",
            "Sockets that resumed a call after a dropped one.",
            registry=registry,
        )
        self.turns = Counter(
            "callbrain_turns",
            "Turns ended, by kind (begin, response, reminder) and outcome.",
            ["kind", "outcome"],
            registry=registry,
        )
        self.turn_first_frame = Histogram(
            "callbrain_turn_first_frame_seconds",
            "From a response request's arrival to its first content frame.",
            buckets=VOICE_LATENCY_BUCKETS,
            registry=registry,
        )
        self.llm_first_token = Histogram(
            "callbrain_llm_first_token_seconds",
            "From a model request to its first chunk (failovers included).",
            ["provider", "model"],
            buckets=VOICE_LATENCY_BUCKETS,
            registry=registry,
        )
        self.llm_tokens = Counter(
            "callbrain_llm_tokens",
            "Tokens the providers reported, by kind (input, output).",
            ["provider", "model", "kind"],
            registry=registry,
        )
        self.llm_failovers = Counter(
            "callbrain_llm_failovers",
            "Model requests a provider failed before its first chunk, moved to the next one.",
            ["provider"],
            registry=registry,
        )
        self.tool_calls = Counter(
            "callbrain_tool_calls",
            "Tool calls, by tool and outcome (ok, error, replayed, interrupted).",
            ["tool", "outcome"],
            registry=registry,
        )
        self.tool_duration = Histogram(
            "callbrain_tool_duration_seconds",
            "How long finished tool runs took.",
            ["tool"],
            buckets=TOOL_DURATION_BUCKETS,
            registry=registry,
        )
        self.frames_ignored = Counter(
            "callbrain_frames_ignored",
            "Inbound frames skipped (the call went on), by reason.",
            ["reason"],
            registry=registry,
        )
        self.sockets_refused = Counter(
            "callbrain_sockets_refused",
            "Call sockets refused before they were accepted, by reason.",
            ["reason"],
            registry=registry,
        )
        self.speculations = Counter(
            "callbrain_speculations",
            "Answers started before Retell's request, by outcome (hit: used, miss: dropped).",
            ["outcome"],
            registry=registry,
        )
        self.speculative_requests = Counter(
            "callbrain_speculative_requests",
            "Model requests started from update_only, before Retell asked (used or not).",
            registry=registry,
        )
        self.speculation_wasted = Counter(
            "callbrain_speculation_wasted_chunks",
            "Output chunks (about a token each) of speculative answers that were dropped.",
            registry=registry,
        )
        # Every reason shows from the start, at 0: a rate() needs the series to exist.
        for reason in get_args(IgnoredFrame):
            self.frames_ignored.labels(reason)
        for refused in get_args(RefusedSocket):
            self.sockets_refused.labels(refused)
        dropped = "Call records the records database had to drop."
        self._records_dropped: _ReadAtScrape | None = None
        self._dropped_counter: Counter | None = None
        if shared is None:
            self._records_dropped = _ReadAtScrape("callbrain_records_dropped", dropped)
            registry.register(self._records_dropped)
        else:
            self._dropped_counter = Counter("callbrain_records_dropped", dropped, registry=registry)

    def count_records_dropped(self, source: Callable[[], int]) -> None:
        """Report ``source()`` (a count that only grows) as
        ``callbrain_records_dropped_total`` from now on; it is called at each scrape.
        With several workers, :meth:`records_dropped` counts instead."""
        if self._records_dropped is not None:
            self._records_dropped.source = source

    def records_dropped(self, count: int) -> None:
        """``count`` more records were dropped: counted here with several
        workers (a scrape cannot read another worker's count)."""
        if self._dropped_counter is not None:
            self._dropped_counter.inc(count)


class MetricsObserver:
    """Counts calls and turns into :class:`CallMetrics` (a ``CallObserver``)."""

    def __init__(self, metrics: CallMetrics, tools: Container[str] = ()) -> None:
        """``tools``: the agent's tool names; a call of any other is counted as
        ``unknown``."""
        self.metrics = metrics
        self.tools = tools
        self._live: set[int] = set()

    def call_started(self, call: CallRecord) -> None:
        self._live.add(id(call))
        self.metrics.calls_active.inc()
        if call.socket_number == 1:
            self.metrics.calls.inc()
        else:
            self.metrics.reconnects.inc()

    def call_ended(self, call: CallRecord) -> None:
        # Only a call seen starting: a session that failed before may still end.
        if id(call) in self._live:
            self._live.discard(id(call))
            self.metrics.calls_active.dec()

    def turn_started(self, call: CallRecord, turn: TurnRecord) -> None:
        pass

    def turn_ended(self, call: CallRecord, turn: TurnRecord) -> None:
        m = self.metrics
        m.turns.labels(turn.kind, turn.outcome).inc()
        # The greeting is sent on connect, without a request: no latency to speak of.
        if turn.kind != "begin" and turn.first_frame is not None:
            m.turn_first_frame.observe(turn.first_frame - turn.arrived)
        if turn.speculation is not None:
            m.speculations.labels(turn.speculation).inc()
        if turn.speculation_wasted:
            m.speculation_wasted.inc(turn.speculation_wasted)
        if turn.speculative_requests:
            m.speculative_requests.inc(turn.speculative_requests)
        for model in turn.models:
            self._count_model(model)
        for tool in turn.tools:
            self._count_tool(tool)

    def _count_model(self, model: ModelRecord) -> None:
        m = self.metrics
        if model.first_token is not None:
            m.llm_first_token.labels(model.provider, model.model).observe(
                model.first_token - model.requested
            )
        if model.input_tokens:
            m.llm_tokens.labels(model.provider, model.model, "input").inc(model.input_tokens)
        if model.output_tokens:
            m.llm_tokens.labels(model.provider, model.model, "output").inc(model.output_tokens)
        for failure in model.failovers:
            # "provider/model: reason": the provider is a config name, the reason free text.
            m.llm_failovers.labels(failure.partition("/")[0]).inc()

    def _count_tool(self, tool: ToolRecord) -> None:
        name = tool.name if tool.name in self.tools else UNKNOWN_TOOL
        # Not finished when its turn ended: the caller barged in while it ran.
        outcome = tool.outcome if tool.duration_s is not None else "interrupted"
        self.metrics.tool_calls.labels(name, outcome).inc()
        if tool.duration_s is not None and tool.outcome != "replayed":
            self.metrics.tool_duration.labels(name).observe(tool.duration_s)

    def frame_ignored(self, call: CallRecord, reason: IgnoredFrame) -> None:
        self.metrics.frames_ignored.labels(reason).inc()

    def socket_refused(self, reason: RefusedSocket) -> None:
        self.metrics.sockets_refused.labels(reason).inc()


class _ReadAtScrape(Collector):
    """A counter whose value another component keeps: ``source()`` at each scrape."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.source: Callable[[], int] | None = None
        self._failed = False

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[Metric]:
        value = 0
        if self.source is not None:
            try:
                value = self.source()
            except Exception:
                # One broken source must not fail the whole scrape; logged once.
                if not self._failed:
                    logger.exception("could not read %s; it is left out", self.name)
                self._failed = True
                return
        yield CounterMetricFamily(self.name, self.documentation, value=value)
