"""What ``callbrain fake-llm`` answers: one good reply, and shares of faulty ones.

Kept apart from the command so that a test or a benchmark can build the same
fake in-process: ``FakeOpenAIServer(default=ReplyMix(...).reply_function(),
record=False)``.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace

from callbrain.testing.fake_llm.base import JSONObject, Reply, ReplyFunction

DEFAULT_TEXT = (
    "Sure, I can help you with that today. "
    "We are open Monday to Friday from nine in the morning until five in the afternoon."
)


class ReplyMixError(ValueError):
    """A setting that makes no sense; ``fields`` names the settings at fault."""

    def __init__(self, fields: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.fields = fields
        self.message = message


@dataclass(frozen=True)
class ReplyMix:
    """Every request gets :attr:`text` at :attr:`ttft` and :attr:`token_rate`,
    except seeded random shares of requests that fail with an HTTP error,
    stall, or are dropped mid-stream.

    A "token" is one content chunk, a word with its spaces (see :class:`Reply`).
    The shares are of all requests and exclusive: one draw per request picks
    its reply, so ``fail_rate=0.05, stall_rate=0.02`` fails exactly 5 % and
    stalls 2 %, and the shares add up to at most 1. Invalid settings raise
    :class:`ReplyMixError`.
    """

    text: str = DEFAULT_TEXT
    ttft: float = 0.3
    """Seconds from the request to the first token."""
    ttft_max: float | None = None
    """With it, each request's time to first token is drawn evenly between
    :attr:`ttft` and this (seeded), as a real model's varies."""
    token_rate: float = 50.0
    """Tokens per second after the first; 0 or ``inf``: no delay."""
    fail_rate: float = 0.0
    fail_status: int = 500
    retry_after: float = 1.0
    """Seconds advertised in ``retry-after`` when ``fail_status`` is 429."""
    stall_rate: float = 0.0
    stall_after: int = 0
    """Tokens sent before a stall; 0 stalls before the first."""
    drop_rate: float = 0.0
    drop_after: int | None = None
    """Tokens sent before a drop; ``None``: half the reply."""
    seed: int | None = None

    def __post_init__(self) -> None:
        tokens = self.tokens
        for name in ("ttft", "retry_after"):
            value = getattr(self, name)
            ok = math.isfinite(value) and value >= 0
            _require(ok, (name,), f"{value} is not a finite number of seconds, 0 or more.")
        top = self.ttft_max
        if top is not None:
            _require(
                math.isfinite(top) and top >= self.ttft,
                ("ttft", "ttft_max"),
                f"{top} is not a number of seconds from ttft ({self.ttft:g}) up.",
            )
        rate = self.token_rate
        _require(rate >= 0, ("token_rate",), f"{rate} is not a rate >= 0.")  # nan fails too
        for name in ("fail_rate", "stall_rate", "drop_rate"):
            share = getattr(self, name)
            _require(0 <= share <= 1, (name,), f"{share} is not a share between 0 and 1.")
        total = self.fail_rate + self.stall_rate + self.drop_rate
        _require(
            total <= 1 + 1e-9,
            ("fail_rate", "stall_rate", "drop_rate"),
            f"shares of all requests, so together at most 1, not {total:g}.",
        )
        status = self.fail_status
        _require(400 <= status <= 599, ("fail_status",), f"{status} is not an HTTP error status.")
        for name, after, share in (
            ("stall_after", self.stall_after, self.stall_rate),
            ("drop_after", self.drop_after, self.drop_rate),
        ):
            if after is None:
                continue
            _require(after >= 0, (name,), f"{after} is not a count of tokens.")
            _require(
                share == 0 or after <= tokens,
                (name,),
                f"{after} is past the end of the reply, which has {tokens} tokens.",
            )

    @property
    def tokens(self) -> int:
        """How many tokens (content chunks) a good reply has."""
        return len(Reply(self.text).deltas)

    def replies(self) -> tuple[Reply, list[tuple[float, Reply]]]:
        """The good reply, and each faulty one with its share."""
        deltas = tuple(Reply(self.text).deltas)  # split once here, not on every request
        delay = 0.0 if self.token_rate in (0, math.inf) else 1 / self.token_rate
        ok = Reply(deltas, ttft=self.ttft, chunk_delay=delay, usage=(12, len(deltas)))
        drop_after = len(deltas) // 2 if self.drop_after is None else self.drop_after
        return ok, [
            (self.fail_rate, replace(ok, status=self.fail_status, retry_after=self.retry_after)),
            (self.stall_rate, replace(ok, stall_after=self.stall_after)),
            (self.drop_rate, replace(ok, drop_after=drop_after)),
        ]

    def reply_function(self) -> ReplyFunction:
        """A fresh reply function: its random draws start again from :attr:`seed`."""
        ok, faults = self.replies()
        return reply_mix(ok, faults, self.seed, self.ttft_max)

    def describe(self) -> str:
        """One line on what requests get, for people."""
        ok, faults = self.replies()
        pace = "as fast as possible" if ok.chunk_delay == 0 else f"{self.token_rate:g}/s"
        first = f"{ok.ttft:g} s" if self.ttft_max is None else f"{ok.ttft:g}-{self.ttft_max:g} s"
        parts = [f"{len(ok.deltas)} tokens, the first after {first}, then {pace}"]
        for share, reply in faults:
            if share == 0:
                continue
            if reply.status is not None:
                parts.append(f"{share:.0%} HTTP {reply.status}")
            elif reply.stall_after is not None:
                parts.append(f"{share:.0%} stall after {reply.stall_after} tokens")
            else:
                parts.append(f"{share:.0%} drop after {reply.drop_after} tokens")
        return "; ".join(parts)


def reply_mix(
    ok: Reply, faults: list[tuple[float, Reply]], seed: int | None, ttft_max: float | None = None
) -> ReplyFunction:
    """A reply function that answers ``ok`` except for shares of faulty replies.

    One draw in [0, 1) per request: the first fault whose running total of
    shares is above it answers, so a share of 1 always wins and 0 never does.
    With ``ttft_max``, a second draw sets the good reply's time to first token.
    """
    rng = random.Random(seed)
    shares = itertools.accumulate(share for share, _ in faults)
    limits = [(limit, reply) for limit, (_, reply) in zip(shares, faults, strict=True)]

    def choose(body: JSONObject) -> Reply:
        draw = rng.random()
        for limit, reply in limits:
            if draw < limit:
                return reply
        if ttft_max is not None:
            return replace(ok, ttft=rng.uniform(ok.ttft, ttft_max))
        return ok

    return choose


def _require(condition: bool, fields: tuple[str, ...], message: str) -> None:
    if not condition:
        raise ReplyMixError(fields, message)
