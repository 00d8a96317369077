"""Built-in template variables: the clock in the agent's time zone (for each turn),
the caller's number, the direction; the call's own dynamic variables win."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from support import agent_on

from callbrain.agent import Agent, AgentConfigError
from callbrain.call import variables as variables_module
from callbrain.call.variables import call_variables, clock_variables, turn_variables
from callbrain.testing.agent_server import serve_agent
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer

LONDON = ZoneInfo("Europe/London")
INBOUND = {"direction": "inbound", "from_number": "+447700900123", "to_number": "+442079460000"}


@pytest.mark.parametrize(
    ("utc", "shown"),
    [
        # Winter (GMT) and summer (BST) in London; midnight and noon on a 12-hour clock.
        (datetime(2024, 3, 28, 23, 46, 4, tzinfo=UTC),
         ("Thursday, March 28, 2024 at 11:46 PM GMT", "2024-03-28", "Thursday")),
        (datetime(2024, 7, 4, 23, 5, tzinfo=UTC),
         ("Friday, July 5, 2024 at 12:05 AM BST", "2024-07-05", "Friday")),
        (datetime(2024, 7, 4, 11, 0, tzinfo=UTC),
         ("Thursday, July 4, 2024 at 12:00 PM BST", "2024-07-04", "Thursday")),
    ],
)  # fmt: skip
def test_the_clock_in_a_time_zone(utc: datetime, shown: tuple[str, str, str]) -> None:
    clock = clock_variables(LONDON, utc)
    assert (clock["current_time"], clock["current_date"], clock["current_weekday"]) == shown


def test_the_caller_number_follows_the_direction() -> None:
    inbound = call_variables({}, "c1", INBOUND)
    assert inbound["caller_number"] == "+447700900123" and inbound["direction"] == "inbound"
    outbound = call_variables({}, "c1", {**INBOUND, "direction": "outbound"})
    assert outbound["caller_number"] == "+442079460000"
    web = call_variables({}, "c1", {"call_type": "web_call"})
    assert "caller_number" not in web and "direction" not in web


def test_who_wins() -> None:
    defaults = {"caller_number": "unknown", "current_date": "someday", "first_name": "there"}
    call = {**INBOUND, "retell_llm_dynamic_variables": {"current_time": "teatime", "first_name": 7}}
    at = datetime(2024, 3, 28, 12, tzinfo=UTC)
    values = turn_variables(call_variables(defaults, "c1", call), call, LONDON, at)
    assert values["caller_number"] == "+447700900123"  # built-in over the agent's default
    assert values["current_date"] == "2024-03-28"
    assert values["current_time"] == "teatime"  # the call's own over the built-in
    assert values["first_name"] == "7"
    # Without call details the defaults stand, and the clock is there anyway.
    alone = turn_variables(call_variables(defaults, "c1", None), None, LONDON, at)
    assert alone["caller_number"] == "unknown" and alone["current_weekday"] == "Thursday"


def test_the_time_zone_is_checked() -> None:
    with pytest.raises(AgentConfigError, match=r"unknown time zone 'Europe/Londn' \(did you mean"):
        Agent.from_yaml_text("timezone: Europe/Londn\n", source="a.yaml")
    assert Agent().timezone == "UTC"


async def test_prompts_get_them_and_the_clock_moves_with_each_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [datetime(2024, 12, 31, 23, 58, tzinfo=UTC)]
    monkeypatch.setattr(variables_module, "current_time", lambda: now[0])
    async with FakeOpenAIServer() as fake:
        agent = agent_on(
            fake,
            timezone="Europe/London",
            wait_for_call_details=True,
            begin_message="Hi, is this {{caller_number}}?",
            system_prompt="It is {{current_time}} ({{current_date}}, {{current_weekday}}). "
            "A {{direction}} call from {{caller_number}}.",
        )
        async with serve_agent(agent) as url, RetellClient.connect(url, "c1") as call:
            await call.expect_config()
            await call.send_call_details({"call_id": "c1", **INBOUND})
            assert (await call.expect_begin()).text == "Hi, is this +447700900123?"
            await call.ask("What time is it?")
            now[0] = datetime(2025, 1, 1, 0, 1, tzinfo=UTC)  # past midnight, mid-call
            await call.ask("And now?")
    systems = [r.body["messages"][0]["content"] for r in fake.requests]
    assert systems == [
        "It is Tuesday, December 31, 2024 at 11:58 PM GMT (2024-12-31, Tuesday). "
        "A inbound call from +447700900123.",
        "It is Wednesday, January 1, 2025 at 12:01 AM GMT (2025-01-01, Wednesday). "
        "A inbound call from +447700900123.",
    ]
