"""Several providers as one model: the next takes over when one fails to start.

A turn goes to the first provider in rotation. If it fails *before its first
chunk* (a connection error, 429, 5xx, a missed first-token deadline, or a
stream it cannot read: the errors :class:`~callbrain.llm.base.LLMError` marks
``retryable``, see :mod:`callbrain.llm.events`), the same
request goes to the next one, and the caller hears nothing of it. Once a
chunk has been yielded the turn is committed to that provider: retrying then
would make the caller hear the start of the answer twice, so a later failure
propagates and the turn ends with the agent's fallback line, as with one
provider. Errors that another provider cannot fix (a 400 for a request we
built, a 401) are not failed over either: they are configuration to fix.

A provider that fails ``failure_threshold`` turns in a row is taken out of
rotation, so calls stop paying its timeout, and probed in the background with
a tiny request every ``probe_interval_s`` until it answers again. If every
provider is out, the rotation is all of them: trying is better than silence.

Retries *within* one provider are the SDKs' (``max_retries``, with backoff and
``Retry-After``), and only for the last provider of the turn's rotation. Any
earlier one fails at once (:meth:`~callbrain.llm.base.LLM.without_retries`):
with another provider to go to, a 429 that asks for ten seconds' patience
should cost the caller nothing, not ten seconds of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from callbrain.llm.base import LLM, LLMError, StreamMetrics
from callbrain.llm.chat import ChatChunk, ChatRequest, Message

logger = logging.getLogger("callbrain.llm")

_PROBE = ChatRequest(system="Reply with the single word OK.", messages=(Message("user", "ping"),))


@dataclass
class _Health:
    failures: int = 0
    """Turns failed in a row."""
    probe: asyncio.Task[None] | None = None
    """Running while the provider is out of rotation."""

    @property
    def out(self) -> bool:
        return self.probe is not None and not self.probe.done()


class FailoverLLM(LLM):
    """``llms`` in order of preference, as one :class:`~callbrain.llm.base.LLM`."""

    provider: ClassVar[str] = "failover"

    def __init__(
        self,
        llms: Sequence[LLM],
        *,
        failure_threshold: int = 3,
        probe_interval_s: float = 15.0,
    ) -> None:
        if not llms:
            raise ValueError("FailoverLLM needs at least one model")
        # Each member enforces its own deadlines; the failover adds none of its own.
        super().__init__(model=" > ".join(f"{m.provider}/{m.model}" for m in llms))
        self.llms = list(llms)
        self.failure_threshold = failure_threshold
        self.probe_interval_s = probe_interval_s
        self._health = {id(llm): _Health() for llm in self.llms}
        self._quick = {id(llm): llm.without_retries() for llm in self.llms}
        """Each member as it is asked while another provider follows it."""

    def rotation(self) -> list[LLM]:
        """The members to try, in order: all those in rotation (all, if none is)."""
        healthy = [llm for llm in self.llms if not self._health[id(llm)].out]
        return healthy or list(self.llms)

    def _generate(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        return self._failover(request, StreamMetrics(self.provider, self.model))

    def _chunks(
        self, request: ChatRequest, metrics: StreamMetrics
    ) -> AsyncGenerator[ChatChunk, None]:
        return self._failover(request, metrics)

    async def _failover(
        self, request: ChatRequest, metrics: StreamMetrics
    ) -> AsyncGenerator[ChatChunk, None]:
        """The first answer in rotation; ``metrics`` learns who answered and who
        failed before."""
        failures: list[str] = []
        rotation = self.rotation()
        for llm in rotation:
            # The one place that decides who may retry: only the last resort.
            member = llm if llm is rotation[-1] else self._quick[id(llm)]
            stream = member.chat(request)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                await stream.aclose()
                self._succeeded(llm)
                return
            except LLMError as exc:
                await stream.aclose()
                if not exc.retryable:
                    raise
                self._failed(llm, exc)
                failures.append(str(exc))
                metrics.failovers.append(f"{llm.provider}/{llm.model}: {exc}")
                continue
            except BaseException:
                await stream.aclose()
                raise
            self._succeeded(llm)
            metrics.provider, metrics.model = llm.provider, llm.model
            # Committed: from here a failure is the turn's, never another provider's.
            async with stream:
                yield first
                async for chunk in stream:
                    yield chunk
            return
        raise LLMError(
            "every provider failed before its first chunk: " + "; ".join(failures),
            provider=self.provider,
            retryable=True,
        )

    def _succeeded(self, llm: LLM) -> None:
        self._health[id(llm)].failures = 0

    def _failed(self, llm: LLM, exc: LLMError) -> None:
        health = self._health[id(llm)]
        health.failures += 1
        others = len(self.llms) > 1
        logger.warning(
            "%s/%s failed before its first chunk (%s)%s",
            llm.provider,
            llm.model,
            exc,
            "; trying the next provider" if others else "",
        )
        if others and health.failures >= self.failure_threshold and not health.out:
            logger.warning(
                "%s/%s failed %d turns in a row: out of rotation, probed every %.0f s",
                llm.provider,
                llm.model,
                health.failures,
                self.probe_interval_s,
            )
            health.probe = asyncio.create_task(self._probe(llm), name=f"probe-{llm.provider}")

    async def _probe(self, llm: LLM) -> None:
        """Until ``llm`` answers a tiny request again; then back into rotation."""
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                # One try tells whether it is back; a retry would only tell later.
                async with self._quick[id(llm)].chat(_PROBE) as stream:
                    await anext(stream, None)
            except LLMError as exc:
                logger.info("%s/%s still failing: %s", llm.provider, llm.model, exc)
                continue
            self._health[id(llm)].failures = 0
            logger.warning("%s/%s answers again: back in rotation", llm.provider, llm.model)
            return

    async def warmup(self, request: ChatRequest | None = None) -> None:
        for llm in self.llms:
            await llm.warmup(request)

    async def aclose(self) -> None:
        for health in self._health.values():
            if health.probe is not None:
                health.probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await health.probe
        for llm in self.llms:
            await llm.aclose()
