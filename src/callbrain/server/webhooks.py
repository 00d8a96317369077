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

Handlers run with a timeout below Retell's 10 s webhook timeout, so Retell gets
an answer (500: it may retry) rather than a dropped connection.
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
from callbrain.signing import retell_refusal
from callbrain.tools.function import ToolReferenceError, load_callable

logger = logging.getLogger("callbrain.server.webhooks")

SIGNATURE_HEADER = "X-Retell-Signature"
KNOWN_EVENTS = frozenset({"call_started", "call_ended", "call_analyzed"})
"""Documented event types; others are passed on unchanged."""
MAX_BODY_BYTES = 5_000_000
"""A call_analyzed event with a long transcript is well under 1 MB."""
HANDLER_TIMEOUT_S = 8.0
"""Below Retell's 10 s webhook timeout, so it hears our 500 instead of timing out."""


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


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The raw body, or None as soon as it exceeds ``limit`` (without reading the rest)."""
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
    return bytes(body)


async def _call_handler(handler: WebhookHandler, event: WebhookEvent) -> None:
    result: object
    if inspect.iscoroutinefunction(handler):
        result = handler(event)
    else:
        # In a thread: a slow sync handler (a database write) must not stall live
        # calls. On timeout the thread cannot be stopped and finishes in the background.
        result = await asyncio.to_thread(handler, event)
    # A callable that is not a coroutine function may still hand back a coroutine
    # (an object with an async __call__): it runs here, on the loop.
    if inspect.isawaitable(result):
        await result


def webhook_endpoint(
    api_key: str,
    handler: WebhookHandler | None = None,
    *,
    tolerance_s: float = 300,
    max_body_bytes: int = MAX_BODY_BYTES,
    timeout_s: float = HANDLER_TIMEOUT_S,
) -> Callable[[Request], Awaitable[Response]]:
    """The Starlette endpoint: read, verify, parse, hand over, answer.

    401 bad signature, 413 too big, 400 verified but not an event, 500 handler
    failed or timed out (Retell may retry), 204 handled. Refusals are logged with
    the client address and the reason, never the key or the signature.
    """

    async def endpoint(request: Request) -> Response:
        client = request.client.host if request.client else "unknown"
        try:
            raw = await _read_body(request, max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read the answer
        if raw is None:
            logger.warning("webhook from %s refused: body over %d bytes", client, max_body_bytes)
            return PlainTextResponse("body too large", status_code=413)
        header = request.headers.get(SIGNATURE_HEADER)
        reason = retell_refusal(api_key, raw, header, tolerance_s=tolerance_s)
        if reason is not None:
            logger.warning("webhook from %s refused: %s", client, reason)
            return PlainTextResponse("invalid signature", status_code=401)
        try:
            event = WebhookEvent.from_payload(orjson.loads(raw))
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            logger.warning("signed webhook from %s is not an event: %s", client, exc)
            return PlainTextResponse("not a Retell event", status_code=400)
        token = call_id_var.set(event.call_id or "-")  # the handler's log lines name the call
        try:
            if handler is None:
                logger.info(
                    "webhook %s for call %s (no handler configured)", event.event, event.call_id
                )
                return Response(status_code=204)
            try:
                await asyncio.wait_for(_call_handler(handler, event), timeout_s)
            except TimeoutError:
                logger.error("webhook handler for %s timed out after %g s", event.event, timeout_s)
                return PlainTextResponse("handler failed", status_code=500)
            except Exception:
                logger.exception("webhook handler for %s failed", event.event)
                return PlainTextResponse("handler failed", status_code=500)
            return Response(status_code=204)
        finally:
            call_id_var.reset(token)

    return endpoint


def webhook_routes(agent: Agent, on_webhook: WebhookHandler | None = None) -> list[Route]:
    """``POST server.webhooks.path`` if the agent has a webhook key, else nothing.

    The handler is ``on_webhook`` or, failing that, ``server.webhooks.handler``
    imported now, so a bad reference stops the server at start-up. Raises
    :class:`AgentConfigError` for a reference that does not load, a handler that
    cannot take an event, or a handler without a key (it could never be called).
    """
    settings = agent.server.webhooks
    where = f"agent {agent.name!r}: server.webhooks"
    handler = on_webhook
    if handler is None and settings.handler is not None:
        try:
            handler = load_callable(settings.handler)
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
    endpoint = webhook_endpoint(api_key, handler, tolerance_s=settings.tolerance_s)
    return [Route("/" + settings.path.strip("/"), endpoint, methods=["POST"])]
