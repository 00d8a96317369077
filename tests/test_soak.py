"""Soak: a few hundred calls at once whose sockets drop at random, mid-reply and
between turns, and reconnect (to either of two instances sharing Redis, as
behind a load balancer). Every caller turn must end up answered exactly once
per socket it was asked on, no protocol rule may break, and each call's
booking must happen exactly once however often its turn was replayed."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

from callbrain.agent import Agent
from callbrain.llm.config import OpenAIConfig
from callbrain.server.app import create_app
from callbrain.testing import FakeOpenAIServer, FakeToolCall, Reply, RetellClient, serve_asgi
from callbrain.tools import ToolContext, tool

CALLS = 200
TURNS = ("Hello there.", "Book me for Tuesday, please.", "Thanks, that's all.")
booked: Counter[str] = Counter()


@tool(side_effects=True)
def book(day: str, context: ToolContext) -> str:
    """Book an appointment.

    Args:
        day: The day.
    """
    booked[context.call_id] += 1
    return f"Booked {day}."


def model(body: dict[str, Any]) -> Reply:
    """The fake model: books when asked (once its result is in, it says so)."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return Reply("All booked for Tuesday.", chunk_delay=0.01)
    if last["role"] == "user" and "Book me" in str(last["content"]):
        return Reply("", tool_calls=[FakeToolCall("book", {"day": "tuesday"})])
    return Reply("Sure, happy to help with that today.", chunk_delay=0.01)


async def one_call(n: int, urls: list[str], rng: random.Random, stats: Counter[str]) -> None:
    call_id = f"soak-{n}"
    transcript: list[dict[str, str]] = []
    next_id = 1
    for text in TURNS:
        transcript.append({"role": "user", "content": text})
        answered = False
        while not answered:
            async with RetellClient.connect(rng.choice(urls), call_id) as call:
                call.transcript = list(transcript)
                await call.expect_config()
                await call.expect_begin()
                rid = next_id
                next_id += 1
                await call.update()
                await call.request(response_id=rid)
                turn = call.checker.turns[rid]
                drop = rng.random() < 0.3
                if drop:
                    # Retell loses the socket mid-reply (or just before it starts).
                    await call.wait_for(lambda _, t=turn: t.first_frame_at is not None, 10)
                    stats["dropped"] += 1
                else:
                    reply = await call.response(rid, timeout=15)
                    assert reply.completes == 1, (call_id, rid)
                    transcript.append({"role": "agent", "content": reply.text})
                    answered = True
                await call.ping()  # every frame the server sent has arrived
                violations = call.checker.finish(
                    asyncio.get_running_loop().time(), require_complete=not drop
                )
                assert violations == [], (call_id, [str(v) for v in violations])
            stats["sockets"] += 1
        stats["turns"] += 1


async def test_random_drops_and_reconnects_lose_and_repeat_nothing(redis_url: str) -> None:
    booked.clear()
    rng = random.Random(20261122)
    stats: Counter[str] = Counter()
    async with FakeOpenAIServer(default=model) as fake:
        llm = OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="k", max_retries=0)
        agent = Agent(
            name="soak",
            begin_message="Hi.",
            tools=[book],
            holding_messages=[],
            llm=llm,
            server={"store": {"redis_url": redis_url}},
        )
        async with (
            serve_asgi(create_app(agent)) as first,
            serve_asgi(create_app(agent)) as second,
        ):
            urls = ["ws" + h.removeprefix("http") + "/llm-websocket" for h in (first, second)]
            seeds = [rng.random() for _ in range(CALLS)]
            await asyncio.gather(
                *(one_call(n, urls, random.Random(seeds[n]), stats) for n in range(CALLS))
            )
    assert stats["turns"] == CALLS * len(TURNS)
    assert stats["dropped"] > CALLS // 2  # the drops really happened, many mid-reply
    assert stats["sockets"] == stats["turns"] + stats["dropped"]
    # However often a booking turn was replayed, on whichever instance: once per call.
    assert booked == Counter({f"soak-{n}": 1 for n in range(CALLS)})
