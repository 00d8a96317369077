"""Retell's call events (``POST /webhook``), verified before any code sees them.

Retell POSTs ``call_started``, ``call_ended`` and ``call_analyzed`` (and newer
event types, which are passed on too) to the agent's webhook URL, signed with
the workspace API key that has the "webhook" badge::

    X-Retell-Signature: v=<unix ms>,d=<hex HMAC-SHA256(api_key, raw_body + v)>

Anyone on the internet can POST to that URL, so an unverified event is worth
nothing. The signature is checked over the raw body, in constant time, within
a replay window (:mod:`callbrain.signing`), and nothing is parsed before it
holds, which also keeps the JSON parser away from anonymous input. Within the
window a replay is still possible, and Retell itself may retry, so handlers
should be idempotent per ``(call_id, event)``.

Strangers can still send bodies, slowly or many at once, so before any of
that: at most ``max_in_flight`` requests are handled at once (more get 503 at
once), a request whose signature header is missing, malformed or stale is
refused before its body is read, the body must arrive within
``body_timeout_s`` (else 408) and be at most ``max_body_bytes`` (else 413).
Refusals are logged at most ``server.access.rejections_per_minute`` times per
client address, like refused call sockets.

Handlers run with a timeout below Retell's 10 s webhook timeout, so Retell gets
an answer (500: it may retry) rather than a dropped connection. Sync handlers
run on threads of their own (:mod:`callbrain.server.handler_threads`), never on
those the calls' sync tools use; when all are taken by hung handlers, events get
503 at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from callbrain.agent import Agent
from callbrain.errors import AgentConfigError
from callbrain.logs import call_id_var
from callbrain.server.access import RejectionLimiter
from callbrain.server.handler_threads import HandlerThreads
from callbrain.server.settings import WebhookSettings
from callbrain.signing import retell_header_refusal, retell_refusal
from callbrain.tools.references import ToolReferenceError, load_callable

logger = logging.getLogger("callbrain.server.webhooks")

SIGNATURE_HEADER = "X-Retell-Signature"
KNOWN_EVENTS = frozenset({"call_started", "call_ended", "call_analyzed"})
"""Documented event types; others are passed on unchanged."""
_RETRY_SOON = {"retry-after": "1"}
_NO_THREAD = "handler threads"
"""The rate-limit key of "no thread free" lines: about this server, not a client."""


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One verified event: its type, Retell's call object, and the whole payload."""

    event: str
    """``call_started``, ``call_ended``, ``call_analyzed``, or a newer type."""
    call: dict[str, Any]
    """The call object (``call_id``, numbers, transcript, ``call_analysis``...)."""
    raw: dict[str, Any]
    """The payload as sent, for fields this model does not name."""

    @property
    def call_id(self) -> str | None:
        call_id = self.call.get("call_id")
        return call_id if isinstance(call_id, str) else None

    @classmethod
    def from_payload(cls, payload: Any) -> WebhookEvent:
        """Raises ValueError unless ``payload`` is an object with a string ``event``."""
        if not isinstance(payload, dict):
            raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
        event = payload.get("event")
        if not isinstance(event, str) or not event:
            raise ValueError("no 'event' string")
        call = payload.get("call", {})
        if not isinstance(call, dict):
            raise ValueError(f"'call' is a {type(call).__name__}, not an object")
        return cls(event=event, call=call, raw=payload)


WebhookHandler: TypeAlias = Callable[[WebhookEvent], Awaitable[None] | None]
"""Called with each verified event; sync functions run in a worker thread."""


class _NoThreadFree(Exception):
    """Every handler thread is busy."""


async def _read_body(request: Request, limit: int) -> bytearray | None:
    """The raw body, or None as soon as it exceeds ``limit`` (without reading the rest).
    A bytearray, not bytes: copying a body of megabytes would double its memory."""
    try:  # not str.isdigit(): it takes "²", which int() refuses
        declared = int(request.headers.get("content-length", ""))
    except ValueError:
        declared = 0  # absent or odd: the stream is counted below anyway
    if declared > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return body


async def _call_handler(
    handler: WebhookHandler, event: WebhookEvent, threads: HandlerThreads
) -> None:
    result: object
    if inspect.iscoroutinefunction(handler):
        result = handler(event)
    else:
        # On a thread: a slow sync handler (a database write) must not stall live
        # calls. On timeout the thread cannot be stopped and finishes in the background.
        running = threads.submit(handler, event)
        if running is None:
            raise _NoThreadFree
        result = await running
    # A callable that is not a coroutine function may still hand back a coroutine
    # (an object with an async __call__): it runs here, on the loop.
    if inspect.isawaitable(result):
        await result


def webhook_endpoint(
    api_key: str,
    handler: WebhookHandler | None = None,
    settings: WebhookSettings | None = None,
    *,
    threads: HandlerThreads | None = None,
    rejections_per_minute: int = 30,
) -> Callable[[Request], Awaitable[Response]]:
    """The Starlette endpoint: admit, read, verify, parse, hand over, answer.

    503 too many at once or no handler thread free, 401 bad signature, 408 body too
    slow, 413 too big, 400 verified but not an event, 500 handler failed or timed
    out (Retell may retry), 204 handled. Refusals are logged with the client
    address and the reason, never the key or the signature, within
    ``rejections_per_minute`` per address.
    """
    limits = settings or WebhookSettings()
    pool = threads or HandlerThreads(limits.handler_threads)
    limiter = RejectionLimiter(rejections_per_minute)
    in_flight = 0

    def log_refusal(key: str, message: str, *args: object) -> None:
        verdict = limiter.hit(key)
        if verdict == "log":
            logger.warning(message, *args)
        elif verdict == "suppress":
            logger.warning(
                "refused %d webhooks (%s) this minute (rejections_per_minute); "
                "further refusals this minute are not logged",
                limiter.per_minute + 1,
                key,
            )

    def refuse(
        client: str, status: int, text: str, reason: str, headers: dict[str, str] | None = None
    ) -> Response:
        log_refusal(client, "webhook from %s refused: %s", client, reason)
        return PlainTextResponse(text, status_code=status, headers=headers)

    async def endpoint(request: Request) -> Response:
        nonlocal in_flight
        client = request.client.host if request.client else "unknown"
        if in_flight >= limits.max_in_flight:
            reason = f"{in_flight} webhooks in progress (max_in_flight)"
            return refuse(client, 503, "busy", reason, _RETRY_SOON)
        in_flight += 1
        try:
            return await handle(request, client)
        finally:
            in_flight -= 1

    async def handle(request: Request, client: str) -> Response:
        header = request.headers.get(SIGNATURE_HEADER)
        # What the header alone shows is refused before a byte of the body is read.
        reason = retell_header_refusal(header, tolerance_s=limits.tolerance_s)
        if reason is not None:
            return refuse(client, 401, "invalid signature", reason)
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                raw = await _read_body(request, limits.max_body_bytes)
        except TimeoutError:
            reason = f"body not received within {limits.body_timeout_s:g} s (body_timeout_s)"
            # Closed after the answer: the rest of a slow body is not worth waiting for.
            return refuse(client, 408, "body too slow", reason, {"connection": "close"})
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read the answer
        if raw is None:
            reason = f"body over {limits.max_body_bytes} bytes (max_body_bytes)"
            return refuse(client, 413, "body too large", reason)
        reason = retell_refusal(api_key, raw, header, tolerance_s=limits.tolerance_s)
        if reason is not None:
            return refuse(client, 401, "invalid signature", reason)
        try:
            event = WebhookEvent.from_payload(orjson.loads(raw))
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            return refuse(client, 400, "not a Retell event", f"signed but not an event: {exc}")
        del raw  # the parsed event is all that is kept from here on
        token = call_id_var.set(event.call_id or "-")  # the handler's log lines name the call
        try:
            return await deliver(event)
        finally:
            call_id_var.reset(token)

    async def deliver(event: WebhookEvent) -> Response:
        if handler is None:
            logger.info(
                "webhook %s for call %s (no handler configured)", event.event, event.call_id
            )
            return Response(status_code=204)
        timeout_s = limits.handler_timeout_s
        try:
            await asyncio.wait_for(_call_handler(handler, event, pool), timeout_s)
        except _NoThreadFree:
            log_refusal(
                _NO_THREAD,
                "webhook %s answered 503: all %d handler threads are busy "
                "(handlers that hang?); server.webhooks.handler_threads",
                event.event,
                pool.size,
            )
            return PlainTextResponse("busy", status_code=503, headers=_RETRY_SOON)
        except TimeoutError:
            logger.error("webhook handler for %s timed out after %g s", event.event, timeout_s)
            return PlainTextResponse("handler failed", status_code=500)
        except Exception:
            logger.exception("webhook handler for %s failed", event.event)
            return PlainTextResponse("handler failed", status_code=500)
        return Response(status_code=204)

    return endpoint


def webhook_routes(
    agent: Agent, on_webhook: WebhookHandler | None = None, *, threads: HandlerThreads | None = None
) -> list[Route]:
    """``POST server.webhooks.path`` if the agent has a webhook key, else nothing.

    The handler is ``on_webhook`` or, failing that, ``server.webhooks.handler``
    imported now, so a bad reference stops the server at start-up. Raises
    :class:`AgentConfigError` for a reference that does not load, a handler that
    cannot take an event, or a handler without a key (it could never be called).
    """
    settings = agent.server.webhooks
    where = f"{agent.source}: server.webhooks"
    handler = on_webhook
    if handler is None and settings.handler is not None:
        try:
            handler = load_callable(settings.handler, folder=agent.folder)
        except ToolReferenceError as exc:
            # load_callable speaks of tools; this reference is a webhook handler.
            raise AgentConfigError(f"{where}.handler: {str(exc).removeprefix('tool ')}") from None
    if handler is not None:
        try:
            inspect.signature(handler).bind(None)
        except TypeError:
            raise AgentConfigError(
                f"{where}.handler: {handler!r} must take one argument, the event"
            ) from None
        except ValueError:
            pass  # no signature to inspect (some builtins); it will fail on the first event
    if settings.api_key is None:
        if handler is not None:
            raise AgentConfigError(
                f"{where}: a handler needs api_key (the key with Retell's "
                '"webhook" badge), or events could never be verified'
            )
        return []
    api_key = settings.api_key.get_secret_value()  # never empty: the settings refuse that
    endpoint = webhook_endpoint(
        api_key,
        handler,
        settings,
        threads=threads,
        rejections_per_minute=agent.server.access.rejections_per_minute,
    )
    return [Route("/" + settings.path.strip("/"), endpoint, methods=["POST"])]
