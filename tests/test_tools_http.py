"""Webhook tools against a real loopback HTTP server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from tool_samples import make_context

from callbrain.signing import sign_tool_request, verify_tool_request
from callbrain.testing import serve_asgi
from callbrain.tools.arguments import ArgumentsError
from callbrain.tools.base import ToolError, result_text
from callbrain.tools.http import HttpTool

SECRET = "s3cret-for-tests"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Hooks:
    base_url: str
    received: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def tool(self, path: str = "/book", **options: object) -> HttpTool:
        settings: dict[str, object] = {"name": "book", "description": "Book.", **options}
        return HttpTool(url=self.base_url + path, **settings)  # type: ignore[arg-type]


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    state = Hooks(base_url="")

    async def record(request: Request) -> Received:
        received = Received(request.url.path, dict(request.headers), await request.body())
        state.received.append(received)
        return received

    async def book(request: Request) -> Response:
        received = await record(request)
        arguments = orjson.loads(received.body)
        return JSONResponse({"booked": True, "party": arguments.get("party")})

    async def down(request: Request) -> Response:
        await record(request)
        return PlainTextResponse("database\n  unavailable " + "x" * 5000, status_code=503)

    async def slow(request: Request) -> Response:
        await record(request)
        await asyncio.wait_for(state.release.wait(), 30)
        return PlainTextResponse("late")

    async def big(request: Request) -> Response:
        await record(request)
        return PlainTextResponse("y" * 20_000)

    async def empty(request: Request) -> Response:
        await record(request)
        return Response(status_code=204)

    async def moved(request: Request) -> Response:
        await record(request)
        return RedirectResponse("/book", status_code=307)

    app = Starlette(
        routes=[
            Route("/book", book, methods=["POST"]),
            Route("/down", down, methods=["POST"]),
            Route("/slow", slow, methods=["POST"]),
            Route("/big", big, methods=["POST"]),
            Route("/empty", empty, methods=["POST"]),
            Route("/moved", moved, methods=["POST"]),
        ]
    )
    async with serve_asgi(app) as base_url:
        state.base_url = base_url
        yield state
        state.release.set()  # let a slow handler finish before the server stops


@pytest.fixture
async def closing() -> AsyncIterator[list[HttpTool]]:
    """Tools to close after the test."""
    tools: list[HttpTool] = []
    yield tools
    for made in tools:
        await made.aclose()


async def test_posts_the_arguments_with_the_call_headers(
    hooks: Hooks, closing: list[HttpTool]
) -> None:
    book = hooks.tool(headers={"Authorization": "Bearer abc", "X-Tenant": "clinic-7"})
    closing.append(book)
    arguments = book.validate({"day": "2026-11-22", "party": 4})

    result = await book.run(arguments, make_context(call_id="call-9", tool_call_id="toolu_1"))

    assert orjson.loads(result) == {"booked": True, "party": 4}
    [received] = hooks.received
    assert orjson.loads(received.body) == {"day": "2026-11-22", "party": 4}
    assert received.headers["content-type"] == "application/json"
    assert received.headers["x-callbrain-call-id"] == "call-9"
    assert received.headers["x-callbrain-tool-call-id"] == "toolu_1"
    assert received.headers["authorization"] == "Bearer abc"
    assert received.headers["x-tenant"] == "clinic-7"
    assert "x-callbrain-signature" not in received.headers


async def test_the_signature_verifies_by_the_documented_scheme(
    hooks: Hooks, closing: list[HttpTool]
) -> None:
    book = hooks.tool(secret=SECRET)
    closing.append(book)

    await book.run({"party": 2}, make_context())

    [received] = hooks.received
    header = received.headers["x-callbrain-signature"]
    assert SECRET not in str(received.headers)
    # Recomputed by hand, as a receiver in another language would.
    fields = dict(part.split("=", 1) for part in header.split(","))
    signed = fields["t"].encode() + b"." + received.body
    expected = hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    assert verify_tool_request(SECRET, received.body, header)


def test_verify_signature_rejects_forgeries() -> None:
    body = b'{"party":2}'
    header = sign_tool_request(SECRET, body, 1_700_000_000_000)
    now = 1_700_000_060_000  # a minute later

    assert verify_tool_request(SECRET, body, header, now_ms=now)
    assert not verify_tool_request("other-secret", body, header, now_ms=now)
    assert not verify_tool_request(SECRET, b'{"party":20}', header, now_ms=now)
    assert not verify_tool_request(SECRET, body, header, now_ms=now + 10 * 60_000)  # replayed
    assert not verify_tool_request(SECRET, body, "v1=abc", now_ms=now)
    assert not verify_tool_request(SECRET, body, "t=soon,v1=abc", now_ms=now)


async def test_non_2xx_is_a_tool_error_with_an_excerpt(
    hooks: Hooks, closing: list[HttpTool]
) -> None:
    down = hooks.tool("/down")
    closing.append(down)

    with pytest.raises(ToolError) as caught:
        await down.run({}, make_context())

    message = str(caught.value)
    assert message.startswith("the book service answered HTTP 503 Service Unavailable: ")
    assert "database unavailable xxx" in message  # whitespace collapsed
    assert message.endswith("...")
    assert len(message) < 500


async def test_redirects_are_not_followed_unless_configured(
    hooks: Hooks, closing: list[HttpTool]
) -> None:
    moved = hooks.tool("/moved")
    following = hooks.tool("/moved", follow_redirects=True)
    closing.extend([moved, following])

    with pytest.raises(ToolError, match="HTTP 307"):
        await moved.run({"party": 1}, make_context())
    result = await following.run({"party": 3}, make_context())

    assert orjson.loads(result) == {"booked": True, "party": 3}
    assert [r.path for r in hooks.received] == ["/moved", "/moved", "/book"]


async def test_a_timeout_is_a_tool_error(hooks: Hooks, closing: list[HttpTool]) -> None:
    slow = hooks.tool("/slow", timeout_s=0.2, side_effects=True)
    closing.append(slow)

    with pytest.raises(ToolError) as caught:
        await slow.run({}, make_context())

    assert str(caught.value) == (
        "the book service did not answer within 0.2 seconds. It may or may not have taken effect."
    )


async def test_connection_refused_is_a_tool_error(closing: list[HttpTool]) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = HttpTool(name="book", description="Book.", url=f"http://127.0.0.1:{port}/book")
    closing.append(refused)

    with pytest.raises(ToolError, match="could not connect to the book service; nothing was done"):
        await refused.run({}, make_context())


async def test_long_bodies_are_truncated_with_a_note(hooks: Hooks, closing: list[HttpTool]) -> None:
    big = hooks.tool("/big", max_result_chars=1000)
    closing.append(big)

    result = await big.run({}, make_context())

    text, note = result.split("\n", 1)
    assert text == "y" * 1000
    assert note == "[response truncated: these are the first 1000 characters of a longer response]"


async def test_an_empty_body_reads_as_done(hooks: Hooks, closing: list[HttpTool]) -> None:
    empty = hooks.tool("/empty")
    closing.append(empty)

    assert result_text(await empty.run({}, make_context())) == "done"


async def test_arguments_are_checked_against_the_schema(hooks: Hooks) -> None:
    schema = {
        "type": "object",
        "properties": {"party": {"type": "integer"}},
        "required": ["party"],
    }
    book = hooks.tool(parameters=schema)

    assert book.spec.parameters == schema
    with pytest.raises(ArgumentsError, match="party: 'two' is not of type 'integer'"):
        book.validate({"party": "two"})


async def test_the_client_is_reused_and_reopened_after_aclose(hooks: Hooks) -> None:
    book = hooks.tool()

    await book.run({}, make_context())
    first = book._client
    await book.run({}, make_context())
    assert book._client is first is not None

    await book.aclose()
    assert book._client is None
    await book.run({}, make_context())
    await book.aclose()
    assert len(hooks.received) == 3


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        HttpTool(name="book", description="Book.", url="ftp://example.com/book")
