"""What the metrics and tracing observers cost a call, per turn, on this machine.

    python benchmarks/observers.py [--turns N]

``callbrain bench`` measures the whole server, whose CPU per turn (socket,
JSON, the SDK's HTTP stream) hides an observer's few microseconds in its
noise on a shared machine. This times the observers alone, fed the record of
a typical turn (one model request with its tokens, one tool run), and prints
one JSON object of microseconds of CPU per turn:

* ``metrics_us``: :class:`~callbrain.observe.metrics.MetricsObserver`;
* ``tracing_us``: :class:`~callbrain.observe.tracing.TracingObserver` making
  the turn's spans into a batch processor with an exporter that drops them
  (the export itself runs on the SDK's thread, off the event loop);
* ``scrape_ms``: one ``GET /metrics`` body for that registry.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import generate_latest

from callbrain.call.record import CallRecord, ModelRecord, ToolRecord, TurnRecord
from callbrain.observe.metrics import CallMetrics, MetricsObserver, new_registry
from callbrain.observe.tracing import TracingObserver


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def typical_turn(response_id: int) -> TurnRecord:
    now = time.perf_counter()
    turn = TurnRecord(response_id, "response", arrived=now, outcome="completed")
    turn.first_frame, turn.completed = now + 0.4, now + 2.0
    turn.caller_text, turn.spoken = "Anything free on Friday?", "Friday at nine is free."
    turn.models.append(
        ModelRecord(
            "openai",
            "gpt-4o-mini",
            requested=now + 0.001,
            first_token=now + 0.3,
            input_tokens=812,
            output_tokens=24,
            outcome="ok",
            duration_s=1.9,
        )
    )
    turn.tools.append(ToolRecord("check_availability", '{"day":"friday"}', now + 0.31, "ok", 0.05))
    return turn


def per_turn_us(observer: object, turns: int) -> float:
    call = CallRecord("bench-call", "bench")
    records = [typical_turn(i) for i in range(turns)]
    observer.call_started(call)  # type: ignore[attr-defined]
    start = time.process_time()
    for turn in records:
        observer.turn_ended(call, turn)  # type: ignore[attr-defined]
    spent = time.process_time() - start
    observer.call_ended(call)  # type: ignore[attr-defined]
    return round(spent / turns * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20_000)
    args = parser.parse_args()
    metrics = CallMetrics(new_registry())
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Drop(), max_queue_size=100_000))
    result = {
        "turns": args.turns,
        "metrics_us": per_turn_us(MetricsObserver(metrics, {"check_availability"}), args.turns),
        "tracing_us": per_turn_us(
            TracingObserver.for_provider(provider, capture_text=False), args.turns
        ),
    }
    start = time.process_time()
    for _ in range(100):
        body = generate_latest(metrics.registry)
    result["scrape_ms"] = round((time.process_time() - start) / 100 * 1000, 2)
    result["scrape_bytes"] = len(body)
    provider.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
