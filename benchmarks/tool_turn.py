"""What the tool loop adds to a turn, with the model's own time taken out.

    python benchmarks/tool_turn.py [--turns N] [--provider openai|anthropic]

Runs the shipped clinic agent's tools through the whole stack (a Retell-side
client on a real socket, the session, the real provider SDK, a fake provider on
loopback that answers at once) and prints one JSON object of p50/p95
milliseconds over ``--turns`` turns, each "check availability, then answer":

* ``holding_line_ms``: from ``response_required`` to the holding line the caller
  hears (the model's tool call arrives at once, so this is all callbrain + SDK);
* ``tool_round_ms``: from the first completion's tool call being sent by the
  fake to the second completion's request arriving there: parsing, validating
  and running the tool, the two bookkeeping frames, and building the request;
* ``turn_ms``: from ``response_required`` to ``content_complete``;
* ``plain_first_text_ms``, the baseline: a turn without tools, from
  ``response_required`` to the first text, through the same stack.

The fake provider is in the same process and on the same two cores, so these
are upper bounds of what callbrain adds; compare them with a provider's own
time to first token (hundreds of milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from callbrain.agent import Agent, example_agent_path
from callbrain.examples import clinic_tools
from callbrain.llm.config import AnthropicConfig, OpenAIConfig
from callbrain.testing import (
    FakeAnthropicServer,
    FakeLLMServer,
    FakeOpenAIServer,
    FakeToolCall,
    Reply,
    RetellClient,
    serve_agent,
)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 2), "p95": round(p95, 2)}


async def run(turns: int, provider: str) -> dict[str, Any]:
    fake: FakeLLMServer = FakeOpenAIServer() if provider == "openai" else FakeAnthropicServer()
    holding: list[float] = []
    rounds: list[float] = []
    totals: list[float] = []
    plain: list[float] = []
    async with fake:
        config = (OpenAIConfig if provider == "openai" else AnthropicConfig).model_validate(
            {"provider": provider, "base_url": fake.base_url, "api_key": "k", "max_retries": 0}
        )
        agent = Agent.from_yaml(example_agent_path()).model_copy(update={"llm": config})
        async with serve_agent(agent) as url, RetellClient.connect(url) as call:
            await call.expect_config()
            await call.send_call_details({"call_id": "bench", "retell_llm_dynamic_variables": {}})
            await call.expect_begin()
            for n in range(turns):
                clinic_tools._booked.clear()
                check = FakeToolCall("check_availability", {"day": "friday"})
                fake.script(Reply("", tool_calls=[check]), Reply("Friday is open."))
                seen = len(call.frames)
                started = time.monotonic()
                rid = await call.say(f"Anything on Friday? ({n})")
                await call.response(rid)
                done = time.monotonic()
                mine = call.frames[seen:]
                first_text = next(
                    call.received_at[seen + i]
                    for i, f in enumerate(mine)
                    if f.get("response_type") == "response" and f.get("content")
                )
                first, second = fake.requests[-2:]
                assert first.ended is not None
                holding.append((first_text - started) * 1000)
                rounds.append((second.started - first.ended) * 1000)
                totals.append((done - started) * 1000)
                fake.script(Reply("We open at eight."))
                started = time.monotonic()
                plain_id = await call.say("When do you open?")

                def spoke(_: object, rid: int = plain_id) -> bool:
                    return bool(call.response_turn(rid).text)

                await call.wait_for(spoke)
                plain.append((time.monotonic() - started) * 1000)
                await call.response(plain_id)
    return {
        "provider": provider,
        "turns": turns,
        "holding_line_ms": percentiles(holding),
        "tool_round_ms": percentiles(rounds),
        "turn_ms": percentiles(totals),
        "plain_first_text_ms": percentiles(plain),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--provider", choices=["openai", "anthropic"], default="openai")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.turns, args.provider)), indent=2))


if __name__ == "__main__":
    main()
