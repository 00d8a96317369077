"""The ``server.metrics`` and ``server.tracing`` blocks of an agent file.

::

    server:
      metrics:
        allow_ips: [127.0.0.1/32, 10.0.0.0/8]   # who may scrape GET /metrics
        token: ${CALLBRAIN_METRICS_TOKEN}       # or: Authorization: Bearer <token>
      tracing:
        enabled: true
        service_name: clinic-agent
        exporter: otlp                          # needs opentelemetry-exporter-otlp-proto-http

Checked when the agent file is loaded, like the rest of ``server:``.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

LOOPBACK = ("127.0.0.0/8", "::1/128")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricsSettings(_Settings):
    """``GET /metrics`` in the Prometheus text format, on the server's own port."""

    enabled: bool = True
    """Off: no ``/metrics`` route, and the calls are not counted at all."""
    allow_ips: list[IPv4Network | IPv6Network] = Field(
        default_factory=lambda: [ip_network(net) for net in LOOPBACK]
    )
    """Addresses (CIDR) that may scrape without a token; default: loopback only.
    Behind a proxy on the same host, list it in ``server.access.trusted_proxies``,
    or every scrape through the proxy looks like loopback."""
    token: SecretStr | None = None
    """A scraper elsewhere sends ``Authorization: Bearer <token>``; compared in
    constant time and never logged. None: only ``allow_ips`` may scrape."""

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # Imported here: server.settings imports this module for its field types.
        from callbrain.server.settings import _not_blank

        return _not_blank(value)


class TracingSettings(_Settings):
    """OpenTelemetry traces: a span per call, turn, model request and tool run.

    Needs the ``otel`` extra (``pip install 'callbrain[otel]'``); the exporter's
    endpoint, headers and sampling come from the standard ``OTEL_*`` variables.
    """

    enabled: bool = False
    service_name: str = Field(default="callbrain", min_length=1)
    """The spans' ``service.name`` (``OTEL_RESOURCE_ATTRIBUTES`` may add others)."""
    capture_text: bool = False
    """Put what the caller said, what the agent spoke and tools' arguments and
    results on the spans. Off by default: traces often go where call content
    must not."""
    exporter: Literal["otlp", "console", "none"] = "otlp"
    """``otlp``: OTLP over HTTP (``pip install opentelemetry-exporter-otlp-proto-http``;
    ``OTEL_EXPORTER_OTLP_ENDPOINT``, default ``http://localhost:4318``).
    ``console``: print spans (for a try). ``none``: add your own span processor
    in code to ``app.state.telemetry.tracer_provider``."""
