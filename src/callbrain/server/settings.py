"""The ``server:`` block of an agent file: who may connect, what is accepted,
where Retell's webhooks go, and how the process stops.

These are deployment settings kept in the agent file (with the same ``${ENV}``
expansion: keep secrets in the environment, ``secret: ${CALLBRAIN_SECRET}``)
and checked at load time like everything else, so a mistake stops the start-up
with the file and the key, never a live call.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from callbrain.console.settings import ConsoleSettings
from callbrain.observe.settings import MetricsSettings, TracingSettings
from callbrain.records.settings import RecordsSettings

RETELL_IPS = ("100.20.5.228/32",)
"""Retell's published outbound address (protocol reference, section 5)."""


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_blank(value: SecretStr | None) -> SecretStr | None:
    """An empty secret is a mistake (an unset ``${VAR:-}``), never "no check":
    with an empty socket secret any empty ``?token=`` would do."""
    if value is not None and not value.get_secret_value().strip():
        raise ValueError("is empty (is its ${ENV} variable set?); set it or remove the key")
    return value


class AccessSettings(_Settings):
    """Who may open the call socket, and the limits on what they send."""

    secret: SecretStr | None = None
    """Required as a path segment (``wss://host/llm-websocket/<secret>``, to which
    Retell appends ``/{call_id}``) or as ``?token=<secret>``; compared in
    constant time before the socket is accepted. None: no secret."""
    allow_ips: list[IPv4Network | IPv6Network] = Field(default_factory=list)
    """Addresses (CIDR) allowed to connect; empty: any. Retell's is ``100.20.5.228``."""
    trusted_proxies: list[IPv4Network | IPv6Network] = Field(default_factory=list)
    """Peers whose ``X-Forwarded-For`` is believed (your load balancer); from
    anyone else the header is ignored, so it cannot be forged."""
    rejections_per_minute: int = Field(default=30, ge=1)
    """Rejected attempts logged and answered per client address per minute;
    beyond it they are dropped without a log line or a reply body."""
    max_frame_bytes: int = Field(default=1_000_000, ge=1024)
    """Largest inbound frame; a bigger one is refused with a log line (the call goes on)."""
    max_transcript_chars: int = Field(default=200_000, ge=1000)
    """Transcript text beyond this is cut from the oldest end, with a log line."""
    max_calls: int | None = Field(default=None, ge=1)
    """Concurrent calls this process accepts; more are refused (Retell retries
    elsewhere if you run several instances). None: no limit."""
    max_idle_s: float = Field(default=600.0, gt=0)
    """A call that sends no frame at all (not even a ping) for this long is
    closed, so a peer that went quiet cannot hold a ``max_calls`` slot for ever."""

    handshake_timeout_s: float = Field(default=5.0, gt=0)
    """A connection must finish its request (a WebSocket upgrade: until it is
    accepted or refused) within this long of being opened, or of its previous
    response on a kept-alive connection; else it is closed. Retell's handshake
    takes one round trip."""
    max_pending_handshakes: int = Field(default=1000, ge=1)
    """Connections that may be within their handshake at once; one more closes the
    oldest. Never more than a quarter of the process's open-file limit."""

    _secret_not_blank = field_validator("secret")(_not_blank)


class WebhookSettings(_Settings):
    """Retell's call events (``call_started``, ``call_ended``, ``call_analyzed``)."""

    api_key: SecretStr | None = None
    """The Retell API key with the "webhook" badge, which signs the events. None:
    ``POST /webhook`` is not served."""
    path: str = "/webhook"
    """Where Retell POSTs the events (its agent's or account's webhook URL)."""
    handler: str | None = None
    """``module:function`` called with each verified event (sync or async), looked up
    beside the agent file first, then on the Python import path."""
    tolerance_s: float = Field(default=300.0, gt=0)
    """Events signed longer ago (or ahead) than this are refused as replays."""
    max_body_bytes: int = Field(default=8_000_000, ge=1024)
    """Larger bodies are refused (413). Retell's biggest event, ``call_analyzed`` for
    a two-hour call (its longest) with its transcripts and tool calls, is ~4 MB."""
    body_timeout_s: float = Field(default=10.0, gt=0)
    """The whole body must arrive within this long (else 408): Retell sends it at once."""
    max_in_flight: int = Field(default=16, ge=1)
    """Webhook requests handled at once; more are answered 503 at once (Retell
    retries). With ``max_body_bytes``, bounds the memory bodies can take."""
    handler_threads: int = Field(default=4, ge=1)
    """Threads for a sync handler, its own (not the tools'). When all are busy (hung
    handlers), events are answered 503 at once."""
    handler_timeout_s: float = Field(default=8.0, gt=0)
    """Then the event is answered 500 (Retell may retry). Below Retell's 10 s
    webhook timeout, so it hears the answer."""

    _key_not_blank = field_validator("api_key")(_not_blank)


class StoreSettings(_Settings):
    """Where calls' memories and side-effecting tools' results are kept."""

    redis_url: str | None = None
    """``redis://host:6379/0`` to share them between instances (a reconnect may
    land on another one). None: in this process, or with several workers in a
    SQLite file they share (``path``)."""
    path: str | None = None
    """Without Redis: a SQLite file for the store, shared by the worker processes
    of one machine. None: in memory with one worker; with several,
    ``$XDG_DATA_HOME/callbrain/store-<port>.db`` (see docs/workers.md)."""
    ttl_s: float = Field(default=6 * 3600, gt=0)
    """How long a call's memory outlives its last change."""
    redis_prefix: str = "callbrain:"
    """Put before every key, so one Redis can serve several deployments."""
    timeout_s: float = Field(default=2.0, gt=0)
    """A store operation that takes longer is abandoned; the call goes on without it."""
    max_memory_mb: float = Field(default=256, gt=0)
    """In memory: the most this process keeps (oldest written dropped first)."""

    @model_validator(mode="after")
    def _one_place(self) -> StoreSettings:
        if self.redis_url is not None and self.path is not None:
            raise ValueError("give redis_url or path, not both: the store is in one place")
        return self


class ServerSettings(_Settings):
    """The whole process's settings: with several agent files in one server, the
    first file's block applies and the others may only repeat it."""

    access: AccessSettings = Field(default_factory=AccessSettings)
    """Who may open the call socket, and the limits on what they send."""
    store: StoreSettings = Field(default_factory=StoreSettings)
    """Where calls' memories and side-effecting tools' results are kept."""
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    """Retell's call events, signed, at ``POST /webhook``."""
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    """``GET /metrics`` for Prometheus."""
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    """OpenTelemetry traces (the ``otel`` extra)."""
    records: RecordsSettings | bool = True
    """Every call and turn in a database (see docs/call-records.md): ``false``
    turns it off; ``true``, the default SQLite file; a mapping, the settings."""
    console: ConsoleSettings | bool = False
    """The web console at ``/console/`` (see docs/console.md): ``true`` turns it
    on with a login token made at start-up; a mapping, the settings."""
    drain_s: float = Field(default=30.0, ge=0)
    """On SIGTERM: how long calls in progress may go on before their open turns
    are finished and their connections dropped (so Retell reconnects elsewhere)."""
    workers: int | None = Field(default=None, ge=1)
    """Processes serving calls on the one port (``callbrain serve --workers``
    overrides it). None: one per core, or one where a worker each would not
    do (a local model, the console); see docs/workers.md."""
    finish_turn_s: float = Field(default=10.0, ge=0)
    """Then how long an open turn may take to end by itself before it is cut
    between two chunks and completed."""
