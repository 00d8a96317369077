"""Speculative generation: ask the model before Retell does, from the live transcript.

Retell streams the caller's words in ``update_only`` frames as it hears them,
and asks for a response (``response_required``) only once its turn-taking
model decides the caller has finished: a few hundred milliseconds later. When
the caller's last utterance already looks finished (it ends a sentence), the
model can be asked at once and its answer held; if the request that follows
carries the same words (compared after normalising case, spaces and
punctuation) and the same context, the held answer goes out immediately and
the stream simply continues. Otherwise the held answer is dropped.

The rules that keep it safe:

* **Nothing is said, and no tool runs, before the request.** Only the model's
  output is fetched and held; a tool call in it runs after the request adopts
  it, like any other (so a side effect can never happen speculatively).
* **At most one speculation at a time**, and at most ``max_per_turn`` between
  two requests: a caller who keeps talking costs a bounded number of wasted
  model requests.
* **Never for a reminder**, and only while no response is being spoken.
* **The same context or nothing**: the held request must equal the real one
  (system prompt, tools, every message); only the caller's last words may
  differ in case, spacing and punctuation.

What it saves is the model's time to first token, on the turns where Retell's
request follows the caller's finished sentence unchanged. What it costs is one
model request per miss; hits, misses and the wasted output are recorded on the
turns (:class:`~callbrain.call.record.TurnRecord`) and counted by the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Hashable
from dataclasses import dataclass
from types import TracebackType

from pydantic import BaseModel, ConfigDict, Field

from callbrain.llm.base import LLM, LLMStream, StreamMetrics
from callbrain.llm.chat import ChatChunk, ChatItem, ChatRequest, Message, TextDelta

_WORDS = re.compile(r"[\w']+")
_FINISHED = (".", "?", "!", "…")


class SpeculationSettings(BaseModel):
    """The agent file's ``speculation:`` block."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    """Start the model on the caller's finished sentence, before Retell asks.
    Unset: on for hosted models, off for ``provider: local``, whose wasted
    requests would cost this machine's own CPU. Measured with ``callbrain
    bench``: the caller hears the first words about as much sooner as Retell's
    turn-taking waits (300 ms in the bench), for about a fifth more model
    requests (docs/performance.md)."""
    max_per_turn: int = Field(default=2, ge=1, le=10)
    """Speculative model requests at most between two requests from Retell."""


def normalized(text: str) -> str:
    """The words of ``text``: lower case, no punctuation, single spaces."""
    return " ".join(_WORDS.findall(text.casefold()))


def looks_finished(text: str) -> bool:
    """Whether an utterance ends a sentence (Retell's transcripts are punctuated)."""
    return text.rstrip().endswith(_FINISHED) and bool(normalized(text))


def signature(request: ChatRequest) -> Hashable:
    """What must be equal for a held answer to be the answer to ``request``."""
    return (request.system, request.tools, tuple(_item_signature(m) for m in request.messages))


def _item_signature(item: ChatItem) -> Hashable:
    if isinstance(item, Message):
        return (item.role, normalized(item.content), item.tool_calls)
    return item


class HeldStream:
    """A completion started early; its chunks are held until it is adopted or dropped.

    It reads like the :class:`~callbrain.llm.base.LLMStream` it wraps (the
    stream's own deadlines and metrics still apply), so a turn uses it as any
    other stream. Closing it closes the provider stream at once.
    """

    def __init__(self, llm: LLM, request: ChatRequest) -> None:
        self._stream: LLMStream = llm.chat(request)
        self.metrics: StreamMetrics = self._stream.metrics
        self.requested = time.perf_counter()
        self.held = 0
        """Text chunks received so far (about one token each)."""
        self._items: asyncio.Queue[ChatChunk | BaseException | None] = asyncio.Queue()
        self._pump = asyncio.create_task(self._read(), name="speculation")

    async def _read(self) -> None:
        try:
            async with self._stream:
                async for chunk in self._stream:
                    if isinstance(chunk, TextDelta):
                        self.held += 1
                    self._items.put_nowait(chunk)
        except Exception as exc:  # the adopting turn raises it (a model failure)
            self._items.put_nowait(exc)
        else:
            self._items.put_nowait(None)

    def __aiter__(self) -> HeldStream:
        return self

    async def __anext__(self) -> ChatChunk:
        item = await self._items.get()
        if item is None:
            self._items.put_nowait(None)  # stays ended
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        """Stop reading and close the provider stream; safe to call more than once."""
        if not self._pump.done():
            self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump

    async def __aenter__(self) -> HeldStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


@dataclass(frozen=True, slots=True)
class Taken:
    """What a request found held: the stream it can use, and the speculations'
    cost since the previous request."""

    stream: HeldStream | None
    missed: bool
    """A held answer did not match and was dropped."""
    wasted: int
    """Output chunks of dropped speculations (about a token each)."""
    requests: int
    """Speculative model requests made (the used one included)."""


class Speculator:
    """One call's speculation (see the module docstring)."""

    def __init__(self, llm: LLM, settings: SpeculationSettings) -> None:
        self._llm = llm
        self._settings = settings
        self._held: HeldStream | None = None
        self._key: Hashable = None
        self._started = 0
        self._wasted = 0
        self._requests = 0
        self._closing: set[asyncio.Task[None]] = set()

    def consider(self, request: ChatRequest) -> None:
        """The live transcript changed: speculate on it if the caller's last words
        look finished and are new, within the cap."""
        last = request.messages[-1] if request.messages else None
        if not (isinstance(last, Message) and last.role == "user"):
            return
        if not looks_finished(last.content):
            return
        key = signature(request)
        if self._held is not None and key == self._key:
            return  # already held for these words
        if self._started >= self._settings.max_per_turn:
            return
        self._drop()
        self._held, self._key = HeldStream(self._llm, request), key
        self._started += 1
        self._requests += 1

    def take(self, request: ChatRequest) -> Taken:
        """For Retell's request: the held stream if it answers ``request`` (else it
        is dropped), and what the speculations since the last request cost."""
        held, key = self._held, self._key
        self._held, self._key, self._started = None, None, 0
        missed = held is not None and key != signature(request)
        if held is not None and missed:
            self._close(held)
            held = None
        taken = Taken(held, missed, self._wasted, self._requests)
        self._wasted = self._requests = 0
        return taken

    def drop(self) -> Taken:
        """Drop what is held (a reminder, a shutdown, the end of the call); what
        the speculations since the last request cost."""
        self._drop()
        self._started = 0
        taken = Taken(None, False, self._wasted, self._requests)
        self._wasted = self._requests = 0
        return taken

    def _drop(self) -> None:
        if self._held is not None:
            self._close(self._held)
        self._held, self._key = None, None

    def _close(self, held: HeldStream) -> None:
        self._wasted += held.held
        task = asyncio.get_running_loop().create_task(held.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Drop what is held and wait for the provider streams to close."""
        self.drop()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
