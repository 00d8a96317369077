"""Webhook tools: POST the model's arguments as JSON to a URL; the reply is the result.

What the receiver gets
----------------------
``POST <url>`` with the validated arguments as a JSON object in the body and:

* ``Content-Type: application/json``
* ``X-Callbrain-Call-Id``: the Retell call id.
* ``X-Callbrain-Tool-Call-Id``: the model's id for this tool call. Tool call ids
  are only unique within a call (a local model may number them ``call_0``...),
  so key idempotency on the pair (call id, tool call id).
* ``X-Callbrain-Signature: t=<unix ms>,v1=<hex>`` when a ``secret`` is set.
* any ``headers`` configured for the tool (an ``Authorization`` header, say).

Verifying the signature
-----------------------
``v1`` is the hex HMAC-SHA256, keyed with the secret, of ``f"{t}."`` followed by
the raw request body bytes (the scheme Stripe uses, so receivers know it). To
verify: recompute it over the body exactly as received (before any JSON
parsing), compare with ``hmac.compare_digest`` (a plain ``==`` leaks, through
timing, how much of a forged signature is right), and reject a ``t`` more than a
few minutes from your clock, which stops a captured request being replayed
later. :func:`callbrain.signing.verify_tool_request` does all three. A signature rather than the
secret itself in a header: the secret never travels, so a proxy or a request
log that sees the headers learns nothing it can reuse.

The response body, decoded as text, is the tool's result (JSON passes through
as it is); a long body is cut to ``max_result_chars`` because every character
costs the model context and the caller latency. Any non-2xx status, timeout or
connection failure becomes a :class:`ToolError` worded for the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import httpx2
import orjson

from callbrain.signing import sign_tool_request
from callbrain.tools.base import DEFAULT_TIMEOUT_S, Tool, ToolContext, ToolError

logger = logging.getLogger("callbrain.tools")

SIGNATURE_HEADER = "X-Callbrain-Signature"
CALL_ID_HEADER = "X-Callbrain-Call-Id"
TOOL_CALL_ID_HEADER = "X-Callbrain-Tool-Call-Id"
DEFAULT_MAX_RESULT_CHARS = 4000
"""About a thousand tokens: plenty for "booked for 7pm, confirmation 8841"."""
_EXCERPT_CHARS = 300


class HttpTool(Tool):
    """A tool that calls a webhook; see the module docstring for the contract.

    Its arguments are checked against ``parameters`` (JSON schema) before the
    request is made. It keeps one HTTP client (connection reuse matters when a
    call makes several requests); :meth:`aclose` releases it.
    """

    def __init__(
        self,
        *,
        name: str,
        description: str,
        url: str,
        parameters: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        secret: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        side_effects: bool = False,
        holding_message: str | None = None,
        instant: bool = False,
        follow_redirects: bool = False,
        max_result_chars: int = DEFAULT_MAX_RESULT_CHARS,
    ) -> None:
        super().__init__(
            name=name,
            description=description,
            parameters=parameters,
            timeout_s=timeout_s,
            side_effects=side_effects,
            holding_message=holding_message,
            instant=instant,
        )
        if httpx2.URL(url).scheme not in ("http", "https"):
            raise ValueError(f"tool {name!r}: url must start with http:// or https://")
        self.url = url
        self.headers = dict(headers or {})
        self.secret = secret
        self.follow_redirects = follow_redirects
        """Off by default: a redirect usually means a misconfigured URL, and
        following it would send the arguments somewhere nobody chose."""
        self.max_result_chars = max_result_chars
        self._client: httpx2.AsyncClient | None = None

    def __copy__(self) -> HttpTool:
        # A copy (see function.with_settings) gets its own client: closing one
        # tool must not break the other.
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._client = None
        return clone

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        body = orjson.dumps(arguments)
        headers = httpx2.Headers(self.headers)
        headers["Content-Type"] = "application/json"
        headers[CALL_ID_HEADER] = context.call_id
        headers[TOOL_CALL_ID_HEADER] = context.tool_call_id
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign_tool_request(self.secret, body)
        try:
            async with self._http().stream(
                "POST",
                self.url,
                content=body,
                headers=headers,
                timeout=self.timeout_s,
                follow_redirects=self.follow_redirects,
            ) as response:
                limit = self.max_result_chars if response.is_success else _EXCERPT_CHARS
                text, truncated = await _read_text(response, limit)
        except httpx2.HTTPError as exc:
            raise self._failure(exc) from exc
        if not response.is_success:
            logger.warning(
                "tool %s: %s answered HTTP %d", self.name, _host(self.url), response.status_code
            )
            excerpt = " ".join(text.split()) + ("..." if truncated else "")
            raise ToolError(
                f"the {self.name} service answered HTTP {response.status_code} "
                f"{response.reason_phrase}" + (f": {excerpt}" if excerpt else "")
            )
        if truncated:
            return (
                f"{text}\n[response truncated: these are the first "
                f"{self.max_result_chars} characters of a longer response]"
            )
        return text or None

    def _failure(self, exc: httpx2.HTTPError) -> ToolError:
        logger.warning("tool %s: request to %s failed: %r", self.name, _host(self.url), exc)
        if isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout | httpx2.PoolTimeout):
            return ToolError(f"could not connect to the {self.name} service; nothing was done")
        maybe = " It may or may not have taken effect." if self.side_effects else ""
        if isinstance(exc, httpx2.TimeoutException):
            return ToolError(
                f"the {self.name} service did not answer within {self.timeout_s:g} seconds.{maybe}"
            )
        return ToolError(f"the request to the {self.name} service failed mid-way.{maybe}")

    def _http(self) -> httpx2.AsyncClient:
        if self._client is None:
            self._client = httpx2.AsyncClient(headers={"User-Agent": "callbrain"})
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client; a later run opens a new one."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


async def _read_text(response: httpx2.Response, limit: int) -> tuple[str, bool]:
    """At most ``limit`` characters of the body, and whether there was more.

    Reading stops there, so a misconfigured URL serving megabytes costs nothing.
    """
    parts: list[str] = []
    size = 0
    async for chunk in response.aiter_text():
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return "".join(parts)[:limit], True
    return "".join(parts), False


def _host(url: str) -> str:
    """For logs: the host only, as query strings can hold API keys."""
    return httpx2.URL(url).host
