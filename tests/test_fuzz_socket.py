"""Property-based fuzzing of Retell's inbound frames over one live socket per test.

Hypothesis draws sequences of frames: valid ones (``ping_pong``, ``update_only``,
``call_details``, ``response_required`` / ``reminder_required`` with newer, duplicate
and stale ids), frame-shaped JSON with fields dropped, of the wrong type, or
unknown, and unknown ``interaction_type`` values, random JSON, random text,
binary frames and huge frames, and now and then a wait for the echo of a ping
or for a turn to run to its end (a tool round included). Each sequence is sent
on the same open call, followed by a ping and a fresh, valid
``response_required``. Whatever came before, the call must still be open,
every ping must have had its echo, every request waited for (the fresh one
included) must get the model's answer with exactly one ``content_complete``,
and the protocol checker must have seen no violation (a stale frame, a second
complete, a null, a wrong type...).

How the tests run: the fake provider, the agent's server and the Retell socket
live on an event loop of their own, in a background thread, for the whole test
(:class:`LiveCall`), and each Hypothesis example is a coroutine submitted to that
loop from a plain sync ``@given`` function. Two simpler patterns do not fit:

* ``asyncio.run`` per example would start uvicorn twice and open a new socket
  for every example (and for every shrinking step): slow, and it would not test
  one long call that has been through all of it;
* ``@given`` on an ``async def`` test makes pytest-asyncio run each example with
  ``run_until_complete`` on the test's loop, so the socket would only be served
  while an example runs, and sharing one socket between examples means
  module-scoped async fixtures whose loop handling has changed between
  pytest-asyncio releases.

The loop thread keeps serving the call between examples and does not depend on
how pytest-asyncio drives loops. Only after an example fails does the next one
get a new socket (a new call on the same server): Hypothesis then replays and
shrinks the failing sequence on clean calls, so the sequence it reports is one
that breaks a call by itself.

Ids are drawn relative to the newest id sent so far (``step``), so an example
keeps its meaning when Hypothesis replays or shrinks it on a socket that has
seen other examples before.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import agent_on

from callbrain.agent import Agent, RetellConfig
from callbrain.llm.config import OpenAIConfig
from callbrain.testing import (
    FakeOpenAIServer,
    FakeToolCall,
    Reply,
    RetellClient,
    serve_agent,
    user,
)
from callbrain.testing.checker import PING_DEADLINE_S
from callbrain.tools import tool

T = TypeVar("T")
Frame = dict[str, Any]

ANSWER = ["Noted, ", "thank ", "you."]
"""What the fake model says to every request (three chunks)."""
FALLBACK = "Sorry, could you say that again?"
KNOWN_FIELDS = {
    "interaction_type",
    "response_id",
    "timestamp",
    "transcript",
    "transcript_with_tool_calls",
    "turntaking",
    "call",
}
EXAMPLES = 60


# --------------------------------------------------------------------------- strategies

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
"""Any text JSON can carry (lone surrogates cannot be encoded)."""
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=10,
)
"""Any JSON value (integers beyond 64 bits too: the stdlib encoder writes them)."""

INTEGER_FIELDS = ("response_id", "timestamp")


def _checker_counts(value: object) -> bool:
    """Whether the protocol checker takes ``value`` in an integer field for a
    number... for the harness: any Python ``int``, ``true`` and ``false`` included.

    Mangled frames keep real integers out of their integer fields, so the
    harness's own bookkeeping of which ids were asked for and which pings sent
    stays simple; ``test_the_checker_counts_only_frames_the_server_takes`` pins
    that the checker and the server agree on the rest (``true``, ``2**64``).
    Anything else (``"5"``, ``5.0``, ``null``...) both refuse, and the fuzzing
    sends it.
    """
    return isinstance(value, int)


_word = st.fixed_dictionaries(
    {"word": _text},
    optional={"start": st.floats(0, 1e4), "end": st.floats(0, 1e4)},
)
_utterance = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "agent", "transfer_target", "system"]) | _text},
    optional={
        "content": _text
        | st.none()
        | st.sampled_from(["(unintelligible audio)", "please lookup my chart"]),
        "words": st.lists(_word, max_size=3),
    },
)
_transcript = st.lists(_utterance, max_size=4)
_woven_item = st.fixed_dictionaries(
    {
        "role": st.sampled_from(
            ["user", "agent", "tool_call_invocation", "tool_call_result", "dtmf", "node"]
        )
        | _text
    },
    optional={
        "content": _json,
        "tool_call_id": st.sampled_from(["t1", "t2"]) | _json,
        "name": st.sampled_from(["lookup", "nope"]) | _json,
        "arguments": st.sampled_from(['{"query": "x"}', "{bad"]) | _json,
        "successful": _json,
        "digit": _json,
    },
)
_unknown_field = _text.filter(lambda name: name not in KNOWN_FIELDS)
_extras = st.fixed_dictionaries(
    {},
    optional={
        "timestamp": _json,  # the reference's sample request carries a stray one
        "transcript_with_tool_calls": st.lists(_woven_item, max_size=5),
        "x_unknown": _json,
    },
)


@dataclass
class Ping:
    """A valid ping with a timestamp never used before; not waited for."""


@dataclass
class Settle:
    """A ping whose echo is waited for: the server has read everything before it."""


@dataclass
class Await:
    """Wait for the newest request's ``content_complete``: its turn runs to the end
    (tool rounds included) instead of being cut short by the next request."""


@dataclass
class Ask:
    """A new request, answered before anything else is sent; with ``lookup`` the
    fake model calls a tool first (see :func:`reply_for`)."""

    lookup: bool
    reminder: bool


@dataclass
class Update:
    transcript: list[Frame]
    turntaking: str | None


@dataclass
class Request:
    reminder: bool
    step: int
    """The id is the newest sent so far plus ``step``: above 0 a newer request,
    0 a duplicate, below 0 a stale one (or a negative id)."""
    transcript: list[Frame]
    extras: Frame


@dataclass
class Details:
    call: Frame


Valid = Ping | Update | Request | Details


@dataclass
class Mangled:
    """A valid frame, then fields dropped, retyped, added or the type renamed.

    A mangled request keeps a stale id (or loses it): the checker counts every
    frame that looks like a newer request as one, while the server may refuse
    the mangled frame, and the two must not disagree about which id is live.
    """

    base: Valid
    mutations: list[tuple[str, Any, Any]]
    """``(action, key or position, value)``; see :func:`mangle`."""


@dataclass
class Raw:
    """Random JSON, random text or random bytes, sent as they are."""

    data: str | bytes


@dataclass
class BinaryJSON:
    """A frame Retell would send as text, sent as binary: the server must ignore it
    (a request keeps a stale id, so that :class:`Await` never waits for it)."""

    base: Valid


@dataclass
class Huge:
    """A frame of ``size`` characters: a transcript over ``max_transcript_chars``
    (or a request carrying one), or a frame over ``max_frame_bytes``."""

    kind: Literal["update", "request", "stale_request", "junk"]
    size: int
    char: str


Operation = Valid | Mangled | Raw | BinaryJSON | Huge | Settle | Await | Ask

_valid: st.SearchStrategy[Valid] = st.one_of(
    st.builds(Ping),
    st.builds(Update, _transcript, st.none() | st.sampled_from(["agent_turn", "user_turn"])),
    st.builds(
        Request,
        st.booleans(),
        st.integers(1, 3) | st.integers(-3, 0),
        _transcript,
        _extras,
    ),
    st.builds(
        Details,
        st.fixed_dictionaries(
            {},
            optional={
                "call_id": _json,
                "from_number": st.just("+14155550100") | _json,
                "retell_llm_dynamic_variables": st.dictionaries(_text, _json, max_size=3) | _json,
                "metadata": _json,
            },
        ),
    ),
)
_tricky = st.sampled_from(
    [
        *(None, "", "seven", "7", "1e3", "100000000000000000000"),
        *(5.0, 7.5, 1e19, -1, 0, 2**63, 2**64, True),
        *([], {}, [None], {"": None}),
    ]
)
"""Values that trip parsers up (integers are kept out of integer fields: see
_checker_counts)."""
_mutations: dict[str, st.SearchStrategy[tuple[str, Any, Any]]] = {
    # A field of the frame, by position among its keys: dropped or retyped.
    "drop": st.tuples(st.just("drop"), st.integers(0, 6), st.none()),
    "retype": st.tuples(st.just("retype"), st.integers(0, 6), _tricky | _json),
    "extra": st.tuples(st.just("extra"), _unknown_field, _tricky | _json),
    "rename": st.tuples(
        st.just("rename"),
        st.just("interaction_type"),
        st.sampled_from(
            ["ping_pong", "update_only", "call_details", "response_required", "pingpong", ""]
        )
        | _text,
    ),
}
# sampled_from + flatmap rather than one_of: each kind gets its share of the draws.
_mutation = st.sampled_from(sorted(_mutations)).flatmap(_mutations.__getitem__)
_raw = st.one_of(
    _json.filter(lambda v: not (isinstance(v, dict) and "interaction_type" in v)).map(
        lambda v: json.dumps(v, ensure_ascii=False)
    ),
    _text,
    st.binary(max_size=100),
    st.sampled_from(["", "{", "null", "[]", '"ping_pong"', "{}", '{"interaction_type": null}']),
)
_operations: dict[str, st.SearchStrategy[Operation]] = {
    "valid": _valid,
    "mangled": st.builds(Mangled, _valid, st.lists(_mutation, min_size=1, max_size=3)),
    "raw": st.builds(Raw, _raw),
    "binary": st.builds(BinaryJSON, _valid),
    "huge": st.builds(
        Huge,
        st.sampled_from(["update", "request", "stale_request", "junk"]),
        # Over max_transcript_chars (200,000) but under max_frame_bytes (1,000,000),
        # or over max_frame_bytes, counted in bytes for the two-byte character.
        st.sampled_from([250_000, 1_100_000]),
        st.sampled_from(["x", "é"]),
    ),
    "settle": st.builds(Settle),
    "await": st.builds(Await),
    "ask": st.builds(Ask, st.booleans(), st.booleans()),
}
operations = st.sampled_from(
    # As many valid frames as mangled ones, and as many of those as the rest.
    ["valid"] * 4 + ["mangled"] * 4 + ["raw", "raw", "binary", "huge", "settle", "await", "ask"]
).flatmap(_operations.__getitem__)


# ---------------------------------------------------------------------- the live call


class LiveCall:
    """A fake OpenAI server, the agent's app and one Retell socket, on an event
    loop running in a background thread for the length of a test.

    The socket is only replaced after a failed example: Hypothesis then replays
    and shrinks the failing sequence, and each replay needs a clean call for
    the smallest failing sequence to be the one reported.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="live-call")
        self._stack = contextlib.AsyncExitStack()
        self._socket = contextlib.AsyncExitStack()
        self._stamps = itertools.count(1_700_000_000_000)
        self._sockets = itertools.count(1)
        self.url = ""
        self.greets_at_once = True
        self.call: RetellClient
        self.latest = 0
        """The newest request id sent (the checker's and the server's view agree)."""
        self.pings: list[int] = []
        """Timestamps of every valid ping sent: each must be echoed exactly once."""
        self.broken = False
        """An example failed on this socket: the next one gets a new socket."""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Close the call, the server and the fake, then the loop and its thread."""
        try:
            self.run(self._socket.aclose())
            self.run(self._stack.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coroutine`` on the call's loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def open(self, agent_options: dict[str, Any]) -> None:
        fake = await self._stack.enter_async_context(FakeOpenAIServer(default=reply_for))
        agent = agent_on(
            fake,
            llm={"model": "fuzz"},
            name="fuzz",
            system_prompt="You are {{persona}}, talking to {{first_name}}.",
            begin_message="Hello {{first_name}}.",
            fallback_message=FALLBACK,
            **agent_options,
        )
        self.greets_at_once = not agent.wait_for_call_details
        self.url = await self._stack.enter_async_context(serve_agent(agent))
        await self.connect()

    async def connect(self) -> None:
        """A new socket, for a new call: the old one (if any) is closed first."""
        await self._socket.aclose()
        self._socket = contextlib.AsyncExitStack()
        call_id = f"fuzz-call-{next(self._sockets)}"
        self.call = await self._socket.enter_async_context(RetellClient.connect(self.url, call_id))
        self.latest, self.pings, self.broken = 0, [], False
        await self.call.expect_config()
        if self.greets_at_once:
            await self.call.expect_begin()

    # -------------------------------------------------------------------- frames

    def stamp(self) -> int:
        return next(self._stamps)

    def request_id(self, step: int, *, stale: bool = False) -> int:
        """The id ``step`` away from the newest; a stale one never moves it."""
        if stale:
            return self.latest - abs(step)
        rid = self.latest + step
        self.latest = max(self.latest, rid)
        return rid

    def frame(self, op: Valid, *, stale: bool = False) -> Frame:
        """The frame for ``op``, requests with their id."""
        if isinstance(op, Ping):
            return {"interaction_type": "ping_pong", "timestamp": 0}  # send() stamps it
        if isinstance(op, Update):
            frame: Frame = {"interaction_type": "update_only", "transcript": op.transcript}
            if op.turntaking is not None:
                frame["turntaking"] = op.turntaking
            return frame
        if isinstance(op, Request):
            kind = "reminder_required" if op.reminder else "response_required"
            return {
                **op.extras,
                "interaction_type": kind,
                "response_id": self.request_id(op.step, stale=stale),
                "transcript": op.transcript,
            }
        return {"interaction_type": "call_details", "call": op.call}

    async def send(self, frame: Frame | str | bytes) -> None:
        if isinstance(frame, dict):
            if is_ping(frame):
                # Every ping the checker expects an echo for gets a timestamp of its
                # own, one the server accepts: a mangled frame may have become a
                # ping with a stray timestamp (a repeated one, a negative one, true),
                # and the checker pairs echoes with pings by timestamp.
                frame = {**frame, "timestamp": self.stamp()}
                self.pings.append(frame["timestamp"])
            # The stdlib encoder: it also writes integers beyond 64 bits.
            frame = json.dumps(frame, ensure_ascii=False)
        await self.call.send(frame)

    async def perform(self, op: Operation) -> None:
        if isinstance(op, Settle):
            await self.ping()
        elif isinstance(op, Await):
            if self.latest > 0:
                await self.answer(self.latest)
        elif isinstance(op, Ask):
            kind = "reminder_required" if op.reminder else "response_required"
            rid = self.request_id(1)
            line = f"please lookup record {rid}" if op.lookup else "How are you?"
            await self.send(
                {"interaction_type": kind, "response_id": rid, "transcript": [user(line)]}
            )
            await self.answer(rid)
        elif isinstance(op, Ping | Update | Request | Details):
            await self.send(self.frame(op))
        elif isinstance(op, Mangled):
            await self.send(mangle(self.frame(op.base, stale=True), op.mutations))
        elif isinstance(op, Raw):
            await self.send(op.data)
        elif isinstance(op, BinaryJSON):
            await self.send(json.dumps(self.frame(op.base, stale=True)).encode())
        else:
            await self.send(self.huge(op))

    def huge(self, op: Huge) -> Frame | str:
        text = op.char * op.size
        if op.kind == "junk":
            return text
        if op.kind == "update":
            return {"interaction_type": "update_only", "transcript": [user(text)]}
        # A new request must fit in max_frame_bytes: one over it is skipped by the
        # server, while the checker would expect its answer.
        stale = op.kind == "stale_request" or len(text.encode()) > 900_000
        rid = self.request_id(1, stale=stale)
        return {
            "interaction_type": "response_required",
            "response_id": rid,
            "transcript": [user(text)],
        }

    async def answer(self, rid: int) -> str:
        """Wait for request ``rid``'s answer, which must be the model's."""
        try:
            turn = await self.call.response(rid, timeout=5)
        except TimeoutError:
            raise AssertionError(f"no content_complete for request {rid} within 5 s") from None
        assert turn.completes == 1
        assert FALLBACK not in turn.text, f"response {rid} failed: {turn.text!r}"
        return turn.text

    async def ping(self) -> None:
        """A ping, and its echo."""
        timestamp = self.stamp()
        self.pings.append(timestamp)
        try:
            await self.call.ping(timestamp)
        except TimeoutError:
            raise AssertionError(f"no echo for ping {timestamp} within 5 s") from None

    # ------------------------------------------------------------------ property

    async def play(self, ops: list[Operation]) -> None:
        """Send ``ops``, then a ping and a fresh request, and check the call."""
        call = self.call
        seen = len(call.checker.violations)
        for op in ops:
            await self.perform(op)
        await self.ping()
        rid = self.request_id(1)
        call.transcript[:] = [user(f"Question {rid}")]
        await call.request(response_id=rid)
        text = await self.answer(rid)
        await self.ping()  # whatever the server sent before the echo has arrived
        assert not call.closed, f"the server closed the socket ({call.close_code})"
        assert text == "".join(ANSWER)
        assert call.response_turn(rid).completes == 1
        echoes = Counter(
            f["timestamp"] for f in call.frames if f.get("response_type") == "ping_pong"
        )
        assert [ts for ts in self.pings if echoes[ts] != 1] == []
        assert [str(v) for v in call.checker.violations[seen:]] == []


def is_ping(frame: Frame) -> bool:
    """Whether the checker takes ``frame`` for a ping and expects its echo."""
    return (
        frame.get("interaction_type") == "ping_pong"
        and "timestamp" in frame
        and _checker_counts(frame["timestamp"])
    )


def reply_for(body: Frame) -> Reply:
    """The fake model: the same three-chunk answer, unless the caller's last line
    that asks for a lookup has no result in the conversation yet: then it calls
    the ``lookup`` tool first."""
    messages = body["messages"]
    asked = [
        m["content"]
        for m in messages
        if m.get("role") == "user"
        and isinstance(m.get("content"), str)
        and "lookup" in m["content"]
    ]
    if not asked:
        return Reply(ANSWER)
    query = asked[-1].rsplit("lookup", 1)[1].strip()[:40]
    if any(m.get("role") == "tool" and query in str(m.get("content")) for m in messages):
        return Reply(ANSWER)
    return Reply("", tool_calls=[FakeToolCall("lookup", {"query": query})])


@tool
async def lookup(query: str) -> str:
    """Look a record up."""
    return f"record for {query}"


def mangle(frame: Frame, mutations: list[tuple[str, Any, Any]]) -> Frame:
    frame = dict(frame)
    for action, where, value in mutations:
        if action in ("drop", "retype"):
            if not frame:
                continue
            key = sorted(frame)[where % len(frame)]
            if action == "drop":
                del frame[key]
            elif key not in INTEGER_FIELDS or not _checker_counts(value):
                frame[key] = value
        else:  # extra, rename
            frame[where] = value
    return frame


@contextlib.contextmanager
def live_call(**agent_options: Any) -> Iterator[LiveCall]:
    live = LiveCall()
    live.start()
    try:
        live.run(live.open(agent_options))
        yield live
    finally:
        live.stop()


def fuzz(live: LiveCall) -> None:
    """Play Hypothesis' frame sequences on ``live``, then check the whole call."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(ops=st.lists(operations, max_size=10))
    def examples(ops: list[Operation]) -> None:
        if live.broken:
            live.run(live.connect())
        try:
            live.run(live.play(ops))
        except Exception:
            live.broken = True
            raise

    examples()
    live.run(live.ping())
    assert live.call.checker.finish(time.monotonic()) == []


# ------------------------------------------------------------------------------ tests


def test_fuzzed_frames_never_break_the_call() -> None:
    options = {"dynamic_variables": {"persona": "Ava", "first_name": "there"}, "tools": [lookup]}
    with live_call(**options) as live:
        fuzz(live)


def test_fuzzed_frames_with_woven_transcripts_and_a_held_greeting() -> None:
    options = {
        "dynamic_variables": {"persona": "Ava"},
        "wait_for_call_details": True,  # the greeting waits for a fuzzed call_details
        "call_details_timeout_s": 6,
        # The model's conversation comes from the fuzzed transcript_with_tool_calls.
        "retell_config": RetellConfig(transcript_with_tool_calls=True),
        "tools": [lookup],
    }
    with live_call(**options) as live:
        fuzz(live)


# ------------------------------------------------------------------ regressions
# What this fuzzing found while the server still took "5", 5.0 and true for
# integers (and a binary frame still counted as sent); fixed since.


@contextlib.asynccontextmanager
async def plain_call() -> AsyncIterator[tuple[RetellClient, FakeOpenAIServer]]:
    async with FakeOpenAIServer(default=Reply(ANSWER)) as fake:
        llm = OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="k", max_retries=0)
        agent = Agent(name="plain", begin_message="Hello.", llm=llm)
        async with serve_agent(agent) as url, RetellClient.connect(url, "plain-call") as call:
            await call.expect_config()
            await call.expect_begin()
            yield call, fake


@pytest.mark.parametrize(
    "frame",
    [
        '{"interaction_type":"ping_pong","timestamp":"100000000000000000000"}',
        '{"interaction_type":"ping_pong","timestamp":18446744073709551615}',
        '{"interaction_type":"response_required","response_id":"100000000000000000000",'
        '"transcript":[]}',
        '{"interaction_type":"response_required","response_id":18446744073709551615,'
        '"transcript":[]}',
    ],
    ids=["ping_string", "ping_u64", "request_string", "request_u64"],
)
async def test_a_number_too_big_to_echo_does_not_mute_or_stall_the_call(frame: str) -> None:
    # Taken as a number, "100000000000000000000" could not be encoded in the echo
    # or the response, which muted the call for good; a 64-bit id left every later
    # request "not newer".
    async with plain_call() as (call, _):
        await call.send(frame)
        await call.ping(timeout=1)
        turn = await call.ask("Hello?", timeout=2)
        assert turn.text == "".join(ANSWER)


@pytest.mark.parametrize(
    ("response_id", "number"),
    [('"5"', 5), ("5.0", 5), ("true", 1)],
    ids=["string", "float", "bool"],
)
async def test_a_request_whose_response_id_is_not_an_integer_is_skipped(
    response_id: str, number: int
) -> None:
    async with plain_call() as (call, fake):
        await call.send(
            f'{{"interaction_type":"response_required","response_id":{response_id},'
            '"transcript":[{"role":"user","content":"Wrong type"}]}'
        )
        await call.ping()
        # Retell's own request with that number must be answered, not ignored as
        # "not newer" than the id the malformed frame took.
        await call.send(
            {
                "interaction_type": "response_required",
                "response_id": number,
                "transcript": [user("Right type")],
            }
        )
        await call.response(number, timeout=5)
        asked = [r.body["messages"][-1]["content"] for r in fake.requests]
        assert asked == ["Right type"]


async def test_the_checker_does_not_count_a_binary_frame_as_a_request() -> None:
    async with plain_call() as (call, _):
        await call.send(b'{"interaction_type":"response_required","response_id":1,"transcript":[]}')
        await call.ping()
        assert call.checker.finish(time.monotonic()) == []


@pytest.mark.parametrize(
    "frame",
    [
        '{"interaction_type":"response_required","response_id":true,"transcript":[]}',
        '{"interaction_type":"ping_pong","timestamp":true}',
        '{"interaction_type":"response_required","response_id":9223372036854775808,'
        '"transcript":[]}',
        '{"interaction_type":"ping_pong","timestamp":-1}',
    ],
    ids=["request_true", "ping_true", "request_over_63_bits", "ping_negative"],
)
async def test_the_checker_counts_only_frames_the_server_takes(frame: str) -> None:
    async with plain_call() as (call, _):
        await call.send(frame)
        await call.ping()
        # Later than the ping deadline: an echo still owed would be reported.
        assert call.checker.finish(time.monotonic() + PING_DEADLINE_S + 1) == []
