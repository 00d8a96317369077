"""Soak: a few hundred calls at once whose connections die abruptly (a TCP reset,
no close frame) at random points, mid-reply and in the middle of a booking,
and reconnect to either of two instances sharing Redis, as behind a load
balancer; and Redis itself stalls for a few seconds in the middle of it all.

Every caller turn must end up answered exactly once on the socket it was
answered on, no protocol rule may break on any socket (the callers ping every
2 s, as Retell does, so a pong held up by the stalled store is caught), and
each call's booking must happen exactly once however often its turn was
replayed and wherever.
Without the cross-instance run lock (a reconnect landing on the other
instance while the booking runs) or without the store's guard (a stalled
Redis hangs the turn) this fails.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

from conftest import RedisServer
from support import agent_on

from callbrain.retell.frames import PING_INTERVAL_S
from callbrain.server.app import create_app
from callbrain.testing import FakeOpenAIServer, FakeToolCall, Reply, RetellClient, serve_asgi
from callbrain.testing.client import ResponseTurn
from callbrain.tools import ToolContext, tool

CALLS = 150
TURNS = ("Hello there.", "Book me for Tuesday, please.", "Thanks, that's all.")
PAUSE_AFTER_S = 1.5
PAUSE_S = 6.0
"""Longer than Retell waits for a pong (5 s): only the store's guard keeps the
calls that start meanwhile answering their pings."""
booked: Counter[str] = Counter()


@tool(side_effects=True)
async def book(day: str, context: ToolContext) -> str:
    """Book an appointment; it takes a moment, so drops land in the middle of it.

    Args:
        day: The day.
    """
    await asyncio.sleep(random.uniform(0.3, 1.0))
    booked[context.call_id] += 1
    return f"Booked {day}."


def model(body: dict[str, Any]) -> Reply:
    """The fake model: books when the caller asked and no booking is in the
    conversation yet (as a real model would, even if the agent greeted again
    after a reconnect that could not read the call's memory); says so once it is."""
    messages = body["messages"]
    if messages[-1]["role"] == "tool":
        return Reply("All booked for Tuesday.", chunk_delay=0.01)
    asked = any(m["role"] == "user" and "Book me" in str(m["content"]) for m in messages)
    done = any(m["role"] == "tool" for m in messages)
    if asked and not done:
        return Reply("", tool_calls=[FakeToolCall("book", {"day": "tuesday"})])
    return Reply("Sure, happy to help with that today.", chunk_delay=0.01)


def in_tool(call: RetellClient) -> bool:
    return any(f["response_type"] == "tool_call_invocation" for f in call.frames)


async def one_call(n: int, urls: list[str], rng: random.Random, stats: Counter[str]) -> None:
    call_id = f"soak-{n}"
    transcript: list[dict[str, str]] = []
    next_id = 1
    for text in TURNS:
        transcript.append({"role": "user", "content": text})
        reply: ResponseTurn | None = None
        while reply is None:
            url = rng.choice(urls)
            async with RetellClient.connect(url, call_id, ping_interval=PING_INTERVAL_S) as call:
                call.transcript = list(transcript)
                await call.expect_config(timeout=15)
                await call.expect_begin(timeout=15)
                rid = next_id
                next_id += 1
                await call.update()
                await call.request(response_id=rid)
                turn = call.checker.turns[rid]
                roll = rng.random()
                if roll < 0.25 and "Book" in text:
                    # The connection dies while the booking runs (if the model books
                    # on this socket: after a reconnect it may know it already did).
                    await call.wait_for(
                        lambda _, c=call, t=turn: in_tool(c) or t.first_frame_at is not None, 20
                    )
                    where = "mid-tool" if in_tool(call) else "mid-reply"
                elif roll < 0.45:
                    await call.wait_for(lambda _, t=turn: t.first_frame_at is not None, 20)
                    where = "mid-reply"
                else:
                    reply = await call.response(rid, timeout=30)
                    assert reply.completes == 1, (call_id, rid)
                    transcript.append({"role": "agent", "content": reply.text})
                    await call.ping()  # every frame the server sent has arrived
                    where = ""
                if where:
                    call.reset()  # abrupt: no close frame, a TCP reset
                    stats[f"dropped {where}"] += 1
                    await call.wait_for(lambda _, c=call: c.closed, 10)
                violations = call.checker.finish(
                    asyncio.get_running_loop().time(), require_complete=not where
                )
                assert violations == [], (call_id, [str(v) for v in violations])
            stats["sockets"] += 1
        stats["turns"] += 1


async def stall_redis(redis: RedisServer, stats: Counter[str]) -> None:
    await asyncio.sleep(PAUSE_AFTER_S)
    async with redis.paused():
        stats["redis paused"] += 1
        await asyncio.sleep(PAUSE_S)


async def test_abrupt_drops_reconnects_and_a_stalled_redis_lose_and_repeat_nothing(
    redis_server: RedisServer,
) -> None:
    booked.clear()
    rng = random.Random(20261201)
    stats: Counter[str] = Counter()
    async with FakeOpenAIServer(default=model) as fake:
        agent = agent_on(
            fake,
            name="soak",
            begin_message="Hi.",
            tools=[book],
            holding_messages=[],
            server={"store": {"redis_url": redis_server.url}},
        )
        async with (
            serve_asgi(create_app(agent)) as first,
            serve_asgi(create_app(agent)) as second,
        ):
            urls = ["ws" + h.removeprefix("http") + "/llm-websocket" for h in (first, second)]
            seeds = [rng.random() for _ in range(CALLS)]
            stall = asyncio.create_task(stall_redis(redis_server, stats))
            await asyncio.gather(
                *(one_call(n, urls, random.Random(seeds[n]), stats) for n in range(CALLS))
            )
            await stall
    drops = stats["dropped mid-tool"] + stats["dropped mid-reply"]
    print(dict(stats), f"bookings={sum(booked.values())}")
    assert stats["turns"] == CALLS * len(TURNS)
    assert stats["dropped mid-tool"] > CALLS // 10 and stats["dropped mid-reply"] > CALLS // 3
    assert stats["sockets"] == stats["turns"] + drops
    assert stats["redis paused"] == 1
    # However often a booking turn was replayed, on whichever instance: once per call.
    assert booked == Counter({f"soak-{n}": 1 for n in range(CALLS)})
