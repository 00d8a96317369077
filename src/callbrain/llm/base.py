"""One provider-neutral streaming interface for every model callbrain can drive.

Every backend turns its own wire format into a single async stream of neutral
chunks (:class:`TextDelta`, :class:`ToolCall`, :class:`Usage`; see
:mod:`callbrain.llm.chat`). The call
session only ever sees that stream, so barge-in handling, apologies and metrics
are written once, not once per provider.

Deadlines, error translation and metrics live here in :class:`LLMStream`, not in
the backends, for the same reason: a backend only has to implement
:meth:`LLM._generate` as an async generator that

* yields neutral chunks as soon as the provider produces them,
* raises :class:`LLMError` for provider failures (it may let other exceptions
  escape; the stream wraps them), and
* holds its provider connection in ``async with`` / ``try: finally`` so that
  closing the generator closes the connection *now*. That is what makes a
  superseded turn stop costing tokens the moment Retell sends a newer request.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Protocol

from callbrain.llm.chat import ChatChunk, ChatRequest, TextDelta, ToolCall, Usage

logger = logging.getLogger("callbrain.llm")


class LLMError(Exception):
    """A provider failed to produce (the rest of) a completion.

    The message is for logs only: callers must never hear it.
    ``retryable`` marks failures where trying again (or another provider) may
    help: connection errors, timeouts, 429 and 5xx.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status: int | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.status = status
        self.retryable = retryable


def retryable_status(status: int) -> bool:
    """HTTP statuses where another try may succeed: timeout, conflict, rate limit,
    server errors (including Anthropic's 529 "overloaded")."""
    return status in (408, 409, 429) or status >= 500


KEYLESS_PLACEHOLDER = "callbrain-no-key"
"""Sent to keyless servers (Ollama, llama.cpp, proxies): the SDKs refuse to start without a key."""


def resolve_api_key(
    *,
    provider: str,
    configured: str | None,
    key_envs: tuple[str, ...],
    base_url: str | None,
    base_url_env: str,
) -> str | None:
    """The key to hand a provider SDK, or None to let the SDK read its own variable.

    Fails at start-up, with the names to set, rather than on the first call.
    """
    if configured:
        return configured
    if any(os.environ.get(name) for name in key_envs):
        return None
    if base_url or os.environ.get(base_url_env):
        return KEYLESS_PLACEHOLDER
    raise ValueError(
        f"The {provider} LLM needs an API key: set llm.api_key in the agent file or the "
        f"{key_envs[0]} environment variable (or set llm.base_url for a keyless server)."
    )


class RemoteConfig(Protocol):
    """What the hosted providers' configs share (see :mod:`callbrain.llm.config`)."""

    api_key: str | None
    base_url: str | None
    max_retries: int


def client_options(
    config: RemoteConfig,
    *,
    provider: str,
    key_envs: tuple[str, ...],
    base_url_env: str,
    aiohttp_client: Callable[[], Any],
) -> dict[str, Any]:
    """The keyword arguments for a provider SDK's async client: the key (or None,
    for the SDK's own variable), the base URL, the retry count (which a
    failover turns off while another provider follows: :meth:`LLM.without_retries`)
    and the HTTP transport.

    The transport is the SDK's own aiohttp-based client (``aiohttp_client``, the
    SDK's ``DefaultAioHttpClient``): the same requests, retries and errors, with
    about a sixth less server CPU per turn than its default httpx transport
    (measured with ``callbrain bench``: 7.1 against 8.5 ms per turn at 200
    calls), because most of a turn's CPU is spent reading the stream's chunks.
    Without aiohttp installed the SDK's default is used.

    One client per LLM object, so every call of an agent reuses its connection
    pool.
    """
    transport: dict[str, Any] = {}
    if importlib.util.find_spec("aiohttp") is not None:
        transport["http_client"] = aiohttp_client()
    return {
        **transport,
        "api_key": resolve_api_key(
            provider=provider,
            configured=config.api_key,
            key_envs=key_envs,
            base_url=config.base_url,
            base_url_env=base_url_env,
        ),
        "base_url": config.base_url or None,
        "max_retries": config.max_retries,
    }


class LLMTimeoutError(LLMError):
    """The provider missed its first-token or inter-chunk deadline."""

    def __init__(self, message: str, *, provider: str) -> None:
        super().__init__(message, provider=provider, retryable=True)


@dataclass(slots=True)
class StreamMetrics:
    """What one completion cost, measured from the moment it was requested."""

    provider: str
    model: str
    started: float = field(default_factory=time.perf_counter)
    ttft_s: float | None = None
    duration_s: float | None = None
    text_chunks: int = 0
    text_chars: int = 0
    tool_calls: int = 0
    usage: Usage | None = None
    outcome: str = "open"
    failovers: list[str] = field(default_factory=list)
    """``provider/model: reason`` for each provider that failed before the one that answered."""


class LLM(ABC):
    """A chat model that streams neutral chunks.

    ``first_token_timeout`` bounds the wait for the first chunk and
    ``idle_timeout`` the gap between later chunks; a plain read timeout covers
    neither, because a provider that trickles keep-alives never trips it.
    """

    provider: ClassVar[str]

    def __init__(
        self,
        *,
        model: str,
        first_token_timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.model = model
        self.first_token_timeout = first_token_timeout
        self.idle_timeout = idle_timeout

    def chat(self, request: ChatRequest) -> LLMStream:
        """Start a completion. Use the result with ``async with`` and ``async for``."""
        return LLMStream(self, request)

    @abstractmethod
    def _generate(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        """Backend hook: an async generator of neutral chunks (see module docstring)."""

    def _chunks(
        self, request: ChatRequest, metrics: StreamMetrics
    ) -> AsyncGenerator[ChatChunk, None]:
        """The generator a stream reads; a backend that reports more than chunks
        (the failover: who answered, who failed first) overrides this one."""
        return self._generate(request)

    def without_retries(self) -> LLM:
        """This model, failing at once where its SDK would retry (and wait out a
        ``Retry-After``): what a failover asks while another provider comes after
        this one. A backend that never retries is its own."""
        return self

    async def warmup(self, request: ChatRequest | None = None) -> None:  # noqa: B027 (optional hook)
        """Load whatever is slow to load before the first call.

        ``request`` is a typical request (the agent's system prompt): a backend
        that caches prompt prefixes, like the local model, processes it now so the
        first caller does not wait for it.
        """

    async def aclose(self) -> None:  # noqa: B027 (optional hook)
        """Release clients, threads and models."""


class CompletionStream(Protocol):
    """What a turn reads a completion through: an :class:`LLMStream`, or one held
    since before the request (:class:`~callbrain.call.speculation.HeldStream`)."""

    metrics: StreamMetrics

    def __aiter__(self) -> CompletionStream: ...

    async def __anext__(self) -> ChatChunk: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> CompletionStream: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class LLMStream:
    """One completion in flight: an async iterator and an async context manager.

    Leaving the ``async with`` block, or cancelling the task that iterates it,
    closes the provider connection at once.
    """

    def __init__(self, llm: LLM, request: ChatRequest) -> None:
        self._llm = llm
        self.metrics = StreamMetrics(provider=llm.provider, model=llm.model)
        self._gen = llm._chunks(request, self.metrics)

    def __aiter__(self) -> LLMStream:
        return self

    async def __anext__(self) -> ChatChunk:
        # A tool call counts as the model's first answer as much as text does.
        first = self.metrics.ttft_s is None and self.metrics.tool_calls == 0
        deadline = self._llm.first_token_timeout if first else self._llm.idle_timeout
        try:
            async with asyncio.timeout(deadline):
                chunk = await anext(self._gen)
        except StopAsyncIteration:
            self._finish("ok")
            raise
        except TimeoutError:
            self._finish("timeout")
            what = "first token" if first else "next chunk"
            raise LLMTimeoutError(
                f"{self._llm.provider}: no {what} within {deadline}s", provider=self._llm.provider
            ) from None
        except LLMError as exc:
            self._finish(f"error:{exc.status or type(exc).__name__}")
            raise
        except asyncio.CancelledError:
            self._finish("cancelled")
            raise
        except Exception as exc:
            self._finish(f"error:{type(exc).__name__}")
            raise LLMError(
                f"{self._llm.provider}: {type(exc).__name__}: {exc}", provider=self._llm.provider
            ) from exc
        self._record(chunk)
        return chunk

    def _record(self, chunk: ChatChunk) -> None:
        m = self.metrics
        if isinstance(chunk, TextDelta):
            if m.ttft_s is None:
                m.ttft_s = time.perf_counter() - m.started
            m.text_chunks += 1
            m.text_chars += len(chunk.text)
        elif isinstance(chunk, ToolCall):
            m.tool_calls += 1
        else:
            m.usage = chunk

    def _finish(self, outcome: str) -> None:
        m = self.metrics
        if m.outcome != "open":
            return
        m.outcome = outcome
        m.duration_s = time.perf_counter() - m.started
        # Debug: one line per model request is too costly at a thousand calls.
        logger.debug(
            "llm %s model=%s outcome=%s ttft_ms=%s duration_ms=%.0f chunks=%d chars=%d%s%s",
            m.provider,
            m.model,
            outcome,
            "-" if m.ttft_s is None else f"{m.ttft_s * 1000:.0f}",
            m.duration_s * 1000,
            m.text_chunks,
            m.text_chars,
            f" tool_calls={m.tool_calls}" if m.tool_calls else "",
            f" tokens_in={m.usage.input_tokens} tokens_out={m.usage.output_tokens}"
            if m.usage
            else "",
        )

    async def aclose(self) -> None:
        """Close the provider connection now; safe to call more than once."""
        self._finish("closed")
        await self._gen.aclose()

    async def __aenter__(self) -> LLMStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
