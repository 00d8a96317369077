"""Agent definitions: YAML files, environment references, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from callbrain.agent import Agent, AgentConfigError, example_agent_path
from callbrain.llm.config import AnthropicConfig, LocalConfig, OpenAIConfig

ISSUE_EXAMPLE = """
name: clinic
system_prompt: "You are Ava, ..."
begin_message: "Hi, Sunrise Clinic. How can I help?"
reminder_prompt: "..."
llm:
  provider: openai        # openai | anthropic | local
  model: gpt-4o-mini
  base_url: http://127.0.0.1:9000/v1   # optional
  api_key: ${OPENAI_API_KEY}            # optional, env references expanded
"""


def test_the_documented_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    agent = Agent.from_yaml_text(ISSUE_EXAMPLE)
    assert isinstance(agent.llm, OpenAIConfig)
    assert agent.llm.api_key == "sk-test"
    assert agent.llm.base_url == "http://127.0.0.1:9000/v1"
    assert agent.begin_message == "Hi, Sunrise Clinic. How can I help?"


def test_missing_environment_variable_names_key_and_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(AgentConfigError) as info:
        Agent.from_yaml_text(ISSUE_EXAMPLE, source="clinic.yaml")
    message = str(info.value)
    assert "clinic.yaml" in message and "llm.api_key" in message and "OPENAI_API_KEY" in message


def test_environment_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CB_MODEL", raising=False)
    agent = Agent.from_yaml_text("llm: {provider: anthropic, model: '${CB_MODEL:-claude-x}'}")
    assert isinstance(agent.llm, AnthropicConfig) and agent.llm.model == "claude-x"


def test_no_llm_means_the_local_model() -> None:
    agent = Agent.from_yaml_text("name: quiet")
    assert isinstance(agent.llm, LocalConfig)
    assert agent.begin_message == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("begin_mesage: hi", "begin_mesage"),
        ("llm: {provider: gemini}", "llm"),
        ("llm: {provider: openai, temprature: 0.2}", "temprature"),
        ("llm: {provider: openai, temperature: 9}", "temperature"),
        ("wait_for_call_details: true\nretell_config: {call_details: false}", "call_details"),
        ("- a list", "mapping"),
        ("name: [unclosed", "invalid YAML"),
    ],
)
def test_invalid_definitions_are_clear_errors(text: str, expected: str) -> None:
    with pytest.raises(AgentConfigError) as info:
        Agent.from_yaml_text(text, source="bad.yaml")
    assert "bad.yaml" in str(info.value) and expected in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="cannot read"):
        Agent.from_yaml(tmp_path / "nope.yaml")


def test_shipped_example_is_valid_and_runs_offline() -> None:
    agent = Agent.from_yaml(example_agent_path())
    assert agent.name == "clinic"
    assert isinstance(agent.llm, LocalConfig)
    assert "{{first_name}}" in agent.begin_message and agent.dynamic_variables["first_name"]


def test_built_from_python_equals_yaml() -> None:
    in_code = Agent(
        name="clinic",
        begin_message="Hello",
        llm=AnthropicConfig(provider="anthropic", model="claude-haiku-4-5"),
    )
    from_yaml = Agent.from_yaml_text(
        "name: clinic\nbegin_message: Hello\nllm: {provider: anthropic, model: claude-haiku-4-5}"
    )
    assert in_code == from_yaml


def test_tools_given_as_plain_dicts_after_model_copy_are_validated() -> None:
    # model_copy(update=...) skips validation, so declarations arrive as dicts.
    agent = Agent().model_copy(update={"tools": [{"type": "end_call", "message": "Bye."}]})
    assert list(agent.build_tools()) == ["end_call"]
    broken = Agent().model_copy(update={"tools": [{"type": "transfer_call", "number": "5"}]})
    with pytest.raises(AgentConfigError, match="number"):
        broken.build_tools()


def test_two_tools_with_one_name_are_refused() -> None:
    agent = Agent.from_dict({"tools": [{"type": "end_call"}, {"type": "end_call"}]})
    with pytest.raises(AgentConfigError, match="two tools are named 'end_call'"):
        agent.build_tools()
