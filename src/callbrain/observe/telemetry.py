"""What ``server.metrics`` and ``server.tracing`` ask of one app, built in one place.

``create_app`` makes a :class:`Telemetry`, puts its observers first among the
app's, serves its routes and closes it at shutdown. Code embedding the app
reaches it as ``app.state.telemetry``: ``telemetry.metrics`` (a
:class:`~callbrain.observe.metrics.CallMetrics`, None with metrics off) to plug
in the records database's dropped count, and ``telemetry.tracer_provider`` to
add a span processor of your own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Container
from typing import TYPE_CHECKING

from starlette.routing import Route

from callbrain.call.record import CallObserver
from callbrain.observe.endpoint import ClientAddress, metrics_route
from callbrain.observe.metrics import CallMetrics, MetricsObserver, new_registry

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from callbrain.server.settings import ServerSettings


class Telemetry:
    """The app's metrics and tracing, as its settings say."""

    def __init__(self, settings: ServerSettings) -> None:
        """Fails (:class:`~callbrain.extras.MissingExtraError`) when tracing is on
        without the ``otel`` extra, or with an exporter that is not installed."""
        self.settings = settings
        self.observers: list[CallObserver] = []
        self.metrics: CallMetrics | None = None
        self._counter: MetricsObserver | None = None
        self.tracer_provider: TracerProvider | None = None
        if settings.metrics.enabled:
            self.metrics = CallMetrics(new_registry())
            self._counter = MetricsObserver(self.metrics)
            self.observers.append(self._counter)
        if settings.tracing.enabled:
            from callbrain.observe import tracing  # the otel extra

            self.tracer_provider = tracing.build_tracer_provider(settings.tracing)
            self.observers.append(
                tracing.TracingObserver.for_provider(
                    self.tracer_provider, capture_text=settings.tracing.capture_text
                )
            )

    def know_tools(self, names: Container[str]) -> None:
        """The agent's tool names: the only values the tool label takes (else ``unknown``)."""
        if self._counter is not None:
            self._counter.tools = names

    def routes(self, client_address: ClientAddress) -> list[Route]:
        """``GET /metrics`` when metrics are on; ``client_address`` is the call
        socket's rule for who is asking."""
        if self.metrics is None:
            return []
        return [
            metrics_route(
                self.settings.metrics,
                self.metrics.scrape_registry,
                client_address,
                rejections_per_minute=self.settings.access.rejections_per_minute,
            )
        ]

    async def aclose(self) -> None:
        """Export the spans still queued (in a thread: an exporter may block)."""
        provider, self.tracer_provider = self.tracer_provider, None
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)
