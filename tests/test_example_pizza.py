"""The README's own agent, examples/pizza: checked and tested as the README says,
through the installed command, with no API key (a scripted scenario) or against a
fake OpenAI server on loopback (``check --live``)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import cast

import pytest

from callbrain.agent import Agent
from callbrain.call.control import CallControl
from callbrain.testing import FakeOpenAIServer, Reply
from callbrain.testing.suite import run_suite
from callbrain.tools import ToolContext, ToolError

ROOT = Path(__file__).resolve().parent.parent
PIZZA = ROOT / "examples" / "pizza"
CALLBRAIN = str(Path(sys.executable).with_name("callbrain"))


async def run(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        CALLBRAIN,
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    env.update(COLUMNS="200", **extra)
    return env


@pytest.fixture
def pizza_tools() -> Iterator[ModuleType]:
    """The module the agent imports from beside its file (the same one Agent loads),
    removed afterwards: other tests load a pizza_tools.py of their own."""
    sys.modules.pop("pizza_tools", None)
    agent = Agent.from_yaml(PIZZA / "pizza.yaml")
    agent.build_tools()
    yield sys.modules["pizza_tools"]
    sys.modules.pop("pizza_tools", None)


async def test_callbrain_test_passes_the_scenario_with_no_api_key() -> None:
    code, out = await run(
        "test",
        "examples/pizza/scenarios",
        "--agent",
        "examples/pizza/pizza.yaml",
        env=environment(),
    )
    assert code == 0, out
    assert "1 passed, 0 failed" in out


async def test_callbrain_check_live_asks_the_model_once() -> None:
    async with FakeOpenAIServer(Reply("OK")) as fake:
        env = environment(OPENAI_API_KEY="test", OPENAI_BASE_URL=fake.base_url)
        code, out = await run("check", "--live", "examples/pizza/pizza.yaml", env=env)
    assert code == 0, out
    assert "tools: add_to_order, place_order, end_call" in out
    assert len(fake.requests) == 1
    assert fake.requests[0].body["model"] == "gpt-4o-mini"


async def test_callbrain_check_names_the_missing_key() -> None:
    code, out = await run("check", "examples/pizza/pizza.yaml", env=environment())
    assert code == 2
    assert "OPENAI_API_KEY" in out


async def test_the_scenario_sends_one_order_to_the_kitchen(pizza_tools: ModuleType) -> None:
    agent = Agent.from_yaml(PIZZA / "pizza.yaml")
    [result] = await run_suite(sorted((PIZZA / "scenarios").glob("*.yaml")), agent=agent)
    assert result.passed, (result.violations, result.failures)
    assert pizza_tools.placed == ["Sam: 1 large margherita, 2 medium marinara"]


def context(call_id: str) -> ToolContext:
    return ToolContext(
        call_id=call_id, tool_call_id="t1", variables={}, call=cast(CallControl, None)
    )


def test_asking_again_sets_the_quantity_and_an_empty_order_is_refused(
    pizza_tools: ModuleType,
) -> None:
    add, place = pizza_tools.add_to_order, pizza_tools.place_order
    add(context("call-1"), "diavola", quantity=2)
    again = add(context("call-1"), "diavola", quantity=1)
    assert again == "The order is now: 1 medium diavola; total 11.00 euros."
    with pytest.raises(ToolError, match="quantity must be at least 1"):
        add(context("call-1"), "diavola", quantity=0)
    with pytest.raises(ToolError, match="order is empty"):
        place(context("call-2"), "Bo")
