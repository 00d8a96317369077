"""Structured logs where every line says which call it belongs to, and none
shows a secret.

The call id lives in a context variable set when a socket opens; asyncio tasks
copy the context when they are created, so every turn task, provider stream and
log line of that call carries it without being passed around.

uvicorn logs each WebSocket handshake as ``"WebSocket <path>" 403`` with the
raw path and query, which may hold the socket secret. :class:`RedactingFilter`
on its logger shows the access guard's redacted path instead (set per
connection in :data:`handshake_line_var`), drops the line for a refusal over
the rate limit, and masks any registered secret in any of its lines as a safety
net (the websockets library's debug lines include the path before the guard
has run).
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from dataclasses import dataclass
from typing import Literal

import orjson

REDACTED = "<redacted>"

call_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("call_id", default="-")


class CallIdFilter(logging.Filter):
    """Stamps ``record.call_id`` from the current context."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.call_id = call_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines; ``worker``: the worker
    number of ``callbrain serve --workers``, in every line."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "call_id": getattr(record, "call_id", "-"),
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s call=%(call_id)s %(message)s"
LogLevel = Literal["debug", "info", "warning", "error"]

PER_REQUEST_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2")
"""HTTP clients under the provider SDKs and HTTP tools, which log a line at INFO
for every request they make: one per model request of every turn. Their
warnings and errors still show; their INFO lines only at ``debug``."""


def configure_logging(
    level: str = "info", *, json: bool = False, worker: int | None = None
) -> None:
    """Route callbrain's and uvicorn's logs through one handler with call ids
    (and, in a worker of several, the worker's number: their lines interleave)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CallIdFilter())
    text = (
        TEXT_FORMAT if worker is None else TEXT_FORMAT.replace(" call=", f" worker={worker} call=")
    )
    handler.setFormatter(JsonFormatter(worker) if json else logging.Formatter(text))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    quiet = logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING
    for name in PER_REQUEST_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


@dataclass(frozen=True, slots=True)
class HandshakeLine:
    """How uvicorn's line for this connection's handshake should read."""

    path: str
    """The request path with any secret replaced by :data:`REDACTED`."""
    quiet: bool
    """Drop the line (a refusal over the per-address rate limit)."""


handshake_line_var: contextvars.ContextVar[HandshakeLine | None] = contextvars.ContextVar(
    "callbrain_handshake_line", default=None
)
"""Set by the access guard in the connection's own task, which is where uvicorn
logs the handshake outcome (inside the app's send of accept or close)."""


class RedactingFilter(logging.Filter):
    """See the module docstring; installed on ``uvicorn.error`` by :func:`redact_secret`."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple):
            return True
        shown = handshake_line_var.get()
        if (
            shown is not None
            and len(args) >= 2
            and isinstance(record.msg, str)
            and '"WebSocket %s"' in record.msg
        ):
            if shown.quiet:
                return False
            args = (args[0], shown.path, *args[2:])
        if self.secrets:
            args = tuple(self._mask(a) if isinstance(a, str) else a for a in args)
            if isinstance(record.msg, str):
                record.msg = self._mask(record.msg)
        record.args = args
        return True

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


_REDACTING_FILTER = RedactingFilter()


def redact_secret(secret: str) -> None:
    """Mask ``secret`` in uvicorn's log lines from now on (and install the filter)."""
    _REDACTING_FILTER.secrets.add(secret)
    logging.getLogger("uvicorn.error").addFilter(_REDACTING_FILTER)  # idempotent
