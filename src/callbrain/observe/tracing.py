"""OpenTelemetry traces of the calls: a span per call, turn, model request and tool run.

The tree for one call (span names as a tracing UI shows them)::

    call                          SERVER    the socket, from config to close
    └── turn                      INTERNAL  one response_id (or the greeting)
        ├── chat {model}          CLIENT    one model request
        ├── execute_tool {tool}   INTERNAL  one tool run
        └── chat {model}          CLIENT    the request that read the tools' results

The model and tool spans follow the OpenTelemetry GenAI semantic conventions
(``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.usage.input_tokens`` / ``output_tokens``, ``gen_ai.tool.name``; also
the older ``gen_ai.system``, which some backends still read). Our own
attributes are ``callbrain.*``.

Turn, model and tool spans are made when the turn ends, from its record, with
the start and end times the record kept: the hot path makes no span at all,
and a turn costs its spans once. The records' ``perf_counter`` readings become
epoch nanoseconds with one offset taken when the observer is made.

What the caller said, what the agent spoke and tools' arguments and results go
on the spans only with ``capture_text``. Needs the ``otel`` extra.
"""

from __future__ import annotations

import time
from typing import Any

from callbrain import __version__
from callbrain.call.record import (
    CallRecord,
    IgnoredFrame,
    ModelRecord,
    ToolRecord,
    TurnRecord,
)
from callbrain.extras import MissingExtraError, missing_extra
from callbrain.observe.settings import TracingSettings

try:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("otel", "server.tracing") from exc

SpanKind = trace.SpanKind
_IN_PROCESS_PROVIDERS = frozenset({"local"})
"""Models run in this process: their spans are INTERNAL, not CLIENT (as the conventions say)."""


def build_tracer_provider(settings: TracingSettings) -> TracerProvider:
    """An SDK tracer provider of the app's own (not the global one), exporting as
    ``settings.exporter`` says; sampling follows ``OTEL_TRACES_SAMPLER``."""
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    exporter = _exporter(settings.exporter)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _exporter(kind: str) -> SpanExporter | None:
    if kind == "console":
        return ConsoleSpanExporter()
    if kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise MissingExtraError(
                "server.tracing.exporter 'otlp' needs the OTLP exporter: "
                "pip install opentelemetry-exporter-otlp-proto-http"
            ) from exc
        otlp: SpanExporter = OTLPSpanExporter()  # reads the OTEL_EXPORTER_OTLP_* variables
        return otlp
    return None


class TracingObserver:
    """Turns call records into spans (a ``CallObserver``; see the module docstring)."""

    def __init__(self, tracer: trace.Tracer, *, capture_text: bool = False) -> None:
        self.tracer = tracer
        self.capture_text = capture_text
        # perf_counter() + offset = Unix time, in nanoseconds.
        self._offset_ns = time.time_ns() - time.perf_counter_ns()
        self._calls: dict[int, trace.Span] = {}

    @classmethod
    def for_provider(cls, provider: TracerProvider, *, capture_text: bool) -> TracingObserver:
        return cls(provider.get_tracer("callbrain", __version__), capture_text=capture_text)

    def _ns(self, perf: float) -> int:
        return int(perf * 1e9) + self._offset_ns

    # ----------------------------------------------------------------- calls

    def call_started(self, call: CallRecord) -> None:
        self._calls[id(call)] = self.tracer.start_span(
            "call",
            kind=SpanKind.SERVER,
            # The records' clock, not call.started_at: its turns must nest inside it.
            start_time=self._ns(time.perf_counter()),
            attributes={
                "callbrain.call.id": call.call_id,
                "gen_ai.conversation.id": call.call_id,
                "gen_ai.agent.name": call.agent,
                "callbrain.call.socket": call.socket_number,
            },
        )

    def call_ended(self, call: CallRecord) -> None:
        span = self._calls.pop(id(call), None)
        if span is None:
            return
        span.set_attribute("callbrain.call.end", call.end)
        if call.end == "error":
            span.set_status(trace.StatusCode.ERROR, "the session failed")
        span.end(end_time=self._ns(time.perf_counter()))

    def frame_ignored(self, call: CallRecord, reason: IgnoredFrame) -> None:
        span = self._calls.get(id(call))
        if span is not None:
            span.add_event("frame_ignored", {"callbrain.frame.reason": reason})

    # ----------------------------------------------------------------- turns

    def turn_started(self, call: CallRecord, turn: TurnRecord) -> None:
        pass

    def turn_ended(self, call: CallRecord, turn: TurnRecord) -> None:
        parent = self._calls.get(id(call))
        context = trace.set_span_in_context(parent) if parent is not None else None
        end = turn.completed if turn.completed is not None else time.perf_counter()
        attributes: dict[str, Any] = {
            "callbrain.turn.response_id": turn.response_id,
            "callbrain.turn.kind": turn.kind,
            "callbrain.turn.outcome": turn.outcome,
        }
        if turn.action is not None:
            attributes["callbrain.turn.action"] = turn.action
        if self.capture_text:
            attributes["callbrain.turn.caller_text"] = turn.caller_text
            attributes["callbrain.turn.spoken"] = turn.spoken
        if turn.speculation is not None:
            attributes["callbrain.turn.speculation"] = turn.speculation
        # An answer started before the request (speculation) starts the turn's span,
        # so its model span stays inside it; the request's arrival is an event.
        began = min([turn.arrived, *(m.requested for m in turn.models)])
        span = self.tracer.start_span(
            "turn",
            context=context,
            start_time=self._ns(began),
            attributes=attributes,
        )
        if began < turn.arrived:
            span.add_event("request", timestamp=self._ns(turn.arrived))
        if turn.first_frame is not None:
            span.add_event("first_frame", timestamp=self._ns(turn.first_frame))
        if turn.outcome == "fallback":
            span.set_status(trace.StatusCode.ERROR, turn.error or "fallback line spoken")
        inner = trace.set_span_in_context(span)
        for model in turn.models:
            self._model_span(model, inner, end)
        for tool in turn.tools:
            self._tool_span(tool, inner, end)
        span.end(end_time=self._ns(max(end, turn.arrived)))

    def _model_span(self, model: ModelRecord, context: Any, turn_end: float) -> None:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": model.provider,
            "gen_ai.system": model.provider,
            "gen_ai.request.model": model.model,
            "callbrain.llm.outcome": model.outcome,
        }
        if model.first_token is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = model.first_token - model.requested
        if model.input_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = model.input_tokens
        if model.output_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = model.output_tokens
        in_process = model.provider in _IN_PROCESS_PROVIDERS
        span = self.tracer.start_span(
            f"chat {model.model}",
            context=context,
            kind=SpanKind.INTERNAL if in_process else SpanKind.CLIENT,
            start_time=self._ns(model.requested),
            attributes=attributes,
        )
        for failure in model.failovers:
            span.add_event(
                "failover",
                {"gen_ai.provider.name": failure.partition("/")[0], "callbrain.reason": failure},
                timestamp=self._ns(model.requested),
            )
        if model.outcome == "timeout" or model.outcome.startswith("error"):
            span.set_attribute("error.type", model.outcome)
            span.set_status(trace.StatusCode.ERROR)
        end = turn_end if model.duration_s is None else model.requested + model.duration_s
        span.end(end_time=self._ns(max(end, model.requested)))

    def _tool_span(self, tool: ToolRecord, context: Any, turn_end: float) -> None:
        outcome = tool.outcome if tool.duration_s is not None else "interrupted"
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool.name,
            "gen_ai.tool.type": "function",
            "callbrain.tool.outcome": outcome,
        }
        if tool.action is not None:
            attributes["callbrain.tool.action"] = tool.action
        if self.capture_text:
            attributes["gen_ai.tool.call.arguments"] = tool.arguments
            attributes["gen_ai.tool.call.result"] = tool.result
        span = self.tracer.start_span(
            f"execute_tool {tool.name}",
            context=context,
            start_time=self._ns(tool.started),
            attributes=attributes,
        )
        if outcome == "error":
            span.set_attribute("error.type", "tool_error")
            span.set_status(trace.StatusCode.ERROR)
        end = turn_end if tool.duration_s is None else tool.started + tool.duration_s
        span.end(end_time=self._ns(max(end, tool.started)))
