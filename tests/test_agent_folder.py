"""``module:function`` references are looked up beside the agent file first, then
on the import path: real files in a temporary folder, imported for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tool_samples import make_context

from callbrain.agent import Agent, AgentConfigError
from callbrain.server.webhooks import webhook_routes
from callbrain.tools.references import ToolReferenceError, load_callable

TOOL = '''
def add_to_order(item: str) -> str:
    """Add an item to the order.

    Args:
        item: What to add.
    """
    return "{marker}: " + item
'''


@pytest.fixture
def unique() -> Iterator[str]:
    """A module name no other test uses; whatever it and its siblings loaded, and
    the folders put on sys.path, are gone afterwards (modules live per process)."""
    name = f"pizza_{uuid.uuid4().hex[:8]}"
    path, modules = list(sys.path), set(sys.modules)
    yield name
    sys.path[:] = path
    for added in set(sys.modules) - modules:
        del sys.modules[added]


def agent_folder(folder: Path, module: str, marker: str, *, extra: str = "") -> Path:
    """``folder/agent.yaml`` using ``folder/<module>.py``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(TOOL.format(marker=marker) + extra)
    agent_file = folder / "agent.yaml"
    agent_file.write_text(
        f"name: {folder.name}\ntools:\n  - type: python\n    function: {module}:add_to_order\n"
    )
    return agent_file


async def run_tool(agent: Agent, item: str) -> object:
    tool = agent.build_tools()["add_to_order"]
    return await tool.run(tool.validate({"item": item}), make_context())


async def test_a_tool_beside_the_agent_file_imports_from_any_directory(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent_file = agent_folder(tmp_path / "pizza", unique, "pizza")
    monkeypatch.chdir(tmp_path)  # not the agent's folder, and not on sys.path
    agent = Agent.from_yaml(agent_file)
    assert agent.folder == agent_file.parent.resolve()
    assert await run_tool(agent, "margherita") == "pizza: margherita"
    # Imported under its own name, as PYTHONPATH=<folder> would: one copy per process.
    assert sys.modules[unique].__file__ == str(agent_file.parent / f"{unique}.py")


async def test_the_tool_module_imports_its_siblings(tmp_path: Path, unique: str) -> None:
    folder = tmp_path / "pizza"
    folder.mkdir()
    (folder / f"{unique}_menu.py").write_text("PRICES = {'margherita': 9}\n")
    extra = (
        f"\nimport {unique}_menu\n\n"
        "def price(item: str) -> int:\n"
        '    """The price of an item."""\n'
        f"    return {unique}_menu.PRICES[item]\n"
    )
    agent_file = agent_folder(folder, unique, "pizza", extra=extra)
    agent = Agent.from_yaml(agent_file)
    assert load_callable(f"{unique}:price", folder=agent.folder)("margherita") == 9


def test_a_module_in_neither_place_names_both(tmp_path: Path, unique: str) -> None:
    agent_file = tmp_path / "agent.yaml"
    agent_file.write_text(f"tools:\n  - type: python\n    function: {unique}:add_to_order\n")
    with pytest.raises(AgentConfigError) as caught:
        Agent.from_yaml(agent_file).build_tools()
    message = str(caught.value)
    assert f"no module named {unique!r}" in message
    assert f"beside the agent file (in {tmp_path.resolve()})" in message
    assert "on the Python import path" in message


async def test_the_agent_folder_comes_before_the_import_path(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent_file = agent_folder(tmp_path / "agent", unique, "beside")
    elsewhere = tmp_path / "site"
    elsewhere.mkdir()
    (elsewhere / f"{unique}.py").write_text(TOOL.format(marker="installed"))
    monkeypatch.syspath_prepend(str(elsewhere))
    assert await run_tool(Agent.from_yaml(agent_file), "x") == "beside: x"


async def test_two_agents_in_one_folder_share_the_module(tmp_path: Path, unique: str) -> None:
    first = agent_folder(tmp_path / "shop", unique, "shop")
    second = first.with_name("other.yaml")
    second.write_text(first.read_text())
    one, two = Agent.from_yaml(first), Agent.from_yaml(second)
    assert await run_tool(one, "a") == await run_tool(two, "a") == "shop: a"
    assert load_callable(f"{unique}:add_to_order", folder=one.folder) is load_callable(
        f"{unique}:add_to_order", folder=two.folder
    )


async def test_two_folders_with_same_named_modules_is_an_error_naming_both(
    tmp_path: Path, unique: str
) -> None:
    pizza = Agent.from_yaml(agent_folder(tmp_path / "pizza", unique, "pizza"))
    sushi = Agent.from_yaml(agent_folder(tmp_path / "sushi", unique, "sushi"))
    assert await run_tool(pizza, "x") == "pizza: x"
    # Never the other folder's function, quietly: Python keeps one module per name.
    with pytest.raises(AgentConfigError) as caught:
        sushi.build_tools()
    message = str(caught.value)
    assert str(tmp_path / "sushi" / f"{unique}.py") in message
    assert str(tmp_path / "pizza" / f"{unique}.py") in message
    assert "rename one of them" in message


def test_a_module_named_like_a_loaded_one_is_an_error(tmp_path: Path, unique: str) -> None:
    (tmp_path / "json.py").write_text("def dumps(x: object) -> str:\n    return 'mine'\n")
    with pytest.raises(ToolReferenceError, match="same name as one already loaded from"):
        load_callable("json:dumps", folder=tmp_path)
    assert sys.modules["json"] is json


async def test_an_agent_from_text_looks_in_the_folder_it_is_given(
    tmp_path: Path, unique: str
) -> None:
    text = agent_folder(tmp_path / "pizza", unique, "pizza").read_text()
    with pytest.raises(AgentConfigError, match="has no folder of its own to look in"):
        Agent.from_yaml_text(text).build_tools()
    agent = Agent.from_yaml_text(text, folder=tmp_path / "pizza")
    assert await run_tool(agent, "x") == "pizza: x"
    # A copy keeps it (model_copy is how code derives a variant of an agent).
    assert agent.model_copy(update={"name": "copy"}).folder == agent.folder


def test_the_webhook_handler_is_looked_up_beside_the_agent_file(
    tmp_path: Path, unique: str
) -> None:
    (tmp_path / f"{unique}.py").write_text("def on_event(event: object) -> None:\n    pass\n")
    agent_file = tmp_path / "agent.yaml"
    agent_file.write_text(
        f"server:\n  webhooks:\n    api_key: key_for_the_test\n    handler: {unique}:on_event\n"
    )
    routes = webhook_routes(Agent.from_yaml(agent_file))
    assert [route.path for route in routes] == ["/webhook"]  # type: ignore[attr-defined]


SCENARIO = """
name: orders a pizza
script:
  - tool_calls: [{name: add_to_order, arguments: {item: margherita}}]
  - text: Added.
steps:
  - caller: A margherita, please.
    expect:
      tools: [{name: add_to_order, arguments: {item: margherita}}]
      said: [Added]
"""


def test_callbrain_test_runs_a_tool_beside_the_agent_file(tmp_path: Path, unique: str) -> None:
    # As a new user runs it: from another directory, with no PYTHONPATH.
    agent_file = agent_folder(tmp_path / "pizza", unique, "pizza")
    scenario = tmp_path / "order.yaml"
    scenario.write_text(SCENARIO)
    result = subprocess.run(
        [sys.executable, "-m", "callbrain", "test", str(scenario), "--agent", str(agent_file),
         "--json", "-"],
        capture_output=True, text=True, timeout=120, cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    [passed] = report["scenarios"]
    assert passed["passed"] is True
