"""The thread bridge: llama.cpp's blocking, callback-driven completion as an
async stream of chat-completion chunk dicts.

Each completion runs ``Server.handle_chat_completions`` in a thread of the
backend's own pool (so a slow model never starves the loop's default executor);
llama.cpp calls back on that thread once per chunk and each chunk is handed to
the event loop through a queue. The callback's return value is llama.cpp's stop
flag, which is how a closed stream stops costing CPU: once nobody reads, the
next callback says stop.

**Stopping** takes effect at the next token. llama.cpp only asks whether to go
on when it has a chunk to hand over, so a long prompt that is still being
prefilled runs to its first token before it stops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncGenerator, Callable
from typing import Any

from callbrain.llm.base import LLMError, retryable_status

PROVIDER = "local"

# One queue item: a chunk dict from llama.cpp, an exception the call raised, or
# None once the call has returned.
_Item = dict[str, Any] | Exception | None


class ContextOverflowError(LLMError):
    """The prompt does not fit the context of one slot (``n_ctx / n_parallel``)."""


def error_from_llama(error: dict[str, Any]) -> LLMError:
    """llama.cpp's OpenAI-style ``{"code", "message", "type"}`` error as an LLMError."""
    code = error.get("code")
    status = code if isinstance(code, int) else None
    kind = ContextOverflowError if error.get("type") == "exceed_context_size_error" else LLMError
    return kind(
        f"local: llama.cpp {error.get('type', 'error')} ({code}): {error.get('message')}",
        provider=PROVIDER,
        status=status,
        retryable=status is not None and retryable_status(status),
    )


async def stream_completion(
    executor: concurrent.futures.Executor,
    server: Any,
    body: dict[str, Any],
    *,
    on_busy: Callable[[int], None] = lambda change: None,
) -> AsyncGenerator[dict[str, Any], None]:
    """llama.cpp's chunks for ``body`` as they come; raises :class:`LLMError` for
    what llama.cpp reports. ``on_busy(+1)`` / ``on_busy(-1)`` bracket the time a
    thread spends on it (which may outlast the reader). Closing the generator
    stops the generation at its next token."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[_Item] = asyncio.Queue()
    gone = threading.Event()  # set when nobody reads any more: stop generating

    def deliver(item: _Item) -> None:
        if gone.is_set():
            return
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody will ever read this
            gone.set()

    def on_chunk(chunk: dict[str, Any]) -> bool:
        # llama.cpp's thread. xllamacpp turns an exception raised here into a
        # silent stop, so keep this trivial. Returning True stops generation.
        deliver(chunk)
        return gone.is_set()

    def run() -> None:
        if gone.is_set():  # cancelled while queued for a thread
            return
        on_busy(1)
        try:
            server.handle_chat_completions(body, on_chunk)
        except Exception as exc:  # ValueError for a malformed request, RuntimeError...
            deliver(exc)
        else:
            deliver(None)
        finally:
            on_busy(-1)

    try:
        executor.submit(run)
    except RuntimeError as exc:  # executor shut down by aclose() meanwhile
        raise LLMError("local: the model has been closed", provider=PROVIDER) from exc
    try:
        while (item := await items.get()) is not None:
            if isinstance(item, Exception):
                raise LLMError(
                    f"local: llama.cpp rejected the request: {type(item).__name__}: {item}",
                    provider=PROVIDER,
                    status=400 if isinstance(item, ValueError) else None,
                ) from item
            if "error" in item:
                raise error_from_llama(item["error"])
            yield item
    finally:
        gone.set()
